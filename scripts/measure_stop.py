"""How long a trainer takes from SIGTERM to exit, and how many steps a SIGTERM loses (docs/cluster.md).

    python scripts/measure_stop.py --corpus data/demo --procs 1 --repeats 5
    python scripts/measure_stop.py --corpus data/demo --procs 2 --repeats 5    # torchrun; SIGTERM to its agent

Each trial starts a fresh run of the demo's CLIP (scripts/demo.sh's model and flags, logging every step),
sends SIGTERM once it has trained a random number of steps (--min-step .. --max-step), and waits for it to
exit. Steps lost = the last step the run logged - the step of the epoch_latest.pt it left (0: every step
trained is in the checkpoint). Prints one line per trial, then min / median / max of the seconds to exit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def logged_steps(run_dir: Path) -> list:
    steps = []
    path = run_dir / "results.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:  # a line being written
                pass
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial(args, logs: Path, index: int, rng: random.Random) -> dict:
    name = f"stop{index}"
    run_dir = logs / name
    flags = ["-m", "training.main", "--job", "clip", "--model", args.model, "--train-data",
             str(Path(args.corpus) / "train.tsv"), "--batch-size", str(args.batch_size), "--epochs", "3",
             "--lr", "1e-3", "--wd", "0.1", "--warmup", "50", "--workers", str(args.workers),
             "--save-every-n-steps", "100", "--log-every-n-steps", "1", "--logs-root", str(logs), "--name", name,
             "--log-level", "warning"]
    if args.procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.procs}",
                   f"--master-port={free_port()}", *flags, "--local-loss", "--gather-with-grad"]
    else:
        command = [sys.executable, *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    stderr_path = logs / f"{name}.stderr"
    target = rng.randint(args.min_step, args.max_step)
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while max(logged_steps(run_dir), default=0) < target:
                if proc.poll() is not None:
                    raise SystemExit(f"trial {index} ended before step {target}:\n{stderr_path.read_text()[-2000:]}")
                time.sleep(0.01)
            at_signal = max(logged_steps(run_dir))
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)  # the trainer itself, or torchrun's agent, which forwards it
            proc.wait(timeout=300)
            seconds = time.perf_counter() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    text = stderr_path.read_text()
    stops = [int(step) for step in re.findall(r"rank \d+: stopping after step (\d+)", text)]
    # how long the step in flight took to end, as each rank that got the signal logged it
    to_step_end = [float(s) for s in re.findall(r"stopping after step \d+ \(\w+, ([\d.]+) s after it came", text)]
    saved = torch.load(run_dir / "checkpoints" / "epoch_latest.pt", weights_only=True, mmap=True)["step"]
    last = max(logged_steps(run_dir))
    return {"signal_at_step": at_signal, "ranks_stopped_after": sorted(set(stops)), "checkpoint_step": saved,
            "last_logged_step": last, "steps_lost": last - saved, "seconds_to_step_end": max(to_step_end, default=None),
            "seconds_to_exit": round(seconds, 2),
            "exit_code": proc.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="a corpus from `python -m utils.make_corpus`")
    parser.add_argument("--procs", type=int, default=1, help="1: python -m training.main; N: torchrun with N")
    parser.add_argument("--repeats", type=int, default=5, help="how many trials")
    parser.add_argument("--model", default="clipc-vit-t2-64", help="the demo's model")
    parser.add_argument("--batch-size", type=int, default=64, help="per process, as the demo")
    parser.add_argument("--workers", type=int, default=1, help="loader workers per process, as the demo")
    parser.add_argument("--min-step", type=int, default=5, help="earliest step to send SIGTERM at")
    parser.add_argument("--max-step", type=int, default=40, help="latest step to send SIGTERM at")
    parser.add_argument("--seed", type=int, default=0, help="of the steps chosen")
    parser.add_argument("--logs", default=None, help="where the runs go (default: a temp dir)")
    args = parser.parse_args()

    logs = Path(args.logs or tempfile.mkdtemp(prefix="measure-stop-"))
    rng = random.Random(args.seed)
    results = []
    for index in range(args.repeats):
        result = trial(args, logs, index, rng)
        results.append(result)
        print(json.dumps({"trial": index, "procs": args.procs, **result}), flush=True)
    seconds = [r["seconds_to_exit"] for r in results]
    print(f"procs {args.procs}: seconds from SIGTERM to exit min {min(seconds):.2f} median "
          f"{statistics.median(seconds):.2f} max {max(seconds):.2f}; steps lost max "
          f"{max(r['steps_lost'] for r in results)}; steps trained after the signal max "
          f"{max(max(r['ranks_stopped_after'], default=r['signal_at_step']) - r['signal_at_step'] for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
