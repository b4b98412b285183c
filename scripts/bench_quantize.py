"""Benchmark: int8 quantisation (compress.ops.quantize) — latency ratio on a ViT-B-32 image tower and on the
demo model, and the zero-shot / retrieval change of the trained demo model, measured side by side in one run.

    PYTHONPATH=src python scripts/bench_quantize.py                          # trains a tiny demo CLIP first
    PYTHONPATH=src python scripts/bench_quantize.py --checkpoint CKPT --eval-data-dir DIR

Latency: float (the dense open_clip model; its compact-block form too, the exact float twin that quantisation
starts from), `int8_dynamic`, `int8_weight_only` and, for reference, torch.ao's deprecated dynamic quantisation
of the same compact model, timed in interleaved repeats (so load from other processes hits all alike); wall and
process CPU time, median. ViT-B-32 weights are random (latency does not depend on them).

Accuracy: without `--checkpoint`, the embedded corpus is generated (`utils.make_corpus`, `--train-size`) and a
clipc-vit-t2-64 CLIP trained on it by the trainer (`python -m training.main --job clip`, `--epochs`); then the
float and the int8 models are scored by the same eval code the monitor uses (zero-shot, retrieval).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

import compress
from compress.models.compact_clip import clone, to_compact
from compress.models.registry import build_model, open_clip_spec
from compress.ops.profile import model_size_bytes, time_interleaved
from compress.ops.quantize import quantize

REPO = Path(__file__).resolve().parents[1]


def variants(dense):
    import warnings

    compact = to_compact(clone(dense))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (what this row is a reference for)
        reference = torch.ao.quantization.quantize_dynamic(clone(compact), {torch.nn.Linear}, dtype=torch.qint8)
        per_channel = torch.ao.quantization.quantize_dynamic(
            clone(compact), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    return {"float (open_clip)": dense, "float (compact blocks)": compact,
            "int8_dynamic": quantize(dense, "int8_dynamic"), "int8_weight_only": quantize(dense, "int8_weight_only"),
            "torch.ao dynamic (reference)": reference, "torch.ao per-channel (ref.)": per_channel}


def time_towers(models, images, text, repeats):
    """{name: {tower: (wall ms, cpu ms)}}, medians of interleaved repeats after one warm-up each."""
    towers = {"image": lambda m: m.encode_image(images)}
    if text is not None:
        towers["text"] = lambda m: m.encode_text(text)
    latency = time_interleaved({(name, tower): (lambda model=model, call=call: call(model))
                                for name, model in models.items() for tower, call in towers.items()}, repeats)
    return {name: {tower: (latency[name, tower].median_wall_ms, latency[name, tower].median_cpu_ms)
                   for tower in towers} for name in models}


def print_latency(title, models, timings):
    base = timings["float (open_clip)"]
    print(title)
    print(f"{'model':30s} {'tower':5s} {'MB':>8s} {'wall ms':>9s} {'ratio':>7s} {'CPU ms':>9s} {'ratio':>7s}")
    for name, towers in timings.items():
        size = model_size_bytes(models[name]) / 1e6 if "torch.ao" not in name else float("nan")
        for tower, (wall, cpu) in towers.items():
            print(f"{name:30s} {tower:5s} {size:8.2f} {wall:9.1f} {base[tower][0] / wall:6.2f}x "
                  f"{cpu:9.1f} {base[tower][1] / cpu:6.2f}x")
    # the target is against torch.ao's default (per-tensor weights); ours stores one scale per output channel,
    # so torch.ao with per-channel weights is the same scheme on the same kernel
    for reference_name in ("torch.ao dynamic (reference)", "torch.ao per-channel (ref.)"):
        reference = timings[reference_name]
        for tower, (_, cpu) in timings["int8_dynamic"].items():
            ratio = reference[tower][1] / cpu
            print(f"int8_dynamic vs {reference_name}, {tower} tower: {ratio:.2f}x CPU time (reference "
                  f"{reference[tower][1]:.1f} ms / ours {cpu:.1f} ms); target >= 1.00x: "
                  f"{'meets' if ratio >= 1.0 else 'misses'}")


def train_demo(work: Path, train_size: int, epochs: int) -> Path:
    """A tiny trained demo CLIP (the trainer on the embedded corpus); its last checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    corpus = work / "corpus"
    if not (corpus / "train.tsv").is_file():
        subprocess.run([sys.executable, "-m", "utils.make_corpus", "--out", str(corpus), "--train-size",
                        str(train_size), "--eval-size", "500", "--workers", "1"], check=True, env=env)
    checkpoint = work / "logs" / "demo" / "checkpoints" / f"epoch_{epochs}.pt"
    if not checkpoint.is_file():
        subprocess.run([sys.executable, "-m", "training.main", "--job", "clip", "--model", "clipc-vit-t2-64",
                        "--train-data", str(corpus / "train.tsv"), "--batch-size", "64", "--epochs", str(epochs),
                        "--lr", "1e-3", "--wd", "0.1", "--warmup", "20", "--workers", "1", "--logs-root",
                        str(work / "logs"), "--name", "demo", "--log-level", "warning"], check=True, env=env)
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vit", default="ViT-B-32", help="open_clip config of the large image tower (random init)")
    parser.add_argument("--checkpoint", default=None, help="a trained demo checkpoint (default: train one)")
    parser.add_argument("--eval-data-dir", default=None, help="eval sets (default: the generated corpus's)")
    parser.add_argument("--work-dir", default="/tmp/clipcompress_bench_quantize",
                        help="where the corpus and the trained demo model go")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vit = build_model(open_clip_spec(args.vit)).eval()
    models = variants(vit)
    size = vit.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch_size, 3, size, size)
    print_latency(f"{args.vit} image tower, batch {args.batch_size}, {torch.get_num_threads()} thread(s), median of "
                  f"{args.repeats}; load average {os.getloadavg()[0]:.1f}", models,
                  time_towers(models, images, None, args.repeats))
    del models, vit

    work = Path(args.work_dir)
    checkpoint = Path(args.checkpoint) if args.checkpoint else train_demo(work, args.train_size, args.epochs)
    eval_dir = args.eval_data_dir or str(work / "corpus" / "eval")
    dense = compress.load(str(checkpoint))
    models = variants(dense)
    from eval import encoder_from_model, run_benchmarks
    from eval.models import image_size_of_transform

    encoders = {name: encoder_from_model(model) for name, model in models.items() if "torch.ao" not in name}
    side = image_size_of_transform(encoders["float (open_clip)"].preprocess)
    text = encoders["float (open_clip)"].text_input(["a photo of a small red circle"] * args.batch_size)
    print()
    print_latency(f"demo model {checkpoint}, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f}", models,
                  time_towers(models, torch.randn(args.batch_size, 3, side, side), text, args.repeats))
    print()
    scores = {name: run_benchmarks(encoder, eval_dir, benchmarks=("zeroshot", "retrieval"), workers=0)
              for name, encoder in encoders.items()}
    columns = sorted(c for c in scores["float (open_clip)"] if c.endswith(("/acc1", "_recall@1", "_recall@10")))
    print(f"accuracy on {eval_dir} (change against float)")
    def label(column: str) -> str:  # retrieval/coco2017/image_retrieval_recall@10 → coco2017 t2i R@10
        parts = column.split("/")
        name = parts[-1].replace("image_retrieval_recall@", "t2i R@").replace("text_retrieval_recall@", "i2t R@")
        return f"{parts[1]} {name}"

    print(f"{'model':26s} " + " ".join(f"{label(c):>30s}" for c in columns))
    base = scores["float (open_clip)"]
    for name, values in scores.items():
        print(f"{name:26s} " + " ".join(f"{values[c]:>12.4f} ({values[c] - base[c]:+.4f})      " for c in columns))


if __name__ == "__main__":
    main()
