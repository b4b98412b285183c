"""Crash-safety soak: SIGKILL the trainer at random moments and resume it each time with --resume latest.

Every moment is fair game — mid-step, mid-checkpoint-write (saves are frequent), mid-eval (in-loop
zero-shot eval runs every epoch when --eval-data-dir is given). After each kill we check that every
checkpoint file on disk loads, that the resume succeeds, and that no more than the save interval was lost.

    python scripts/soak_resume.py --corpus DIR --kills 20

Prints a tally; exits non-zero if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "results.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().startswith("{")]
    return max(steps, default=0)


def checkpoint_health(run_dir: Path):
    """(readable files, unreadable files, newest step on disk)."""
    readable, unreadable, newest = 0, [], 0
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        try:
            newest = max(newest, int(torch.load(path, weights_only=True)["step"]))
            readable += 1
        except Exception as e:  # noqa: BLE001 - any failure to load is what we count
            unreadable.append(f"{path.name}: {type(e).__name__}")
    return readable, unreadable, newest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="a corpus from `python -m utils.make_corpus`")
    parser.add_argument("--kills", type=int, default=20, help="how many SIGKILLs")
    parser.add_argument("--save-every-n-steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dataset-size", type=int, default=512,
                        help="train on the first N rows (the kills spread over many short epochs, and the "
                             "last start finishes in minutes)")
    parser.add_argument("--model", default="clipc-vit-t2-32")
    parser.add_argument("--min-delay", type=float, default=3.0, help="earliest kill after a (re)start, seconds")
    parser.add_argument("--max-delay", type=float, default=9.0, help="latest kill after a (re)start, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default=None, help="where the run goes (default: a temp dir)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    corpus = Path(args.corpus)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="soak-"))
    run_dir = logs / "soak"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "training.main", "--train-data", str(corpus / "train.tsv"),
               "--model", args.model, "--logs-root", str(logs), "--name", "soak", "--batch-size", "16",
               "--workers", "1", "--epochs", str(args.epochs), "--warmup", "2", "--log-every-n-steps", "1",
               "--save-every-n-steps", str(args.save_every_n_steps), "--resume", "latest",
               "--log-level", "warning", "--dataset-size", str(args.dataset_size)]
    if (corpus / "eval").exists():
        command += ["--zeroshot-frequency", "1", "--eval-data-dir", str(corpus / "eval")]

    tally = {"kills": 0, "resumes_ok": 0, "resumes_failed": 0, "unreadable_checkpoints": 0,
             "max_steps_lost": 0, "lost_more_than_interval": 0, "finished": False}
    previous_newest = 0
    for attempt in range(args.kills + 1):
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if attempt == args.kills:  # the last start runs to the end
            _, stderr = proc.communicate()
            tally["finished"] = proc.returncode == 0
            if proc.returncode != 0:
                print(stderr[-2000:], file=sys.stderr)
            break
        time.sleep(rng.uniform(args.min_delay, args.max_delay))
        if proc.poll() is not None:
            print(f"run ended before kill {attempt + 1} (rc {proc.returncode}); raise --epochs", file=sys.stderr)
            print(proc.stderr.read()[-2000:], file=sys.stderr)
            tally["resumes_failed"] += proc.returncode != 0
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tally["kills"] += 1
        reached = last_logged_step(run_dir)
        readable, unreadable, newest = checkpoint_health(run_dir)
        tally["unreadable_checkpoints"] += len(unreadable)
        if newest < previous_newest:
            tally["resumes_failed"] += 1  # progress on disk went backwards
        elif attempt > 0:
            tally["resumes_ok"] += 1  # this start resumed and moved on or at least kept its checkpoint
        previous_newest = newest
        lost = max(0, reached - newest)
        tally["max_steps_lost"] = max(tally["max_steps_lost"], lost)
        tally["lost_more_than_interval"] += lost > args.save_every_n_steps
        print(f"kill {attempt + 1:2d}: logged step {reached:4d}, newest checkpoint step {newest:4d}, "
              f"lost {lost}, checkpoint files {readable} readable / {len(unreadable)} unreadable {unreadable or ''}")
    tally["resumes_ok"] += tally["finished"]
    print("tally:", json.dumps(tally))
    ok = (tally["finished"] and tally["unreadable_checkpoints"] == 0 and tally["resumes_failed"] == 0
          and tally["lost_more_than_interval"] == 0 and tally["kills"] >= args.kills)
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
