"""`clipcompress export CKPT --format FORMAT --out DIR`: a checkpoint of any kind in a standard format.

    clipcompress export logs/lowrank/checkpoints/epoch_0.pt --format onnx --out deploy/lowrank

Formats, and what loads each:
- `safetensors`: DIR/model.safetensors + DIR/model_spec.json, any kind; `compress.load(DIR)`
  (compress.models.folder).
- `open_clip`: open_clip's local-dir layout (open_clip_config.json + open_clip_model.safetensors), for the
  models open_clip's config can describe; `open_clip.create_model_and_transforms("local-dir:DIR")`
  (compress.ops.open_clip_layout).
- `torch_export`: DIR/image.pt2 and DIR/text.pt2 (torch.export programs) + DIR/preprocessing.json;
  `torch.export.load("DIR/image.pt2").module()`, torch alone.
- `onnx`: DIR/image_encoder.onnx and DIR/text_encoder.onnx (torch.onnx, dynamo) + DIR/preprocessing.json;
  `onnxruntime.InferenceSession("DIR/image_encoder.onnx")`.

The graphs (torch_export, onnx) are batch dynamic and output normalised float32 features; preprocessing.json
says what their inputs must be (image size, resize/crop, mean/std; the tokenizer, its context length and ids,
and its vocabulary beside it). After writing, the command loads what it wrote the way a deployment would and
prints how far its features are from torch's (--no-check skips that). CKPT may also be a safetensors folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import compress
from compress.models.folder import is_model_folder
from compress.ops.export import DEFAULT_OPSET, check_export, compare_features, export_graphs
from compress.ops.open_clip_layout import check_open_clip_dir, write_open_clip_dir
from foundation.dependencies import ONNX_INSTALL, ONNX_MODULES, require
from foundation.errors import UserError
from foundation.logs import quiet_open_clip
from utils.posttrain import load_input_model

FORMATS = ("safetensors", "open_clip", "torch_export", "onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcompress export",
                                     description="export a checkpoint as a safetensors folder, open_clip's local-dir "
                                                 "layout, torch.export programs or ONNX graphs")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="our checkpoint (any kind) or safetensors folder, an open_clip weights file with "
                             "--model, or hf:DIR")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="safetensors: weights + model_spec.json (compress.load); open_clip: open_clip's "
                             "local-dir layout; torch_export: torch.export programs; onnx: ONNX graphs")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--model", default=None, help="open_clip config of a weights file that is not ours")
    parser.add_argument("--towers", default="image,text",
                        help="torch_export/onnx: comma list of the encoders to export: image, text")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="onnx: ONNX opset")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="torch_export/onnx: largest batch a token-masked (FLIP) image graph takes when its "
                             "kept patches are a table (a batch-wise mask): the table has this many rows")
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading what was written and comparing its features with torch's")
    return parser


def write(model, args, towers) -> str:
    """Write `model` in `args.format` into `args.out`; a one-line summary of what was written."""
    if args.format == "safetensors":
        compress.save(model, args.out)
        return "model.safetensors, model_spec.json"
    if args.format == "open_clip":
        write_open_clip_dir(model, args.out)
        return "open_clip_config.json, open_clip_model.safetensors"
    manifest = export_graphs(model, args.out, args.format, opset=args.opset, max_batch=args.max_batch,
                             towers=towers)
    return ", ".join(f"{tower} {graph.get('file') or '(not exported)'}" for tower, graph in manifest["graphs"].items())


def check(model, args) -> str:
    """Load what was written as a deployment would; a one-line comparison of its features with torch's."""
    if args.format == "safetensors":
        diffs, what = compare_features(model, compress.load(args.out)), "compress.load(DIR)"
    elif args.format == "open_clip":
        diffs, what = check_open_clip_dir(model, args.out), "open_clip local-dir"
    else:
        diffs = check_export(model, args.out)
        what = "onnxruntime" if args.format == "onnx" else "torch.export.load"
    return f"max |{what} - torch| of normalised features: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    quiet_open_clip()
    try:
        if args.format == "onnx":  # the [onnx] extra: checked before the model is loaded
            require("clipcompress export --format onnx", ONNX_MODULES, ONNX_INSTALL)
        towers = [t for t in args.towers.split(",") if t]
        if not towers or set(towers) - {"image", "text"}:
            raise UserError(f"--towers {args.towers}: choose from image, text")
        if args.max_batch < 1:
            raise UserError(f"--max-batch {args.max_batch}: must be at least 1")
        start = time.time()
        model = (compress.load(args.checkpoint) if is_model_folder(args.checkpoint)
                 else load_input_model(args.model, args.checkpoint))
        try:
            written = write(model, args, towers)
        except UserError:
            raise
        except ValueError as error:  # a model the graphs cannot hold as asked (e.g. a token mask's batch)
            raise UserError(str(error))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(written)
    print(f"wrote {args.out} ({args.format}, {model.model_spec['kind']}) in {time.time() - start:.1f}s")
    if not args.no_check:
        print(check(model, args))


if __name__ == "__main__":
    main()
