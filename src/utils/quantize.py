"""`clipcompress quantize`: int8 quantisation of the Linears of any model kind (the last step of a chain).

    clipcompress quantize --pretrained CKPT --out RUN_DIR [--scheme int8_dynamic|int8_weight_only]

The operation is `compress.ops.quantize.quantize`; the stored format is the `quantized` kind
(compress.models.quantized); this module is its command line.
"""
import argparse

from compress.models.quantized import SCHEMES
from compress.ops.quantize import quantize
from utils.posttrain import base_parser, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("int8 quantisation of a model's Linears (dynamic activations or weight-only)",
                         calibration=False, prog="clipcompress quantize")
    parser.add_argument("--scheme", choices=SCHEMES, default="int8_dynamic",
                        help="int8_dynamic: int8 weights and per-token int8 activations (int8 GEMMs); "
                             "int8_weight_only: int8 weights dequantised into a float GEMM (smaller, not faster)")
    parser.add_argument("--towers", default="image,text",
                        help="comma list of towers whose Linears are quantised: image, text (default both)")
    return parser


def transform(model, args, _batches):
    return quantize(model, args.scheme, towers=args.towers.split(","))


def main(argv=None) -> None:
    run_tool(build_parser(), argv, transform, tool="quantize", calibrate=False)


if __name__ == "__main__":
    main()
