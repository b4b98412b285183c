"""Shared fixtures: a tiny generated corpus and a helper to run the trainer as a real subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def subprocess_env(**extra):
    """Environment for child processes: our sources importable, one thread each (2-core CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_trainer(args, timeout=300, nproc=None, extra_torchrun=(), check=True, env=None):
    """`python -m training.main ARGS` (or under torchrun with `nproc` processes)."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra_torchrun,
               "-m", "training.main", *args]
    else:
        cmd = [sys.executable, "-m", "training.main", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """256 training pictures, 36 classes of eval pictures, in the real layouts."""
    from utils.make_corpus import make_corpus

    out = tmp_path_factory.mktemp("corpus") / "corpus"
    make_corpus(str(out), train_size=256, eval_size=72, image_size=32, seed=0, shard_size=64)
    return out
