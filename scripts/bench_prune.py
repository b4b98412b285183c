"""Speed of structured pruning: a (random-init) open_clip ViT-B-32 image tower, dense vs pruned at p = 0.5
and p = 0.75, measured side by side in one run.

    PYTHONPATH=src python scripts/bench_prune.py                  # CPU, batch 32
    PYTHONPATH=src python scripts/bench_prune.py --device cuda --repeats 20 --round-to 64
    PYTHONPATH=src python scripts/bench_prune.py --round-to 8,16   # rounded widths beside the unrounded ones

The masks come from weight magnitudes (compress.models.pruning.magnitude_prune_scores) through the same unified
allocation the prune job uses, applied to the image tower only: no data is needed to measure speed, and
the pruned shapes are what a search at the same p yields up to which units are cut. Latencies are medians
of interleaved repeats (each round times every model once, so machine load hits them alike). On a shared
CPU the wall time is at the mercy of other processes, so the process CPU time of each forward is printed
too (on an idle machine the two speedups agree; under load the CPU-time one is the steadier).

`--round-to 8,16` adds, for each p, the same allocation with every pruned head dim and MLP width rounded to a
multiple of each N within the same parameter budget (`allocate_masks(..., round_to=N)`), timed in the same
interleaved rounds, so the speedup with and without rounding is measured side by side.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from compress.models import pruning
from compress.models.compact_clip import to_compact
from compress.models.registry import build_model
from compress.ops.profile import params_and_macs, time_interleaved

# CPU-time speedup over the dense tower each p must reach with its widths rounded (--round-to 8; issue 26)
TARGETS = {0.5: 1.95, 0.75: 3.8}


def prune_image_tower(model, p: float, prune_heads: bool, round_to: int = 1):
    masks = pruning.init_masks(model, prune_heads=prune_heads, towers=("image",))
    scores = pruning.magnitude_prune_scores(model, masks)
    final = pruning.allocate_masks(scores, pruning.mask_costs(model, masks), target=p, p=p, round_to=round_to)
    return pruning.prune_clip(model, final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip ViT config (random init)")
    parser.add_argument("--ps", default="0.5,0.75", help="comma-separated pruned fractions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--prune-heads", action="store_true", help="whole heads instead of head dims")
    parser.add_argument("--round-to", default="", help="comma list of multiples N: also time each p with widths "
                                                       "rounded to N (e.g. 8,16 for CPUs, 64 for GPUs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = build_model({"kind": "open_clip", "model": args.model}).eval()
    models = {"dense (nn.MultiheadAttention)": dense,
              "dense (CompactBlock, nothing cut)": to_compact(copy.deepcopy(dense))}
    for p in (float(x) for x in args.ps.split(",")):
        models[f"pruned p={p:g}"] = prune_image_tower(models["dense (CompactBlock, nothing cut)"], p,
                                                      args.prune_heads)
        for multiple in (int(x) for x in args.round_to.split(",") if x):
            models[f"pruned p={p:g}, widths x{multiple}"] = prune_image_tower(
                models["dense (CompactBlock, nothing cut)"], p, args.prune_heads, round_to=multiple)

    size = {name: params_and_macs(m) for name, m in models.items()}
    image_params = {name: sum(q.numel() for q in m.visual.parameters()) for name, m in models.items()}
    image_size = dense.visual.image_size
    image_size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    images = torch.randn(args.batch_size, 3, *image_size, device=device)
    towers = {name: m.visual.to(device) for name, m in models.items()}

    latency = time_interleaved({name: (lambda tower=tower: tower(images)) for name, tower in towers.items()},
                               args.repeats, args.warmup, device)

    base = "dense (nn.MultiheadAttention)"
    base_ms, base_cpu = latency[base].median_wall_ms, latency[base].median_cpu_ms
    base_macs = size[base]["macs_image"]
    print(f"{args.model} image tower, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; masks from weight magnitude, {'head' if args.prune_heads else 'head-dim'} units; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'model':38s} {'params':>9s} {'GMACs/img':>9s} {'MAC ratio':>9s} {'wall ms':>9s} {'speedup':>8s} "
          f"{'CPU ms':>9s} {'speedup':>8s}")
    for name in towers:
        ms, cpu = latency[name].median_wall_ms, latency[name].median_cpu_ms
        macs = size[name]["macs_image"]
        print(f"{name:38s} {image_params[name] / 1e6:8.2f}M {macs / 1e9:9.3f} {base_macs / macs:8.2f}x "
              f"{ms:9.1f} {base_ms / ms:7.2f}x {cpu:9.1f} {base_cpu / cpu:7.2f}x")
    for p, target in TARGETS.items():
        for name in [name for name in towers if name.startswith(f"pruned p={p:g}, widths x")]:
            speedup = base_cpu / latency[name].median_cpu_ms
            print(f"{name}: CPU-time speedup {speedup:.2f}x; target >= {target:.2f}x: "
                  f"{'meets' if speedup >= target else 'misses'}")
    for name in towers:
        if name.startswith("pruned"):
            widths = pruning.layer_shapes(models[name])["image"]
            print(f"{name}: head_dim per layer {[w['head_dim'] for w in widths]}, "
                  f"heads {[w['heads'] for w in widths]}, mlp {[w['mlp_width'] for w in widths]}")


if __name__ == "__main__":
    main()
