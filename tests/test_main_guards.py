"""A careless or hostile command line gets one line and exit 2, never a traceback, a lost checkpoint, a run
folder outside --logs, or a copied secret."""
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import REPO, launched, run_trainer, subprocess_env

MODEL = "clipc-vit-t2-32"


def base_args(corpus, logs, name, *extra):
    return ["--train-data", str(corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(logs), "--name", name,
            "--batch-size", "32", "--workers", "0", "--warmup", "1", "--log-every-n-steps", "1", "--seed", "0",
            *extra]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    # the console also carries the run's log lines (INFO and up); the error itself is one line, said once
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "-0.1", "--lr -0.1: must be at least 0"),
    ("--workers", "-1", "--workers -1: must be at least 0"),
    ("--log-every-n-steps", "0", "--log-every-n-steps 0: must be at least 1"),
    ("--warmup", "-5", "--warmup -5: must be at least 0"),
    ("--lr", "nan", "--lr nan: must be at least 0"),
    ("--name", "../escaped", "must be a single folder name under --logs"),
    ("--name", "/tmp/abs", "must be a single folder name under --logs"),
    ("--name", "..", "must be a single folder name under --logs"),
])
def test_bad_flags_are_one_line_and_leave_nothing(tiny_corpus, tmp_path, capsys, flag, value, says):
    from training.main import main

    logs = tmp_path / "logs"
    argv = base_args(tiny_corpus, logs, "guard") + [flag, value]  # the last --name wins, as argparse does
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and says in err[0], err
    assert not logs.exists(), "a refused run must not create its run folder"
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/tmp/abs/params.txt")


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    """A finished 1-epoch run with --copy-codebase and --save-most-recent, shared by the tests that need a real
    checkpoint, epoch_latest.pt or a copied codebase."""
    logs = tmp_path_factory.mktemp("trained")
    run_trainer(base_args(tiny_corpus, logs, "small", "--epochs", "1", "--save-most-recent", "--copy-codebase"),
                timeout=180)
    return logs / "small"


@pytest.mark.slow
def test_pretrained_that_is_no_checkpoint_is_one_line_in_stderr_and_out_log(tiny_corpus, tmp_path):
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"this is not a checkpoint\n" * 20)
    result = run_trainer(base_args(tiny_corpus, tmp_path, "junk", "--epochs", "1", "--pretrained", str(junk)),
                         check=False, timeout=120)
    line = assert_one_line_error(result, "cannot load --pretrained", str(junk))
    assert line[len("error: "):] in (tmp_path / "junk" / "out.log").read_text()
    # refused at start: no params.txt, so the same --name runs next time without --resume
    assert not (tmp_path / "junk" / "params.txt").exists()
    run_trainer(base_args(tiny_corpus, tmp_path, "junk", "--epochs", "1"), timeout=180)
    assert (tmp_path / "junk" / "params.txt").exists()


@pytest.mark.slow
def test_teacher_weights_of_another_architecture_are_one_line(tiny_corpus, tmp_path, trained):
    # a real checkpoint, of a CLIP with other widths than the teacher named
    other = trained / "checkpoints" / "epoch_1.pt"
    result = run_trainer(base_args(tiny_corpus, tmp_path, "rkd", "--epochs", "1", "--job", "protorkd",
                                   "--teacher-model", "clipc-vit-t2-64", "--teacher-pretrained", str(other)),
                         check=False, timeout=180)
    assert_one_line_error(result, "cannot load the text teacher")


def _limit_file_size(limit):
    def apply():
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG like a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, trained):
    shutil.copytree(trained, tmp_path / "small")  # a copy: the resume below writes into it
    latest = tmp_path / "small" / "checkpoints" / "epoch_latest.pt"
    before = latest.read_bytes()
    # every file this process writes may hold at most a tenth of a checkpoint: the next save fails mid-write
    args = [sys.executable, "-m", "training.main",
            *base_args(tiny_corpus, tmp_path, "small", "--epochs", "2", "--save-most-recent", "--resume", "latest")]
    with launched(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  preexec_fn=_limit_file_size(len(before) // 10)) as proc:
        stdout, stderr = proc.communicate(timeout=180)
    result = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    line = assert_one_line_error(result, "cannot write", "File too large", "untouched")
    assert line[len("error: "):] in (tmp_path / "small" / "out.log").read_text()
    assert latest.read_bytes() == before  # the previous checkpoint is whole and unchanged
    assert torch.load(latest, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "small" / "checkpoints" / "epoch_2.pt").exists()
    assert not [p for p in (tmp_path / "small" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_copy_codebase_copies_package_source_only(tmp_path):
    from training.main import copy_codebase

    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (src / "pkg" / "configs.json").write_text("{}")
    (src / ".env").write_text("AWS_SECRET=1\n")
    (src / "pkg" / ".secret.py").write_text("token = 2\n")
    (src / "pkg" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (src / ".git").mkdir()
    (src / ".git" / "config.py").write_text("")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stolen.py").write_text("secret = 3\n")
    (src / "pkg" / "link_dir").symlink_to(outside, target_is_directory=True)
    (src / "pkg" / "link.py").symlink_to(outside / "stolen.py")
    dest = tmp_path / "run" / "code" / "src"
    copied = copy_codebase(src, dest)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() or p.is_symlink())
    assert found == ["pkg/__init__.py", "pkg/configs.json", "pkg/sub/mod.py"] and copied == 3


@pytest.mark.slow
def test_copy_codebase_flag_copies_the_real_packages(trained):
    code = trained / "code" / "src"
    assert (code / "training" / "main.py").read_text() == (REPO / "src" / "training" / "main.py").read_text()
    assert (code / "foundation" / "configs" / f"{MODEL}.json").exists()
    assert not [p for p in code.rglob("*") if p.name.startswith(".") or p.is_symlink() or "__pycache__" in p.parts]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_monitor_outputs_follow_the_umask(tmp_path, umask, mode):
    from utils.evaluate_checkpoints import append_result, write_json

    old = os.umask(umask)
    try:
        append_result(tmp_path / "evaluation_metrics_all.csv", {"epoch": 1, "acc1": 0.5})
        write_json(tmp_path / "epoch_1.json", {"epoch": 1, "acc1": 0.5})
    finally:
        os.umask(old)
    for name in ("evaluation_metrics_all.csv", "epoch_1.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
