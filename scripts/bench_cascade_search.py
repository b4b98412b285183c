"""Is the cascaded image search faster than the large model alone on a gallery-dominated workload?

Image search indexes a large gallery once and answers far fewer queries than it has images. On the generated
corpus (a COCO-layout gallery of --gallery-size images, --queries evenly spaced caption queries), measured
side by side in one run with the same on-disk search (utils.cascade, compress.ops.cascade):

  large alone    the large CLIP indexes the whole gallery from disk and ranks every query
  level 1 alone  the cheap student alone (on its teacher's text tower)
  cascade m=…    the student indexes the gallery; each query's top m are decoded and embedded lazily by the
                 large CLIP (kept for later queries), which re-ranks them

Printed: per level, the images it decoded and embedded and the seconds it spent; per system the seconds spent
embedding the queries and the rest (faiss, ranking, files); each system's lifetime (index
+ every query), the lifetime speedup over the large model alone, R@k (image_retrieval_recall@k, ties count
against the model) and overlap@10 (eval.metrics.overlap_at_k: the share of the large model's own top 10 the
system returns, how approximate nearest-neighbour search is judged; on this gallery the large model finds the
right image for few queries, so R@10 alone says little about the cascade). Then one line per m, and the target:
some m with >= 4x lifetime speedup at overlap@10 >= 0.9.

From a clean clone, in one command (~15 min on 2 idle CPU cores: corpus, a clipc-vit-s4-64 CLIP, its distilled
1-layer ViT student, then the measurement):

    PYTHONPATH=src python scripts/bench_cascade_search.py [--work DIR]
    PYTHONPATH=src python scripts/bench_cascade_search.py --work DIR --large CLIP.pt --student STUDENT.pt  # reuse

The cheap level must be far cheaper than the large one for the gallery pass to pay: the large model is the
4-layer, width-256 clipc-vit-s4-64 (~200 M image MACs), the student a 1-layer, width-128 ViT at 32 px
inherited from it (~4 M), so level 1's pass costs little more than decoding the images. Width 128 rather than
64: on the demo gallery it lifts the shortlist's overlap@10 at m = 50 from 0.70 to 0.82 for 2.4x the student's
encode time, still a fraction of decoding (measured with the demo CLIP as teacher); overlap, not the
student's cost, bounds the cascade here.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from compress.ops.cascade import IndexOptions  # noqa: E402
from utils.cascade import Experiment, run_experiment  # noqa: E402

STUDENT_FLAGS = ["--student", "teacher", "--student-layers", "1", "--student-width", "128",
                 "--student-image-size", "32", "--inherit-from-teacher", "--distill-loss", "cosine,icl"]
TARGET_SPEEDUP, TARGET_OVERLAP = 4.0, 0.9


def run(cmd, threads: int) -> None:
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the corpus, runs and indexes (default: a temp dir)")
    parser.add_argument("--gallery-size", type=int, default=20000, help="gallery images (COCO-layout eval set)")
    parser.add_argument("--queries", type=int, default=500, help="caption queries, evenly spaced over the captions")
    parser.add_argument("--train-size", type=int, default=10000, help="training pairs for the CLIP and the student")
    parser.add_argument("--large", default=None, help="the large CLIP checkpoint (default: train one)")
    parser.add_argument("--large-model", default="clipc-vit-s4-64", help="open_clip config of the large CLIP")
    parser.add_argument("--large-epochs", type=int, default=2, help="epochs of the large CLIP's --job clip run")
    parser.add_argument("--student", default=None, help="the student checkpoint (default: distil one)")
    parser.add_argument("--distill-epochs", type=int, default=1, help="epochs of the student's --job distill run")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size of both runs")
    parser.add_argument("--train-threads", type=int, default=2, help="CPU threads of the training runs")
    parser.add_argument("--m", type=int, nargs="+", default=[20, 50, 100], help="cascades to measure")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per system (interleaved; median)")
    parser.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"], help="level-1 faiss index")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the measurement (1: stable timings on a shared machine)")
    parser.add_argument("--device", default="cpu", help="where the encoders run")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cascade_search-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    python = sys.executable
    if not (corpus / "corpus.json").is_file():
        run([python, "-m", "utils.make_corpus", "--out", str(corpus), "--train-size", str(args.train_size),
             "--eval-size", str(args.gallery_size), "--workers", "2"], args.train_threads)
    common = ["--train-data", str(corpus / "train.tsv"), "--batch-size", str(args.batch_size), "--lr", "1e-3",
              "--warmup", "20", "--workers", "1", "--logs", str(work / "logs"), "--report-to", "none",
              "--log-level", "warning"]
    large = args.large
    if large is None:
        large = str(work / "logs" / "large" / "checkpoints" / f"epoch_{args.large_epochs}.pt")
        if not Path(large).is_file():
            run([python, "-m", "training.main", "--job", "clip", "--model", args.large_model, "--epochs",
                 str(args.large_epochs), "--wd", "0.1", "--name", "large", *common], args.train_threads)
    student = args.student
    if student is None:
        student = str(work / "logs" / "student" / "checkpoints" / f"epoch_{args.distill_epochs}.pt")
        if not Path(student).is_file():
            run([python, "-m", "training.main", "--job", "distill", "--teacher-model", args.large_model,
                 "--teacher-pretrained", large, *STUDENT_FLAGS, "--epochs", str(args.distill_epochs), "--name",
                 "student", *common], args.train_threads)

    exp = Experiment(kind="speedup", name="bench_cascade_search", levels=[student, large],
                     eval_data_dir=str(corpus / "eval"), ms=[[m] for m in args.m], ks=[1, 5, 10],
                     max_queries=args.queries, repeats=args.repeats, per_query_queries=0, first_query_queries=0,
                     lifetime_queries=0, device=args.device, threads=args.threads, index=IndexOptions(args.index),
                     work_dir=str(work / "indexes"))
    started = time.perf_counter()
    summary = run_experiment(exp)
    rows = {row["system"]: row for row in summary["rows"]}
    base = rows["large alone"]
    elapsed = time.perf_counter() - started
    print(f"\n{summary['gallery']} gallery images, {summary['queries']} caption queries, level-1 index "
          f"{summary['index']}, {args.threads} thread(s); measured side by side in {elapsed:.0f} s"
          f"\nlevels: student {student}\n        large   {large}\n")
    header = f"{'system':<15} {'level':<8} {'images':>8} {'decode s':>9} {'encode s':>9}"
    overlap_name = f"overlap@{base['overlap_k']}"
    print(header + f"  {'text s':>7} {'rest s':>7} {'lifetime s':>10} {'speedup':>8} {'R@1':>6} {'R@5':>6} "
          f"{'R@10':>6} {'ΔR@10':>6} {overlap_name:>10}")
    print("-" * (len(header) + 74))
    for row in summary["rows"]:
        names = ["large"] if row["system"] == "large alone" else (["student"] if row["system"] == "level 1 alone"
                                                                   else ["student", "large"])
        for position, (name, level) in enumerate(zip(names, row["levels"])):
            cells = (f"{row['system'] if position == 0 else '':<15} {name:<8} {level['encoded']:>8} "
                     f"{level['decode_s']:>9.2f} {level['encode_s']:>9.2f}")
            if position == 0:
                rest = row["lifetime_s"] - row["image_s"] - row["text_s"]
                cells += (f"  {row['text_s']:>7.2f} {rest:>7.2f} {row['lifetime_s']:>10.2f} "
                          f"{row['lifetime_speedup']:>7.2f}x {row['R@1']:>6.2f} "
                          f"{row['R@5']:>6.2f} {row['R@10']:>6.2f} {row['dR@10']:>+6.2f} {row['overlap']:>10.2f}")
            print(cells)
    print(f"\nlifetime = index the gallery from disk (decode + embed + faiss) + embed, search and lazily re-encode for "
          f"every query; text s = embedding the queries; rest s = the lifetime's remainder (faiss index build and "
          f"search, ranking the candidates, the index folder's files); speedup = large alone "
          f"{base['lifetime_s']:.2f} s / the system's")
    cascades = summary["rows"][2:]
    for row in cascades:
        print(f"{row['system']}: lifetime {row['lifetime_s']:.2f} s vs {base['lifetime_s']:.2f} s = "
              f"{row['lifetime_speedup']:.2f}x; {overlap_name} {row['overlap']:.2f}; R@10 {row['R@10']:.2f} vs "
              f"{base['R@10']:.2f} ({row['dR@10']:+.2f}); the large model embedded "
              f"{100 * row['large_encoded_fraction']:.1f}% of the gallery")
    meeting = [row["system"] for row in cascades
               if row["lifetime_speedup"] >= TARGET_SPEEDUP and row["overlap"] >= TARGET_OVERLAP]
    print(f"target: some m with >= {TARGET_SPEEDUP:g}x lifetime speedup at {overlap_name} >= {TARGET_OVERLAP:g}: "
          + (f"meets ({', '.join(meeting)})" if meeting else "misses"))


if __name__ == "__main__":
    main()
