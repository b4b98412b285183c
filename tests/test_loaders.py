"""training.data.loaders: every DataLoader a run starts comes from `run_loader`, so a stop signal sent to the
whole job (SLURM, torchrun's killpg) during any pass of a job's own (ProtoRKD's episode image features, BatchNorm
re-estimation) leaves the loader workers serving; the rank finishes the pass, saves, and exits 75, and the run
resumes from epoch_latest.pt."""
import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SRC, _descendants, launched, run_trainer, subprocess_env

LOADER_CLASSES = {"DataLoader", "WebLoader"}


def test_every_loader_of_a_run_comes_from_the_factory():
    """No module of the trainer or its jobs constructs a loader itself (a new one would miss the stop rule)."""
    offenders = []
    for path in sorted((SRC / "training").rglob("*.py")):
        if path.name == "loaders.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in LOADER_CLASSES:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []


def test_the_factory_gives_workers_the_stop_rule_and_keeps_it():
    from training.data.loaders import run_loader
    from training.preemption import loader_worker_init

    loader = run_loader(list(range(4)), batch_size=2)
    assert loader.worker_init_fn is loader_worker_init
    with pytest.raises(TypeError, match="worker_init_fn"):
        run_loader(list(range(4)), worker_init_fn=print)


# --- SIGTERM to the process group during each pass -------------------------------------------------------

ROWS = 2048  # the tiny corpus's 256 pictures, each listed 8 times: a pass of a few seconds on 2 workers


@pytest.fixture(scope="module")
def long_tsv(tiny_corpus, tmp_path_factory):
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    path = tmp_path_factory.mktemp("long") / "train.tsv"
    root = tiny_corpus
    rows = [f"{root / row.split(chr(9))[0]}\t{row.split(chr(9), 1)[1]}" for row in rows]
    path.write_text("\n".join([header] + (rows * (ROWS // len(rows)))) + "\n")
    return path


def _signal_during(args, marker: str, occurrence: int, timeout: float = 400):
    """Run the trainer; when its log has shown `marker` `occurrence` times and the pass's loader workers are
    running, SIGTERM its whole process group (as SLURM and torchrun do). Returns (exit code, stderr)."""
    cmd = [sys.executable, "-m", "training.main", *map(str, args)]
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                  text=True) as proc:
        seen, lines, deadline = 0, [], time.monotonic() + timeout
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                seen += 1
                if seen == occurrence:
                    break
        assert seen == occurrence, "".join(lines[-40:])
        while not _descendants(proc.pid):  # the pass's loader workers are forked
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return proc.returncode, "".join(lines) + rest


def _resumes(args, run_dir: Path):
    latest = run_dir / "checkpoints" / "epoch_latest.pt"
    assert latest.exists()
    state = torch.load(latest, weights_only=True, map_location="cpu")
    run_trainer([*map(str, args), "--resume", "latest"], timeout=400)
    return state


@pytest.mark.slow
def test_sigterm_during_protorkd_episode_image_pass_saves_and_exits_75(long_tsv, tmp_path):
    args = ["--job", "protorkd", "--train-data", long_tsv, "--model", "clipc-vit-t2-32", "--logs-root", tmp_path,
            "--name", "proto", "--epochs", "2", "--batch-size", "16", "--workers", "2", "--episode-size", "1024",
            "--distiller", "rkd,proto", "--k", "4", "--PBT", "--warmup", "1"]
    # the second episode's pass: the first episode's checkpoint exists, so the stop has training to keep
    code, log = _signal_during(args, "embedding the episode's", occurrence=2)
    assert code == 75, log[-4000:]
    assert "DataLoader worker" not in log and "stopping after step" in log
    state = _resumes(args, tmp_path / "proto")
    assert state["epoch"] == 1


@pytest.mark.slow
def test_sigterm_during_batchnorm_re_estimation_saves_and_exits_75(long_tsv, tmp_path):
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    teacher = tmp_path / "teacher.pt"
    torch.save({"model_spec": open_clip_spec("clipc-vit-t2-32"),
                "state_dict": open_clip.create_model("clipc-vit-t2-32").state_dict()}, teacher)
    args = ["--job", "distill", "--teacher-model", "clipc-vit-t2-32", "--teacher-pretrained", teacher,
            "--student", "mobilenet_v3_small", "--train-data", long_tsv, "--student-image-size", "64",
            "--epochs", "2", "--batch-size", "32", "--warmup", "1", "--workers", "2", "--dataset-size", "512",
            "--bn-recalibration-batches", "64", "--logs-root", tmp_path, "--name", "bn"]
    code, log = _signal_during(args, "re-estimating the student's BatchNorm statistics", occurrence=1)
    assert code == 75, log[-4000:]
    assert "DataLoader worker" not in log
    state = _resumes(args, tmp_path / "bn")
    assert state["epoch"] == 1  # the epoch whose statistics were being re-estimated was saved whole
