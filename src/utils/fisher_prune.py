"""`clipcompress fisher-prune`: retraining-free pruning of heads and MLP neurons under a MAC budget
(Kwon et al., NeurIPS 2022).

    clipcompress fisher-prune --pretrained CKPT --out RUN_DIR --mac-constraint 0.6 --calib-data TSV

The algorithm is `compress.ops.fisher_prune.fisher_prune`; this module is its command line.
"""
import argparse

from compress.ops.fisher_prune import fisher_prune
from utils.posttrain import add_tower_flags, base_parser, parse_layers, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("retraining-free Fisher pruning of heads and MLP neurons under a MAC constraint (Kwon et al.)",
                         prog="clipcompress fisher-prune")
    parser.add_argument("--mac-constraint", type=float, required=True,
                        help="fraction of the chosen blocks' head+MLP MACs to keep (e.g. 0.6)")
    add_tower_flags(parser)
    parser.add_argument("--no-rearrange", action="store_true", help="skip the per-layer mask rearrangement")
    parser.add_argument("--no-rescale", action="store_true", help="skip the least-squares rescaling of kept units")
    parser.add_argument("--damping", type=float, default=1e-4,
                        help="ridge damping of the rescaling, relative to the mean diagonal of its normal matrix")
    return parser


def transform(model, args, batches):
    return fisher_prune(model, batches, args.mac_constraint, towers=args.towers.split(","),
                        layers=parse_layers(args.layers), rearrange_masks=not args.no_rearrange,
                        rescale=not args.no_rescale, damping=args.damping)


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="fisher_prune")


if __name__ == "__main__":
    main()
