"""Do the methods work? The seeds' headline claims, reproduced in direction on the generated corpus.

    PYTHONPATH=src python scripts/reproduce_claims.py --out logs/claims            # full: >= 3 seeds per arm
    PYTHONPATH=src python scripts/reproduce_claims.py --out /tmp/claims --quick    # smoke test: 1 seed, tiny

It generates the corpus (`utils.make_corpus`), trains a teacher CLIP (`--job clip`), then runs every arm
through the real entry points (`python -m training.main` subprocesses, `python -m utils.lowrank`) and
scores each final checkpoint with the evaluation API the monitor uses (`eval.run_benchmarks`). For each claim
it prints the mean ± std (over seeds) of both arms, the teacher's own number where it has one, and whether
the claimed direction holds:

  001  UPop + cross-modal KD (CLIP-KDPruning): KD beats no KD at p = 0.75, right after the search and after
       the fine-tune (R@1, image→text and text→image);
  004  ProtoRKD: the student distilled from a text teacher beats the same student trained without one, same
       steps (linear-probe accuracy of the image tower);
  KD   CLIP-KD: a student trained with FD + ICL + CRD beats one trained with the cosine loss only (zero-shot);
  002  Cascade CLIP: the distilled student's top-20 zero-shot accuracy beats the teacher's top-1;
  003  low rank (HPML): zero-shot accuracy falls monotonically with the number of factorised image layers.

Retrieval (001) is scored on a set of its own (`utils.make_corpus.make_distinct_retrieval_set`): no two images
share a scene and every caption names all of its image's attributes, so each caption fits one image and R@1
can reach 1. The corpus's own COCO-style set repeats scenes and leaves attributes out of captions, so several
images fit a caption equally and R@1 stays near chance whatever the model.

`--quick` is a smoke test of the whole pipeline (one seed, tiny sizes): it asserts nothing about direction.
Every run is seeded with --seed, so the same command prints the same table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))

# Sizes of each mode. Models: clipc-vit-t2-* (2 blocks per tower, width 64 or 32 px images). The teacher trains
# teacher_epochs over train_size samples (200k samples in full, 80k in small: a 64 px model trains about 50
# samples/s on one busy core, a 32 px one about 200), so `full` is for an idle machine with time and `small`
# fits in about half an hour of a shared 2-core one; `quick` is the smoke test. retrieval_size: images of the
# distinct-scene retrieval set (5 captions each); prune_samples: samples of each of the search and the
# fine-tune epoch (the search updates the masks every prune_interval steps of batch_size).
MODES = {
    "full": dict(train_size=20000, eval_size=1000, image_size=64, shard_size=1000, model="clipc-vit-t2-64",
                 seeds=(0, 1, 2), batch_size=64, teacher_epochs=10, teacher_lr=1e-3, teacher_warmup=50,
                 retrieval_size=1000, prune_samples=8192, prune_interval=4, prune_lr=2e-4, arm_epochs=2,
                 arm_samples=5000, arm_lr=1e-3, eval_batch_size=256),
    # the full protocol (3 seeds per arm) on half the data at half the image side: what fits when the machine
    # is shared
    "small": dict(train_size=10000, eval_size=300, image_size=32, shard_size=1000, model="clipc-vit-t2-32",
                  seeds=(0, 1, 2), batch_size=64, teacher_epochs=8, teacher_lr=1e-3, teacher_warmup=50,
                  retrieval_size=500, prune_samples=4096, prune_interval=2, prune_lr=2e-4, arm_epochs=2,
                  arm_samples=2000, arm_lr=1e-3, eval_batch_size=256),
    "quick": dict(train_size=256, eval_size=72, image_size=32, shard_size=64, model="clipc-vit-t2-32",
                  seeds=(0,), batch_size=32, teacher_epochs=1, teacher_lr=1e-3, teacher_warmup=2,
                  retrieval_size=72, prune_samples=64, prune_interval=1, prune_lr=2e-4, arm_epochs=1,
                  arm_samples=64, arm_lr=1e-3, eval_batch_size=72),
}
P = 0.75  # CLIP-KDPruning's headline compression
LOW_RANK_RATIO = 0.5  # HPML's ρ
CASCADE_K = 20  # Cascade CLIP: student top-20 against teacher top-1


def env() -> Dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(SRC) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("OMP_NUM_THREADS", "1")  # one thread per run: runs go side by side (--parallel)
    return out


def run(cmd: Sequence[str], log: Path, done: Path) -> None:
    """One entry point as a subprocess; its output goes to `log`, a failure stops the harness with its tail.
    A run whose last checkpoint `done` exists is not repeated: an interrupted harness continues where it was."""
    if done.exists():
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, *cmd], cwd=REPO, env=env(), stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def trainer(name: str, logs: Path, *flags: str) -> List[str]:
    return ["-m", "training.main", *flags, "--logs", str(logs), "--name", name, "--log-level", "warning",
            "--report-to", "none", "--workers", "1"]


def score(checkpoint: Path, eval_dir: Path, cfg, teacher: Path, benchmark: str) -> Dict[str, float]:
    """The monitor's metrics of one benchmark for one checkpoint (zero-shot at k = 1 and CASCADE_K); one at a
    time, as the linear probe's weight-decay search is the slowest part of the scoring."""
    from eval.benchmarks import run_benchmarks
    from eval.models import load_encoder

    encoder = load_encoder(str(checkpoint), allowed_text_encoders=(str(teacher),))  # ProtoRKD: the teacher's text
    return run_benchmarks(encoder, eval_dir, benchmarks=(benchmark,),
                          batch_size=cfg["eval_batch_size"], topk=(1, CASCADE_K))


