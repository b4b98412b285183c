"""Benchmark: low-rank factorisation (ρ = 0.5, attention q/k/v/out + MLP c_fc/c_proj, every block) of a
randomly initialised ViT-B-32 image tower against the dense tower, measured side by side in one run.

    PYTHONPATH=src python scripts/bench_lowrank.py [--model ViT-B-32] [--ratio 0.5] [--batch-size 32] [--repeats 3]

Prints parameters, MACs per image (torch.utils.flop_counter) and the median wall and CPU time of `encode_image`
on a batch (compress.ops.profile.time_interleaved: dense and low-rank forwards alternate, so load from other
processes hits both alike), then the CPU-time speedup against its target.
Weights are random (no download): latency does not depend on their values.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from compress.models.registry import build_model, open_clip_spec
from compress.ops.lowrank import low_rank
from compress.ops.profile import params_and_macs, time_interleaved

TARGET = 1.85  # CPU-time speedup at rho = 0.5 (issue 26)


def image_params(model) -> int:
    return sum(p.numel() for p in model.visual.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, multi-threaded LAPACK SVD and matmuls "
                             "thrash — one 768x768 SVD took 16 s with 2 threads vs 0.15 s with 1; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = build_model(open_clip_spec(args.model)).eval()
    image_size = dense.visual.image_size[0] if isinstance(dense.visual.image_size, tuple) else dense.visual.image_size
    started = time.perf_counter()
    factorised = low_rank(dense, args.ratio, towers=("image",), targets=("attn", "mlp")).eval()
    print(f"factorised {args.model} image tower at ratio {args.ratio} in {time.perf_counter() - started:.1f}s")

    images = torch.randn(args.batch_size, 3, image_size, image_size)
    latency = time_interleaved({"dense": lambda: dense.encode_image(images),
                                "lowrank": lambda: factorised.encode_image(images)}, args.repeats)
    with torch.no_grad():
        reference = dense.encode_image(images[:4])
        error = (factorised.encode_image(images[:4]) - reference).norm() / reference.norm()
    dense_macs, lowrank_macs = (params_and_macs(m)["macs_image"] for m in (dense, factorised))
    print(f"{'':10}{'image params':>14}{'MACs/image':>14}{'wall ms':>10}{'CPU ms':>10}   (batch {args.batch_size}, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})")
    for name, model in (("dense", dense), ("low-rank", factorised)):
        timing = latency["dense" if model is dense else "lowrank"]
        print(f"{name:10}{image_params(model):>14,}{params_and_macs(model)['macs_image']:>14,}"
              f"{timing.median_wall_ms:>10.1f}{timing.median_cpu_ms:>10.1f}")
    speedup = latency["dense"].median_cpu_ms / latency["lowrank"].median_cpu_ms
    print(f"params ratio {image_params(dense) / image_params(factorised):.2f}x, MACs ratio "
          f"{dense_macs / lowrank_macs:.2f}x, wall-time ratio (dense / low-rank) "
          f"{latency['dense'].median_wall_ms / latency['lowrank'].median_wall_ms:.2f}x; relative output change of "
          f"random-init weights {error:.3f}")
    print(f"low-rank rho={args.ratio} CPU-time speedup {speedup:.2f}x; target >= {TARGET:.2f}x: "
          f"{'meets' if speedup >= TARGET else 'misses'}")


if __name__ == "__main__":
    main()
