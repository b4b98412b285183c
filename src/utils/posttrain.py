"""What every post-training tool's command line shares: load a CLIP, calibrate, transform, write a run folder.

`--out` is a run folder: the tool writes `OUT/checkpoints/epoch_0.pt` and `OUT/params.txt`, which is what the
monitor (`python src/utils/evaluate_checkpoints.py --logs-dir OUT --once --eval-data-dir ...`) and
`eval.load_encoder(OUT/checkpoints/epoch_0.pt)` read. An `--out` ending in `.pt` writes just that file.
`--pretrained` is one of our checkpoints (any epoch_N.pt of a clip run, or another tool's output: tools chain),
or a stock open_clip weights file for `--model`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import compress
from compress.models.hf_clip import is_hf_source, load_hf_clip
from compress.models.pretrained import create_clip
from compress.models.registry import get_preprocess, get_tokenizer
from compress.ops.calibration import Batch
from compress.ops.profile import profile_model
from eval.data import find_coco_root, find_flickr_root, load_coco_captions, load_flickr30k
from eval.models import image_size_of_transform
from foundation.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from foundation.errors import UserError
from foundation.images import open_rgb
from foundation.logs import quiet_open_clip
from training.data.csv_dataset import CsvDataset
from training.data.samples import BatchCollator


def add_tower_flags(parser: argparse.ArgumentParser) -> None:
    """--towers / --layers, shared by the tools that edit chosen transformer blocks."""
    parser.add_argument("--towers", default="image", help="comma list of towers: image, text (default image)")
    parser.add_argument("--layers", default="all", help="comma list of block indices in each tower (default all)")


def parse_layers(text: Optional[str]) -> Optional[List[int]]:
    """'all' (or empty) → None, '0,2' → [0, 2]."""
    return None if text in (None, "", "all") else [int(t) for t in text.split(",")]


def base_parser(description: str, calibration: bool = True, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default=None,
                        help="open_clip config name (needed when --pretrained is not one of our checkpoints)")
    parser.add_argument("--pretrained", required=True,
                        help="our checkpoint (epoch_N.pt, any model kind this tool accepts), an open_clip "
                             "weights file (with --model), or hf:DIR, a local Hugging Face CLIPModel folder")
    parser.add_argument("--out", required=True,
                        help="run folder to write (OUT/checkpoints/epoch_0.pt + OUT/params.txt), or a .pt file path")
    parser.add_argument("--device", default="cpu", help="device for calibration and surgery (cpu, cuda, cuda:1)")
    parser.add_argument("--profile", action="store_true",
                        help="print params, MACs and measured latency of the input and output models")
    if calibration:
        group = parser.add_argument_group("calibration data")
        group.add_argument("--calib-data", default=None,
                           help="TSV/CSV of image paths and captions (the training format), or an eval data root "
                                "with coco2017/ or flickr30k/ (casCLIP's flickr30/ too), or that folder itself: its "
                                "images with their first captions")
        group.add_argument("--calib-batches", type=int, default=8, help="number of calibration batches")
        group.add_argument("--calib-batch-size", type=int, default=32, help="calibration batch size")
        group.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration row subset")
        group.add_argument("--csv-separator", default="\t", help="column separator of a --calib-data TSV/CSV")
        group.add_argument("--csv-img-key", default="filepath",
                           help="column of a --calib-data TSV/CSV with image paths "
                                "(relative to its folder or absolute)")
        group.add_argument("--csv-caption-key", default="title", help="column of a --calib-data TSV/CSV with captions")
    return parser


def load_input_model(model_name: Optional[str], pretrained: str) -> nn.Module:
    """Our checkpoint via compress.load, `hf:DIR` (a local transformers CLIPModel folder, converted to open_clip:
    compress.models.hf_clip), else open_clip `model_name` with a weights file."""
    if is_hf_source(pretrained):
        return load_hf_clip(pretrained, model_name)
    if not os.path.exists(pretrained):
        raise UserError(f"--pretrained {pretrained}: no such file")
    # a regular file only (a FIFO or a device is refused unread), checked before torch reads a tensor:
    # its own one-line CheckpointRefused for a bad file
    checkpoint = load_checkpoint(pretrained)
    if isinstance(checkpoint, dict) and "model_spec" in checkpoint:
        spec = checkpoint["model_spec"]
        if model_name and spec.get("model") not in (None, model_name):
            raise UserError(f"--model {model_name} does not match the checkpoint's model {spec.get('model')!r}")
        return compress.load(checkpoint)
    if not model_name:
        raise UserError(f"{pretrained} is not one of our checkpoints: pass --model NAME for its architecture")
    return create_clip(model_name, pretrained).eval()


class _CaptionedImages:
    """(image path, caption) pairs as the training data's samples: index, image, text, caption."""

    def __init__(self, pairs, transform: Callable):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Batch:
        path, caption = self.pairs[index]
        pixels = self.transform(open_rgb(path))  # the training data's decoding rules (foundation.images)
        return {"index": index, "image": pixels, "caption": caption, "skipped_reasons": []}


