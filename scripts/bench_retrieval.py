"""How much does exact, chunked retrieval recall cost over the bare similarity matmul it cannot avoid?

COCO val2017 scale by default: 5k images × 25k captions (5 per image), dim 512, random unit vectors.
Measures, side by side in one run (alternating, median of --repeats):
  matmul     img @ txt.T                       the floor: every recall needs every similarity once
  recall     eval.metrics.retrieval_metrics    both directions (i2t and t2i) and all k from one pass over
                                               the similarities, in memory-bounded chunks of image rows

    PYTHONPATH=src python scripts/bench_retrieval.py [--images 5000 --captions-per-image 5 --dim 512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from compress.ops.profile import time_interleaved  # noqa: E402
from eval.metrics import DEFAULT_CHUNK_ELEMENTS, retrieval_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator), dim=-1).to(device)
    num_captions = args.images * args.captions_per_image
    captions = torch.nn.functional.normalize(torch.randn(num_captions, args.dim, generator=generator),
                                             dim=-1).to(device)
    caption_image = torch.arange(num_captions, device=device) // args.captions_per_image

    # one warm-up round (allocator, kernels); the full similarity matrix is dropped as soon as it is made
    latency = time_interleaved({"matmul": lambda: images @ captions.T,
                                "recall": lambda: retrieval_metrics(images, captions, caption_image)},
                               args.repeats, warmup=1, device=device)
    matmul_s, recall_s = (latency[name].median_wall_ms / 1000 for name in ("matmul", "recall"))
    full_matrix_mib = args.images * num_captions * 4 / 2**20
    chunk_mib = DEFAULT_CHUNK_ELEMENTS * 4 / 2**20
    print(f"{args.images} images x {num_captions} captions, dim {args.dim}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"bare matmul img @ txt.T        : {matmul_s * 1000:9.1f} ms  "
          f"(holds the full {full_matrix_mib:.0f} MiB matrix)")
    print(f"retrieval_metrics (i2t + t2i)  : {recall_s * 1000:9.1f} ms  (chunks of <= {chunk_mib:.0f} MiB of scores)")
    print(f"ratio recall / matmul          : {recall_s / matmul_s:9.2f}x")


if __name__ == "__main__":
    main()
