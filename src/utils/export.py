"""`clipcompress export CKPT --format onnx --out DIR`: a checkpoint of any kind as deployable graphs.

    clipcompress export logs/lowrank/checkpoints/epoch_0.pt --format onnx --out deploy/lowrank

Writes `DIR/image_encoder.onnx`, `DIR/text_encoder.onnx` (batch dynamic, normalised float32 features) and
`DIR/preprocessing.json` (image size, resize/crop, mean/std; the tokenizer, its context length and ids, and
its vocabulary beside it), then runs both graphs in onnxruntime on a fresh batch and prints how far their
features are from torch's. The export is `compress.ops.export.export_onnx`; this module is its command line.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from compress.ops.export import DEFAULT_OPSET, check_export, export_onnx
from foundation.errors import UserError
from foundation.logs import quiet_open_clip
from utils.posttrain import load_input_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcompress export",
                                     description="export a checkpoint's image and text encoders as ONNX graphs")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="our checkpoint (any kind), or an open_clip weights file with --model, or hf:DIR")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="graph format")
    parser.add_argument("--out", required=True, help="folder for the graphs and preprocessing.json")
    parser.add_argument("--model", default=None, help="open_clip config of a weights file that is not ours")
    parser.add_argument("--towers", default="image,text", help="comma list of the encoders to export: image, text")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="largest batch a token-masked (FLIP) image graph takes: its kept patches are a "
                             "table of this many rows")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the graphs in onnxruntime against torch after the export")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    quiet_open_clip()
    try:
        towers = [t for t in args.towers.split(",") if t]
        if not towers or set(towers) - {"image", "text"}:
            raise UserError(f"--towers {args.towers}: choose from image, text")
        if args.max_batch < 1:
            raise UserError(f"--max-batch {args.max_batch}: must be at least 1")
        start = time.time()
        model = load_input_model(args.model, args.checkpoint)
        try:
            manifest = export_onnx(model, args.out, opset=args.opset, max_batch=args.max_batch, towers=towers)
        except ValueError as error:
            raise UserError(str(error))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for tower, graph in manifest["graphs"].items():
        print(f"{tower:5s} {graph.get('file') or '(not exported)'}")
    print(f"wrote {args.out} ({manifest['model_kind']}) in {time.time() - start:.1f}s")
    if not args.no_check:
        diffs = check_export(model, args.out)
        print("max |onnxruntime - torch| of normalised features: "
              + ", ".join(f"{tower} {diff:.2e}" for tower, diff in diffs.items()))


if __name__ == "__main__":
    main()
