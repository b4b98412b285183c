"""Launcher-level resilience: a two-node rendezvous on loopback.

(A torchrun --max-restarts test is not here yet: on torch 2.14 + gloo the restarted round sometimes
hangs joining its process group on this machine; see the README's known issues.)"""
import socket
import subprocess
import sys

import torch

from conftest import REPO, subprocess_env

MODEL = "clipc-vit-t2-32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_args(corpus, logs, name, *extra):
    return ["-m", "training.main", "--train-data", str(corpus / "train.tsv"), "--model", MODEL,
            "--logs-root", str(logs), "--name", name, "--batch-size", "16", "--workers", "0", "--warmup", "2",
            "--log-every-n-steps", "2", *extra]


def test_two_nodes_rendezvous_on_loopback(tiny_corpus, tmp_path):
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
               *trainer_args(tiny_corpus, tmp_path, "nodes", "--epochs", "1", "--local-loss", "--gather-with-grad")]
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    final = torch.load(tmp_path / "nodes" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert final["world_size"] == 2 and final["step"] == 256 // 32
