"""Peak memory and time of ProtoRKD's clustering at CC3M scale: k-means + nearest-centroid labelling.

What the protorkd job runs at the start of a clustering episode (training/proto.py): faiss k-means trained
on at most --max-points-per-centroid · k sampled points (faiss's default 256, as ProtoCLIP's faiss.Kmeans), then
every row labelled by a chunked faiss search (k=1). Random unit vectors (d = 384, MiniLM's width), on the CPU.
Each (N, k) runs in a fresh child process, so its peak resident memory (ru_maxrss) is its own; the table gives
it above the child's baseline after imports, beside N·d·4 (the features themselves) and the N×k float32
score matrix a dense labelling would need.

To finish on 2 cores, k-means runs --kmeans-iter iterations (1 by default; the trainer's --kmeans-max-iter is
20): the time per iteration is measured and the extrapolation to --extrapolate-to rows multiplies it by 20.
The labelling of every row is run in full.

    PYTHONPATH=src python scripts/bench_proto_scale.py [--sizes 100000,400000,1600000] [--ks 2000,20000]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TRAINER_ITERATIONS = 20  # protorkd's --kmeans-max-iter default


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(rows: int, k: int, dim: int, iterations: int, max_points_per_centroid: int) -> dict:
    """One (rows, k) measurement, in this process."""
    sys.path.insert(0, str(SRC))
    import faiss  # noqa: F401
    import numpy as np
    import torch  # noqa: F401  (the trainer's process has torch loaded: count it in the baseline)

    from training import proto

    baseline = _rss_mib()
    generator = np.random.default_rng(0)
    points = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 1 << 16):  # filled in place: no float64 temporary of the whole set
        block = generator.standard_normal((min(1 << 16, rows - start), dim), dtype=np.float32)
        points[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    started = time.perf_counter()
    centroids = proto.train_centroids(points, k, max_iter=iterations, seed=0,
                                      max_points_per_centroid=max_points_per_centroid)
    kmeans_s = time.perf_counter() - started
    started = time.perf_counter()
    labels = proto.assign_to_centroids(points, centroids)
    assign_s = time.perf_counter() - started
    assert len(labels) == rows and int(labels.max()) < k
    return {"rows": rows, "k": k, "trained_on": min(rows, k * max_points_per_centroid),
            "kmeans_s_per_iter": kmeans_s / iterations, "assign_s": assign_s,
            "peak_above_baseline_mib": _rss_mib() - baseline, "features_mib": rows * dim * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,400000,1600000", help="row counts N, comma list")
    parser.add_argument("--ks", default="2000,20000", help="cluster counts k, comma list")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--kmeans-iter", type=int, default=1, help="k-means iterations measured")
    parser.add_argument("--max-points-per-centroid", type=int, default=256, help="faiss's k-means sampling")
    parser.add_argument("--extrapolate-to", type=int, default=2_700_000, help="rows of the extrapolation (CC3M)")
    parser.add_argument("--one", nargs=2, type=int, metavar=("ROWS", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.dim, args.kmeans_iter, args.max_points_per_centroid)))
        return

    sizes = [int(n) for n in args.sizes.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    print(f"d={args.dim}, k-means {args.kmeans_iter} iteration(s) measured, max_points_per_centroid "
          f"{args.max_points_per_centroid}, CPU threads of faiss: all of this machine's")
    print(f"{'N':>9} {'k':>6} {'trained on':>10} {'kmeans s/iter':>13} {'assign s':>9} "
          f"{'peak MiB':>9} {'N*d*4 MiB':>10} {'dense NxK MiB':>13}")
    results = {}
    for k in ks:
        for rows in sizes:
            out = subprocess.run([sys.executable, __file__, "--one", str(rows), str(k), "--dim", str(args.dim),
                                  "--kmeans-iter", str(args.kmeans_iter), "--max-points-per-centroid",
                                  str(args.max_points_per_centroid)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[rows, k] = result
            print(f"{rows:>9} {k:>6} {result['trained_on']:>10} {result['kmeans_s_per_iter']:>13.1f} "
                  f"{result['assign_s']:>9.1f} {result['peak_above_baseline_mib']:>9.0f} "
                  f"{result['features_mib']:>10.0f} {rows * k * 4 / 2**20:>13.0f}", flush=True)
    print("memory growth (peak above baseline) between consecutive N, against the N ratio:")
    for k in ks:
        ratios = [f"{b}/{a}: {results[b, k]['peak_above_baseline_mib'] / results[a, k]['peak_above_baseline_mib']:.2f}"
                  f" (N x{b / a:.0f})" for a, b in zip(sizes, sizes[1:])]
        print(f"  k={k}: " + ", ".join(ratios))
    target = args.extrapolate_to
    previous, largest = (sizes[-2], sizes[-1]) if len(sizes) > 1 else (0, sizes[-1])
    print(f"extrapolated to N={target}: memory along the line through N={previous} and N={largest}, time linear "
          f"in N from N={largest}, k-means x{TRAINER_ITERATIONS} iterations:")
    for k in ks:
        result = results[largest, k]
        peak, below = result["peak_above_baseline_mib"], (results[previous, k]["peak_above_baseline_mib"]
                                                          if previous else 0.0)
        peak_at_target = peak + (peak - below) / (largest - previous) * (target - largest)
        trained_scale = min(target, k * args.max_points_per_centroid) / result["trained_on"]
        kmeans_s = result["kmeans_s_per_iter"] * TRAINER_ITERATIONS * trained_scale
        print(f"  k={k}: peak ~{peak_at_target / 1024:.1f} GiB above baseline (the features alone: "
              f"{target * args.dim * 4 / 2**30:.1f} GiB), k-means ~{kmeans_s / 60:.1f} min, labelling "
              f"~{result['assign_s'] * target / largest / 60:.1f} min on this machine's CPU; a dense N x k float32 "
              f"score matrix would be {target * k * 4 / 2**30:.0f} GiB")

if __name__ == "__main__":
    main()