def calibration_batches(source: str, spec: Dict[str, Any], num_batches: int, batch_size: int, seed: int = 0,
                        sep: str = "\t", img_key: str = "filepath", caption_key: str = "title") -> List[Batch]:
    """`num_batches` batches of a seeded random subset of `source`, held in memory.

    source: a TSV/CSV in the training format, or an eval data root (or its coco2017 / Flickr30k folder), whose
    retrieval images (COCO val2017, else Flickr30k) are paired with their first caption (one caption per image:
    a contrastive batch must not hold the same image twice).
    """
    transform, tokenizer = get_preprocess(spec), get_tokenizer(spec)
    path = Path(source)
    if path.is_dir():
        coco, flickr = find_coco_root(path), find_flickr_root(path)
        if coco is None and flickr is None:
            raise UserError(f"--calib-data {source}: a folder must be an eval data root with "
                            "coco2017/annotations/captions_val2017.json or flickr30k/ (flickr30/) holding "
                            "flickr30k_images/ and results.csv, or one of those folders (or pass a TSV)")
        retrieval = load_coco_captions(coco) if coco is not None else load_flickr30k(flickr)
        first_caption = {}
        for caption, image_index in zip(retrieval.captions, retrieval.text_to_image):
            first_caption.setdefault(image_index, caption)
        pairs = [(retrieval.image_paths[i], first_caption[i]) for i in sorted(first_caption)]
        dataset = _CaptionedImages(pairs, transform)
    else:
        dataset = CsvDataset(source, transform, img_key=img_key, caption_key=caption_key, sep=sep)
    count = min(len(dataset), num_batches * batch_size)
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False,
                        collate_fn=BatchCollator(tokenizer))
    return [{"image": b["image"], "text": b["text"]} for b in loader]


def needs_calibration(args) -> List[Any]:
    if not args.calib_data:
        raise UserError("this tool needs calibration data: pass --calib-data TRAIN.tsv (image paths + captions) "
                        "or --calib-data EVAL_DIR (with coco2017/ or flickr30k/)")
    return calibration_batches(args.calib_data, args.spec, args.calib_batches, args.calib_batch_size,
                               seed=args.calib_seed, sep=args.csv_separator, img_key=args.csv_img_key,
                               caption_key=args.csv_caption_key)


def write_output(model: nn.Module, out: str, tool: str, args: argparse.Namespace) -> Path:
    """Write `model` as our checkpoint (and params.txt beside checkpoints/ for a run folder)."""
    out_path = Path(out)
    is_file = out_path.suffix == ".pt"
    checkpoint_path = out_path if is_file else out_path / "checkpoints" / "epoch_0.pt"
    name = out_path.stem if is_file else out_path.name
    state = {
        "epoch": 0,
        "step": 0,
        "name": name,
        "job": tool,
        "model_spec": model.model_spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "source": str(args.pretrained),
    }
    save_checkpoint(state, checkpoint_path)
    if not is_file:
        lines = [f"job: {tool}", f"name: {name}", f"model: {model.model_spec.get('model')}"]
        lines += [f"{key}: {getattr(args, key)}" for key in sorted(vars(args))
                  if key not in ("spec", "model", "name", "job")]
        # atomic like the checkpoint: the monitor may read params.txt of a run folder while it is written
        atomic_write_bytes(out_path / "params.txt", "".join(line + "\n" for line in lines).encode("utf-8"))
    return checkpoint_path


def _summary(model: nn.Module, profile: bool) -> Dict[str, float]:
    if not profile:
        return {"params": sum(p.numel() for p in model.parameters())}
    image_size = image_size_of_transform(get_preprocess(model.model_spec))
    return profile_model(model, image_size, batch_size=32, repeats=5)


def run_tool(parser: argparse.ArgumentParser, argv, transform: Callable[[nn.Module, Any, Optional[list]], nn.Module],
             tool: str, calibrate: bool = True) -> None:
    """Parse flags, load, (calibrate), transform, write; user errors exit 2 with one line.

    calibrate=False: the transform loads calibration batches itself, only when its flags need them.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    quiet_open_clip()
    try:
        start = time.time()
        model = load_input_model(args.model, args.pretrained).to(args.device)
        args.spec = model.model_spec
        batches = needs_calibration(args) if calibrate and hasattr(args, "calib_data") else None
        before = _summary(model, args.profile)
        try:
            result = transform(model, args, batches)
        except ValueError as e:  # a flag value the model cannot satisfy (layer out of range, bad ratio…)
            raise UserError(str(e))
        after = _summary(result, args.profile)
        path = write_output(result, args.out, tool, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key in after:
        if key in before and key != "latency_batch_size" and isinstance(after[key], (int, float)) and before[key]:
            logging.info("%-18s %14.4g -> %14.4g  (x%.3f)", key, before[key], after[key], after[key] / before[key])
    logging.info("wrote %s in %.1fs", path, time.time() - start)
