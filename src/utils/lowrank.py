"""`clipcompress lowrank`: low-rank factorisation (plain SVD or Fisher-weighted SVD) of transformer Linears.

    clipcompress lowrank --pretrained CKPT --out RUN_DIR --ratio 0.5 [--method fwsvd --calib-data TSV]

The algorithm is `compress.ops.lowrank.low_rank`; this module is its command line.
"""
import argparse

from compress.ops.lowrank import low_rank
from utils.posttrain import add_tower_flags, base_parser, needs_calibration, parse_layers, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("low-rank factorisation (SVD / Fisher-weighted SVD) of transformer Linears",
                         prog="clipcompress lowrank")
    parser.add_argument("--ratio", type=float, required=True, help="kept-parameter ratio ρ of each factorised Linear")
    parser.add_argument("--method", choices=("svd", "fwsvd"), default="svd",
                        help="plain SVD, or Fisher-weighted SVD (needs --calib-data)")
    add_tower_flags(parser)
    parser.add_argument("--targets", default="attn,mlp",
                        help="comma list: attn, mlp, or q_proj,k_proj,v_proj,out_proj,c_fc,c_gate,c_proj (c_gate: "
                             "the gate Linear of a gated MLP, EVA's SwiGLU; default attn,mlp)")
    parser.add_argument("--round-to", type=int, default=8,
                        help="round each rank down to a multiple of this (still within --ratio): matrix products of "
                             "odd widths run well below peak on CPUs and GPUs; 1 keeps the exact rank")
    return parser


def transform(model, args, _batches):
    # calibration is loaded only for FWSVD: plain SVD needs no data
    batches = needs_calibration(args) if args.method == "fwsvd" else None
    return low_rank(model, args.ratio, towers=args.towers.split(","), layers=parse_layers(args.layers),
                    targets=args.targets.split(","), method=args.method, batches=batches, round_to=args.round_to)


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="lowrank", calibrate=False)


if __name__ == "__main__":
    main()