def metric(scores: Dict[str, float], suffix: str) -> float:
    """The one metric whose name ends in `suffix` (e.g. 'zeroshot/shapes/acc1')."""
    found = [v for k, v in scores.items() if k.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"{suffix}: {len(found)} matches in {sorted(scores)}")
    return found[0]


ZS1, ZSK, LP1 = "zeroshot/shapes/acc1", f"zeroshot/shapes/acc{CASCADE_K}", "linear_probe/shapes/lp_acc1"
I2T, T2I = "text_retrieval_recall@1", "image_retrieval_recall@1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder: corpus, run folders, logs")
    parser.add_argument("--quick", action="store_true", help="smoke test: one seed, tiny sizes, no direction claims")
    parser.add_argument("--mode", choices=sorted(MODES), default="full",
                        help="sizes: full (20000 samples at 64 px, for an idle machine), small (the same protocol "
                             "on 10000 samples at 32 px, about half an hour of a shared 2-core machine), quick "
                             "(= --quick)")
    parser.add_argument("--parallel", type=int, default=2, help="runs side by side (one thread each)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else args.mode
    cfg = MODES[mode]
    out = Path(args.out).resolve()
    corpus, logs = out / "corpus", out / "runs"
    started = time.perf_counter()

    from utils.make_corpus import make_corpus, make_distinct_retrieval_set

    if not (corpus / "corpus.json").exists():
        make_corpus(str(corpus), train_size=cfg["train_size"], eval_size=cfg["eval_size"],
                    image_size=cfg["image_size"], seed=0, shard_size=cfg["shard_size"])
    if not (out / "distinct" / "corpus.json").exists():
        make_distinct_retrieval_set(str(out / "distinct"), size=cfg["retrieval_size"], image_size=cfg["image_size"])
    eval_dirs = {"retrieval": out / "distinct" / "eval", "zeroshot": corpus / "eval", "linear_probe": corpus / "eval"}
    tsv = str(corpus / "train.tsv")
    shards = sorted(p.name for p in (corpus / "shards").glob("*.tar"))
    shard_urls = str(corpus / "shards" / f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")
    model, bs = cfg["model"], str(cfg["batch_size"])

    # the teacher CLIP: every claim starts from it
    epochs = cfg["teacher_epochs"]
    run(trainer("teacher", logs, "--job", "clip", "--model", model, "--train-data", tsv, "--batch-size", bs,
                "--epochs", str(epochs), "--lr", str(cfg["teacher_lr"]), "--wd", "0.1",
                "--warmup", str(cfg["teacher_warmup"]), "--seed", "0"), logs / "teacher.log",
        logs / "teacher" / "checkpoints" / f"epoch_{epochs}.pt")
    teacher = logs / "teacher" / "checkpoints" / f"epoch_{epochs}.pt"

    # every arm × seed, side by side
    jobs: Dict[str, List[str]] = {}
    last_epoch: Dict[str, int] = {}
    arm = ["--epochs", str(cfg["arm_epochs"]), "--batch-size", bs, "--lr", str(cfg["arm_lr"]), "--warmup", "2",
           "--train-data", tsv]
    for seed in cfg["seeds"]:
        s = ["--seed", str(seed)]
        for kd in (True, False):
            jobs[f"prune_{'kd' if kd else 'nokd'}_s{seed}"] = [
                "--job", "prune", "--model", model, "--pretrained", str(teacher), "--prune-ratio", str(P),
                *(["--KD"] if kd else []), "--train-data", shard_urls, "--dataset-resampled",
                "--train-num-samples", str(cfg["prune_samples"]), "--epochs", "2", "--search-epochs", "1",
                "--search-interval", str(cfg["prune_interval"]), "--batch-size", bs, "--lr", str(cfg["prune_lr"]),
                "--warmup", "2", *s]
            last_epoch[f"prune_{'kd' if kd else 'nokd'}_s{seed}"] = 2
        proto = ["--model", model, "--dataset-size", str(cfg["arm_samples"]), *arm, *s]
        jobs[f"protorkd_s{seed}"] = ["--job", "protorkd", *proto, "--teacher-model", model,
                                     "--teacher-pretrained", str(teacher), "--add-projection-head",
                                     "--projection-hidden-dim", "256", "--distiller", "mse,infonce"]
        jobs[f"protorkd_noteacher_s{seed}"] = ["--job", "clip", *proto]
        student = ["--job", "distill", "--teacher-model", model, "--teacher-pretrained", str(teacher),
                   "--student", "teacher", "--student-layers", "1", "--student-width", "64", "--inherit-from-teacher",
                   *arm, "--train-num-samples", str(cfg["arm_samples"]), *s]
        jobs[f"clipkd_s{seed}"] = [*student, "--distill-loss", "fd,icl,crd"]
        jobs[f"cosine_s{seed}"] = [*student, "--distill-loss", "cosine"]
    layer_counts = list(range(1, 1 + _image_layers(model)))
    tools = {f"lowrank_{n}": ["-m", "utils.lowrank", "--pretrained", str(teacher), "--ratio", str(LOW_RANK_RATIO),
                              "--out", str(logs / f"lowrank_{n}"), "--towers", "image",
                              "--layers", ",".join(map(str, range(n)))] for n in layer_counts}
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = [pool.submit(run, trainer(name, logs, *flags), logs / f"{name}.log",
                               logs / name / "checkpoints" / f"epoch_{last_epoch.get(name, cfg['arm_epochs'])}.pt")
                   for name, flags in jobs.items()]
        futures += [pool.submit(run, cmd, logs / f"{name}.log", logs / name / "checkpoints" / "epoch_0.pt")
                    for name, cmd in tools.items()]
        for future in futures:
            future.result()

    # every score the table needs, side by side (threads: torch releases the GIL in its kernels)
    seeds = cfg["seeds"]
    wanted = [(f"prune_{arm}_s{s}", "retrieval", e) for arm in ("kd", "nokd") for s in seeds for e in (1, 2)]
    wanted += [(f"{arm}_s{s}", "linear_probe", cfg["arm_epochs"]) for arm in ("protorkd", "protorkd_noteacher")
               for s in seeds]
    wanted += [(f"{arm}_s{s}", "zeroshot", cfg["arm_epochs"]) for arm in ("clipkd", "cosine") for s in seeds]
    wanted += [(f"lowrank_{n}", "zeroshot", 0) for n in layer_counts]
    wanted += [("teacher", "zeroshot", epochs), ("teacher", "retrieval", epochs)]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        scores = dict(zip(wanted, pool.map(
            lambda w: score(logs / w[0] / "checkpoints" / f"epoch_{w[2]}.pt", eval_dirs[w[1]], cfg, teacher, w[1]),
            wanted)))

    # every metric of every scored checkpoint, for whoever reads more than the table (R@5, the teacher's, ...)
    (out / "scores.json").write_text(json.dumps(
        [{"run": run, "benchmark": benchmark, "epoch": epoch, "metrics": metrics}
         for (run, benchmark, epoch), metrics in scores.items()], indent=1))
    print("\n" + "\n".join(claims_table(scores, cfg, mode, layer_counts, time.perf_counter() - started)))
    return 0


def claims_table(scores: Dict[Tuple[str, str, int], Dict[str, float]], cfg, mode: str, layer_counts: Sequence[int],
                 seconds: float) -> List[str]:
    """The printed table: for each claim the mean ± std over seeds of both arms, the teacher's own value of the
    metric where the teacher was scored on it ("-" where not), and whether the claimed direction holds (by the
    means), then the low-rank series (the teacher, then 1, 2, ... factorised image layers) and whether it falls
    monotonically. `scores` maps (run name, benchmark, epoch) to that checkpoint's metrics."""
    seeds, epochs = cfg["seeds"], cfg["teacher_epochs"]

    def final(name: str, benchmark: str, epoch: int = None) -> Dict[str, float]:
        return scores[(name, benchmark, cfg["arm_epochs"] if epoch is None else epoch)]

    teacher_scores = scores[("teacher", "zeroshot", epochs)]
    teacher_retrieval = scores[("teacher", "retrieval", epochs)]
    rows = []

    def claim(label: str, a_name: str, a: List[float], b_name: str, b: List[float], teacher: float = None,
              higher: bool = True) -> None:
        holds = (statistics.mean(a) > statistics.mean(b)) if higher else (statistics.mean(a) < statistics.mean(b))
        rows.append((label, a_name, a, b_name, b, teacher, holds))

    for phase, epoch in (("after search", 1), ("after fine-tune", 2)):
        kd = [final(f"prune_kd_s{s}", "retrieval", epoch) for s in seeds]
        plain = [final(f"prune_nokd_s{s}", "retrieval", epoch) for s in seeds]
        for direction, key in (("I→T", I2T), ("T→I", T2I)):
            claim(f"001 p={P} {phase} R@1 {direction}", "KD", [metric(x, key) for x in kd],
                  "no KD", [metric(x, key) for x in plain], metric(teacher_retrieval, key))
    probe = {arm: [metric(final(f"{arm}_s{s}", "linear_probe"), LP1) for s in seeds]
             for arm in ("protorkd", "protorkd_noteacher")}
    claim("004 ProtoRKD linear probe acc1", "ProtoRKD", probe["protorkd"], "no teacher", probe["protorkd_noteacher"])
    clipkd = [final(f"clipkd_s{s}", "zeroshot") for s in seeds]
    claim("CLIP-KD zero-shot acc1", "FD+ICL+CRD", [metric(x, ZS1) for x in clipkd],
          "cosine", [metric(final(f"cosine_s{s}", "zeroshot"), ZS1) for s in seeds], metric(teacher_scores, ZS1))
    claim(f"002 student top-{CASCADE_K} vs teacher top-1", f"student acc{CASCADE_K}", [metric(x, ZSK) for x in clipkd],
          "teacher acc1", [metric(teacher_scores, ZS1)], metric(teacher_scores, ZSK))
    lowrank = [metric(teacher_scores, ZS1)] + [metric(final(f"lowrank_{n}", "zeroshot", 0), ZS1) for n in layer_counts]
    monotone = all(a >= b for a, b in zip(lowrank, lowrank[1:])) and lowrank[-1] < lowrank[0]

    what = "quick: 1 seed, tiny sizes, direction not asserted" if mode == "quick" else f"{mode}: {len(seeds)} seeds"
    lines = [f"claims ({what}; teacher {cfg['model']}, {cfg['train_size']} samples; {seconds:.0f} s)",
             f"{'claim':<44} | {'arm A':<14} {'mean ± std':<16} | {'arm B':<12} {'mean ± std':<16} | teacher | n "
             f"| holds"]
    for label, a_name, a, b_name, b, teacher, holds in rows:
        lines.append(f"{label:<44} | {a_name:<14} {_mean_std(a):<16} | {b_name:<12} {_mean_std(b):<16} | "
                     f"{'-' if teacher is None else f'{teacher:.4f}':<7} | {len(a)}/{len(b)} | "
                     f"{'yes' if holds else 'no'}")
    lines.append(f"{'003 zero-shot acc1 by low-rank image layers':<44} | "
                 + ", ".join(f"{n}: {v:.4f}" for n, v in enumerate(lowrank))
                 + f" | monotone falling: {'yes' if monotone else 'no'}")
    return lines


def _image_layers(model: str) -> int:
    from compress.models.registry import build_model

    return len(build_model({"kind": "open_clip", "model": model}).visual.transformer.resblocks)


def _mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


if __name__ == "__main__":
    sys.exit(main())
