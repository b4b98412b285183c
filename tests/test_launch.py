"""The launcher (training/launch.py): the script's own flags (--logs, --p) pass through it, and the seeds'
torchrun lines run through it with 2 processes."""
import subprocess
import sys

import pytest
from conftest import REPO, launched, subprocess_env


def test_launcher_passes_logs_and_p_through():
    from training.launch import build_parser

    args = build_parser().parse_args(["--nproc_per_node", "2", "-m", "training.main", "--logs", "logs",
                                      "--p", "0.5", "--nnodes", "9"])
    assert args.module and args.training_script == "training.main"
    assert args.training_script_args == ["--logs", "logs", "--p", "0.5", "--nnodes", "9"]
    assert args.nnodes == "1:1"  # after the script, torchrun's own option names are the script's


def _launch(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run a launcher command; its whole process tree is killed if it fails or times out."""
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_seed_torchrun_line_through_the_launcher_two_processes(tiny_corpus, tmp_path):
    """The ProtoRKD README's torchrun line, as written but for the launcher's name and sizes: no --job, a bare
    --logs, 2 gloo processes; then UPop's --p through the same launcher. (--standalone: a free rendezvous port,
    so concurrent test runs on one machine do not meet on torchrun's default one.)"""
    launcher = [sys.executable, "-m", "training.launch", "--standalone", "--nproc_per_node", "2",
                "-m", "training.main"]
    seed = ["--dataset-size", "256", "--episode-size", "0", "--train-data", str(tiny_corpus / "train.tsv"),
            "--epochs", "1", "--save-frequency", "4", "--batch-size", "32", "--workers", "0",
            "--model", "clipc-vit-t2-32", "--add-projection-head", "--projection-dim", "384",
            "--projection-n-layers", "2", "--pretrained-text", "all-MiniLM-L6-v2", "--lr", "5e-4", "--warmup", "2",
            "--wd", "0.5", "--max-grad-norm", "10", "--report-to", "tensorboard", "--logs", str(tmp_path / "logs"),
            "--copy-codebase", "--name", "tea[MiniLM]_stu[vit]_[MSE](tiny)"]
    result = _launch(launcher + seed)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "logs" / "tea[MiniLM]_stu[vit]_[MSE](tiny)"
    out_log = (run / "out.log").read_text()
    assert "job protorkd, 2 process(es)" in out_log
    assert ("no --job given: running --job protorkd, the job of --pretrained-text, --add-projection-head, "
            "--projection-dim, --projection-n-layers") in out_log
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_latest.pt"}
    assert (run / "code" / "src" / "training" / "launch.py").is_file()

    prune = ["--job", "prune", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
             "--logs", str(tmp_path / "logs"), "--name", "upop", "--epochs", "2", "--batch-size", "16",
             "--workers", "0", "--p", "0.5", "--stop-after-steps", "2", "--warmup", "1"]
    result = _launch(launcher + prune)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "p: 0.5" in (tmp_path / "logs" / "upop" / "params.txt").read_text().splitlines()
