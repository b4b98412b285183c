"""Does a distilled student make the demo CLIP's image search faster without losing recall?

One run, side by side on the generated corpus's COCO-layout eval set (captions query the images):
  large alone      the demo CLIP embeds the gallery and ranks every caption's query
  level 1 alone    the distilled student alone (same teacher text tower)
  cascade m=…      the student shortlists m images per query, the CLIP re-ranks them (embedded lazily, cached)
Measured, not assumed: lifetime wall time (embed the gallery, then answer every query), a one-off first query
on an un-embedded gallery, warm single-query latency; R@1/5/10 (image_retrieval_recall@k) of each system.

The student must be much cheaper than the teacher for any speedup, and the demo teachers are tiny
(clipc-vit-t2-64: 2 layers × width 128 at 64 px). The default student is therefore a 1-layer, width-64 ViT
at 32 px inherited from the teacher (TinyCLIP manual inheritance) and distilled with cosine + ICL.

    PYTHONPATH=src python scripts/bench_cascade.py --teacher logs/clip_demo/checkpoints/epoch_3.pt \
        --train-data data/corpus/train.tsv --eval-data-dir data/corpus/eval [--student STUDENT.pt]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from foundation.checkpoint import load_checkpoint  # noqa: E402
from utils.cascade import Experiment, format_table, run_experiment  # noqa: E402

STUDENT_FLAGS = ["--student", "teacher", "--student-layers", "1", "--student-width", "64", "--student-image-size", "32",
                 "--inherit-from-teacher", "--distill-loss", "cosine,icl"]


def distil(teacher: str, teacher_model: str, train_data: str, logs: str, epochs: int, batch_size: int) -> str:
    """Train the default student with `--job distill`; returns its last epoch checkpoint."""
    name = "bench_cascade_student"
    cmd = [sys.executable, "-m", "training.main", "--job", "distill", "--teacher-model", teacher_model,
           "--teacher-pretrained", teacher, *STUDENT_FLAGS, "--train-data", train_data, "--epochs", str(epochs),
           "--batch-size", str(batch_size), "--lr", "1e-3", "--warmup", "20", "--workers", "1",
           "--logs", logs, "--name", name, "--report-to", "none", "--log-level", "warning"]
    print("distilling:", " ".join(cmd[1:]), flush=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(SRC)}
    subprocess.run(cmd, check=True, env=env)
    return str(Path(logs) / name / "checkpoints" / f"epoch_{epochs}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the demo CLIP: a --job clip checkpoint")
    parser.add_argument("--eval-data-dir", required=True, help="eval root holding coco2017/")
    parser.add_argument("--student", default=None, help="a --job distill checkpoint (default: distil one now)")
    parser.add_argument("--train-data", default=None, help="training TSV for distilling the student")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--distill-batch-size", type=int, default=64)
    parser.add_argument("--logs", default=None, help="where the distilled student goes (default: a temp dir)")
    parser.add_argument("--m", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lifetime-queries", type=int, default=30,
                        help="also time a lifetime of only this many queries (0: only all captions)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch's default)")
    parser.add_argument("--plot", default=None, help="recall-vs-speedup PNG")
    args = parser.parse_args()

    student = args.student
    if student is None:
        if not args.train_data:
            parser.error("give --student, or --train-data to distil one")
        teacher_model = load_checkpoint(args.teacher)["model_spec"]["model"]
        student = distil(args.teacher, teacher_model, args.train_data, args.logs or tempfile.mkdtemp(),
                         args.distill_epochs, args.distill_batch_size)

    exp = Experiment(kind="speedup", name="bench_cascade", levels=[student, args.teacher],
                     eval_data_dir=args.eval_data_dir, ms=[[m] for m in args.m], repeats=args.repeats,
                     per_query_queries=50, first_query_queries=3, lifetime_queries=args.lifetime_queries,
                     device=args.device, plot=args.plot, threads=args.threads)
    summary = run_experiment(exp)
    print(format_table(summary, exp.ks))
    recall = {k: summary["rows"][0][f"R@{k}"] for k in exp.ks}
    print(f"large alone: R@1 {recall[1]:.2f}  R@5 {recall[5]:.2f}  R@10 {recall[10]:.2f}")
    def verdict(speedup: float, row) -> str:
        return "meets" if speedup >= 4 and row["dR@10"] >= -0.5 else "misses"

    for row in summary["rows"][2:]:
        sparse = (f"; {row['sparse_queries']}-query lifetime {row['sparse_lifetime_speedup']:.2f}x "
                  f"(large model embedded {100 * row['sparse_large_encoded_fraction']:.0f}%)"
                  if "sparse_queries" in row else "")
        print(f"{row['system']}: ΔR@10 {row['dR@10']:+.2f} points; all-caption lifetime {row['lifetime_speedup']:.2f}x "
              f"(image embedding {row['image_speedup']:.2f}x, large model embedded "
              f"{100 * row['large_encoded_fraction']:.0f}% of the gallery){sparse}; first query "
              f"{row['first_query_speedup']:.2f}x. Target (>= 4x, R@10 within 0.5): all-caption lifetime "
              f"{verdict(row['lifetime_speedup'], row)}, first query {verdict(row['first_query_speedup'], row)}")

if __name__ == "__main__":
    main()
