"""`clipcompress token-mask`: FLIP-style token masking at inference (no retraining).

    clipcompress token-mask --pretrained CKPT --out RUN_DIR --drop 0.5

The algorithm is `compress.ops.token_mask.mask_tokens`; this module is its command line.
"""
import argparse

from compress.ops.token_mask import mask_tokens
from utils.posttrain import base_parser, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("FLIP token masking at inference (no retraining)", calibration=False,
                         prog="clipcompress token-mask")
    parser.add_argument("--drop", type=float, required=True, help="fraction p of patch tokens dropped (0 ≤ p < 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token choice")
    return parser


def transform(model, args, _batches):
    return mask_tokens(model, args.drop, args.seed)


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="token_mask")


if __name__ == "__main__":
    main()
