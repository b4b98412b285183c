"""`clipcompress heads`: attention-head pruning by sensitivity (Michel et al. 2019, as casCLIP applied it).

    clipcompress heads --pretrained CKPT --out RUN_DIR --num-heads 4 --calib-data TSV

The algorithm is `compress.ops.heads.prune_heads_by_sensitivity`; this module is its command line.
"""
import argparse

from compress.ops.heads import prune_heads_by_sensitivity
from utils.posttrain import add_tower_flags, base_parser, parse_layers, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("attention-head pruning by Fisher sensitivity of head masks (iterative)",
                         prog="clipcompress heads")
    parser.add_argument("--num-heads", type=int, required=True, help="total number of heads to remove")
    parser.add_argument("--heads-per-round", type=int, default=1,
                        help="heads removed before the scores are recomputed (default 1)")
    add_tower_flags(parser)
    parser.add_argument("--no-layer-normalization", action="store_true",
                        help="rank raw scores across layers instead of per-layer L2-normalised ones")
    return parser


def transform(model, args, batches):
    return prune_heads_by_sensitivity(model, args.num_heads, batches, towers=args.towers.split(","),
                                      layers=parse_layers(args.layers), heads_per_round=args.heads_per_round,
                                      normalize_per_layer=not args.no_layer_normalization)


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="heads")


if __name__ == "__main__":
    main()
