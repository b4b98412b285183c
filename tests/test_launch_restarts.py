"""Launcher-level resilience: torchrun restarts a killed worker, and a two-node rendezvous on loopback."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, launched, subprocess_env

pytestmark = pytest.mark.slow  # every test here starts torchrun

MODEL = "clipc-vit-t2-32"


def trainer_args(corpus, logs, name, *extra):
    return ["-m", "training.main", "--train-data", str(corpus / "train.tsv"), "--model", MODEL,
            "--logs-root", str(logs), "--name", name, "--batch-size", "16", "--workers", "0", "--warmup", "2",
            "--log-every-n-steps", "2", *extra]


def trainer_pids(run_dir: Path):
    """Pids of the trainer workers writing to `run_dir` (their command lines name it; no psutil needed).
    The launcher's own helper processes (resource tracker, log tee) are not workers: never kill those."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (b"training.main" in cmdline and str(run_dir.parent).encode() in cmdline
                    and b"torch.distributed.run" not in cmdline):
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_torchrun_max_restarts_resumes_a_killed_worker(tiny_corpus, tmp_path, rendezvous):
    # c10d is the elastic rendezvous of real clusters; static is torchrun's default
    rdzv = (["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=restart-test"]
            if rendezvous == "c10d" else [f"--master-port={free_port()}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=3", *rdzv,
           *trainer_args(tiny_corpus, tmp_path, "restart", "--epochs", "2", "--save-every-n-steps", "3",
                         "--resume", "latest")]
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                  text=True) as launcher:
        latest = tmp_path / "restart" / "checkpoints" / "epoch_latest.pt"
        deadline = time.time() + 240
        while not latest.exists():
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        workers = trainer_pids(tmp_path / "restart")
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, stderr[-3000:]
    # exactly one restart: the restarted round joins its process group at the first try. Without a
    # per-round store prefix it read the killed round's gloo addresses and failed (pytorch#135712).
    assert "connectFullMesh" not in stderr, stderr[-3000:]
    assert stderr.count("run restart: job clip") == 2, stderr[-3000:]
    log = (tmp_path / "restart" / "out.log").read_text()
    assert "resumed from" in log
    final = torch.load(tmp_path / "restart" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert final["step"] == 2 * (256 // 32) and final["world_size"] == 2


def test_two_nodes_rendezvous_on_loopback(tiny_corpus, tmp_path):
    port = str(free_port())
    with contextlib.ExitStack() as stack:
        nodes = []
        for node_rank in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
                   "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                   *trainer_args(tiny_corpus, tmp_path, "nodes", "--epochs", "1", "--local-loss",
                                 "--gather-with-grad")]
            nodes.append(stack.enter_context(launched(cmd, cwd=REPO, env=subprocess_env(),
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        for node in nodes:
            _, stderr = node.communicate(timeout=300)
            assert node.returncode == 0, stderr[-3000:]
    final = torch.load(tmp_path / "nodes" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert final["world_size"] == 2 and final["step"] == 256 // 32
