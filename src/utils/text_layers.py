"""`clipcompress text-layers`: drop text-encoder layers (no retraining).

    clipcompress text-layers --pretrained CKPT --out RUN_DIR --keep-first 6
    clipcompress text-layers --pretrained CKPT --out RUN_DIR --drop 3,5

The algorithm is `compress.ops.text_layers.drop_text_layers`; this module is its command line.
"""
import argparse

from compress.ops.text_layers import drop_text_layers
from utils.posttrain import base_parser, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("drop text-encoder layers", calibration=False, prog="clipcompress text-layers")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--drop", default=None, help="comma list of text block indices to remove")
    group.add_argument("--keep-first", type=int, default=None, help="keep only the first N text blocks")
    return parser


def transform(model, args, _batches):
    drop = [int(i) for i in args.drop.split(",")] if args.drop else None
    return drop_text_layers(model, drop=drop, keep_first=args.keep_first)


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="text_layers")


if __name__ == "__main__":
    main()
