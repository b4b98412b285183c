"""The trainer spine, run for real as subprocesses: one process, torchrun, kill -9 + resume, bad data."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_trainer, subprocess_env

MODEL = "clipc-vit-t2-32"


def common_args(corpus, logs, name, *extra):
    return ["--train-data", str(corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(logs), "--name", name,
            "--batch-size", "16", "--workers", "0", "--warmup", "2", "--lr", "1e-3", "--log-every-n-steps", "2",
            "--seed", "3", *extra]


def read_results(run_dir):
    return [json.loads(line) for line in open(run_dir / "results.jsonl")]


def final_state(run_dir, epoch):
    return torch.load(run_dir / "checkpoints" / f"epoch_{epoch}.pt", weights_only=True)


def straight_args(corpus, logs, name):
    """2 epochs, epoch_latest.pt every 3 steps: the shared run below, and the run the kill -9 test interrupts."""
    return common_args(corpus, logs, name, "--epochs", "2", "--save-every-n-steps", "3")


@pytest.fixture(scope="module")
def one_run(tiny_corpus, tmp_path_factory):
    """The folder of one uninterrupted `straight_args` run, shared by the tests that read what it wrote."""
    logs = tmp_path_factory.mktemp("straight")
    run_trainer(straight_args(tiny_corpus, logs, "one"))
    return logs / "one"


@pytest.mark.slow
def test_one_process_run_writes_everything(tiny_corpus, one_run):
    run = one_run
    assert (run / "params.txt").read_text().count("model: clipc-vit-t2-32") == 1
    assert (run / "out.log").stat().st_size > 0
    # epoch_latest.pt by default, as ProtoCLIP's log tree has it (--no-save-most-recent leaves it out)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"}
    latest = torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert latest["epoch"] == 2 and latest["step"] == 32
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_results(run)
    assert rows[-1]["step"] == 2 * (256 // 16)
    assert {"train/loss", "train/lr", "train/logit_scale", "train/samples_per_second",
            "train/data_time"} <= set(rows[-1])
    ckpt = final_state(run, 2)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 32 and ckpt["model_spec"] == {"kind": "open_clip", "model": MODEL}
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    # the same name again without --resume is refused with one clear line
    again = run_trainer(straight_args(tiny_corpus, run.parent, "one"), check=False)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_dense_checkpoint_loads_in_stock_open_clip(one_run):
    import open_clip

    from foundation.model_configs import register_model_configs

    register_model_configs()
    path = one_run / "checkpoints" / "epoch_2.pt"
    stock = open_clip.create_model(MODEL, pretrained=str(path))
    ours = torch.load(path, weights_only=True)["state_dict"]
    for key, value in stock.state_dict().items():
        assert torch.equal(value, ours[key]), key


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tiny_corpus, tmp_path):
    """2 ranks x B/2 with --local-loss --gather-with-grad follow the 1 x B loss trajectory."""
    one = common_args(tiny_corpus, tmp_path, "b32", "--epochs", "1", "--batch-size", "32",
                      "--log-every-n-steps", "1")
    two = common_args(tiny_corpus, tmp_path, "b16x2", "--epochs", "1", "--batch-size", "16",
                      "--log-every-n-steps", "1", "--local-loss", "--gather-with-grad",
                      # in-loop eval on rank 0 while rank 1 waits: must not deadlock
                      "--zeroshot-frequency", "1", "--eval-data-dir", str(tiny_corpus / "eval"))
    run_trainer(one)
    run_trainer(two, nproc=2)
    loss_one = [r["train/loss"] for r in read_results(tmp_path / "b32")]
    loss_two = [r["train/loss"] for r in read_results(tmp_path / "b16x2") if "train/loss" in r]
    assert any("eval/zeroshot/shapes/acc1" in r for r in read_results(tmp_path / "b16x2"))
    assert len(loss_one) == len(loss_two) == 256 // 32
    assert loss_one[-1] < loss_one[0]
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-4, atol=1e-5)
    assert final_state(tmp_path / "b16x2", 1)["world_size"] == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_latest_ends_with_identical_weights(tiny_corpus, tmp_path, one_run):
    args = straight_args(tiny_corpus, tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "training.main", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "killed" / "checkpoints" / "epoch_latest.pt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "killed" / "checkpoints" / "epoch_latest.pt", weights_only=True)["step"]
    assert killed_at < 32
    run_trainer(args + ["--resume", "latest"])
    resumed, straight = final_state(tmp_path / "killed", 2), final_state(one_run, 2)
    assert resumed["step"] == straight["step"] == 32
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def _write_bad_tsv(corpus: Path, out: Path) -> int:
    """Copy the corpus TSV and break some rows in every way a crawl breaks them."""
    out.mkdir()
    lines = (corpus / "train.tsv").read_bytes().splitlines()
    header, rows = lines[0], lines[1:]
    bad_dir = out / "bad"
    bad_dir.mkdir()
    good_jpg = (corpus / rows[0].split(b"\t")[0].decode()).read_bytes()
    (bad_dir / "empty.jpg").write_bytes(b"")
    (bad_dir / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    (bad_dir / "text.jpg").write_bytes(b"this is not an image\n")
    fixed = [header]
    for row in rows:
        path, caption = row.split(b"\t")
        fixed.append(str(corpus / path.decode()).encode() + b"\t" + caption)
    broken = [
        str(bad_dir / "missing.jpg").encode() + b"\ta red circle",
        str(bad_dir / "empty.jpg").encode() + b"\ta red circle",
        str(bad_dir / "truncated.jpg").encode() + b"\ta red circle",
        str(bad_dir / "text.jpg").encode() + b"\ta red circle",
        fixed[5].split(b"\t")[0] + b"\t",  # empty caption
        fixed[6].split(b"\t")[0] + b"\ta caf\xe9 without utf-8",  # latin-1 byte
    ]
    for i, row in enumerate(broken):
        fixed[10 + 30 * i] = row
    (out / "bad.tsv").write_bytes(b"\n".join(fixed) + b"\n")
    return len(broken)


@pytest.mark.slow
def test_bad_samples_are_skipped_and_counted(tiny_corpus, tmp_path):
    n_bad = _write_bad_tsv(tiny_corpus, tmp_path / "data")
    args = common_args(tiny_corpus, tmp_path, "bad", "--epochs", "1", "--max-bad-fraction", "0.05")
    args[args.index("--train-data") + 1] = str(tmp_path / "data" / "bad.tsv")
    run_trainer(args)
    rows = read_results(tmp_path / "bad")
    assert rows[-1]["data/skipped"] == n_bad
    log = (tmp_path / "bad" / "out.log").read_text()
    for reason in ("missing file", "0-byte file", "unreadable image", "empty caption", "not valid UTF-8"):
        assert reason in log, reason
    # the same data under a strict threshold stops with one clear line
    strict = common_args(tiny_corpus, tmp_path, "strict", "--epochs", "1", "--max-bad-fraction", "0.001")
    strict[strict.index("--train-data") + 1] = str(tmp_path / "data" / "bad.tsv")
    result = run_trainer(strict, check=False)
    assert result.returncode == 2 and "--max-bad-fraction" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_wrong_columns_fail_at_once_naming_the_columns(tiny_corpus, tmp_path):
    args = common_args(tiny_corpus, tmp_path, "cols", "--epochs", "1", "--csv-img-key", "image")
    result = run_trainer(args, check=False)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "'image'" in error and "'filepath'" in error and "'title'" in error
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_webdataset_shards_with_bad_members(tiny_corpus, tmp_path):
    import webdataset as wds

    shards = tmp_path / "shards"
    shutil.copytree(tiny_corpus / "shards", shards)
    with wds.TarWriter(str(shards / "000100.tar")) as sink:  # a shard of bad samples
        sink.write({"__key__": "900000001", "jpg": b"", "txt": b"a red circle", "idx": b"1"})
        sink.write({"__key__": "900000002", "jpg": (tiny_corpus / "images/train/000000000.jpg").read_bytes(),
                    "idx": b"2"})  # no txt member
    (shards / "000101.tar").write_bytes(b"")  # an empty shard
    pattern = str(shards / "{000000..000003}.tar") + "::" + str(shards / "{000100..000101}.tar")
    args = common_args(tiny_corpus, tmp_path, "wds", "--epochs", "1", "--train-num-samples", "256",
                       "--max-bad-fraction", "0.05")
    args[args.index("--train-data") + 1] = pattern
    run_trainer(args)
    rows = read_results(tmp_path / "wds")
    assert rows[-1]["step"] == 256 // 16
    assert rows[-1]["data/skipped"] >= 2
    # a pattern that matches nothing is one clear line
    args[args.index("--train-data") + 1] = str(shards / "{900..901}.tar")
    args[args.index("--name") + 1] = "nothing"
    result = run_trainer(args, check=False)
    assert result.returncode == 2 and "no shard matches" in result.stderr


@pytest.mark.slow
def test_nonfinite_loss_stops_without_writing_a_checkpoint(tiny_corpus, tmp_path):
    args = common_args(tiny_corpus, tmp_path, "nan", "--epochs", "1", "--lr", "1e30", "--warmup", "1",
                       "--save-every-n-steps", "1")
    result = run_trainer(args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "at step" in result.stderr and "Traceback" not in result.stderr
    for path in (tmp_path / "nan" / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


@pytest.mark.slow
def test_skipped_nonfinite_steps_still_count(tiny_corpus, tmp_path):
    """--skip-nonfinite-loss: a skipped step advances the schedule and meets --stop-after-steps and the end
    of the epoch like any other. 1e30 blows the weights up at step 1, so steps 2… are non-finite and skipped;
    with --accum-freq 3 an epoch is 5 steps (15 of its 16 batches), 10 steps in the 2 epochs."""
    args = common_args(tiny_corpus, tmp_path, "skip", "--epochs", "2", "--lr", "1e30", "--warmup", "1",
                       "--accum-freq", "3", "--skip-nonfinite-loss", "--stop-after-steps", "8")
    result = run_trainer(args)
    for step in (5, 8):  # the last step of epoch 0 and the one --stop-after-steps ends on were skipped
        assert f"skipping step {step}: non-finite loss" in result.stderr
    checkpoints = tmp_path / "skip" / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"epoch_1.pt", "epoch_latest.pt"}  # stopped in epoch 1

    def scheduled_lr(step):  # warm-up 1, then cosine over the 10 steps (training.main.cosine_schedule)
        return 1e30 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 9))

    epoch_end = torch.load(checkpoints / "epoch_1.pt", weights_only=True)
    assert epoch_end["step"] == 5 and epoch_end["samples_seen"] == 15 * 16  # the 16th batch was left out
    assert epoch_end["optimizer"]["param_groups"][0]["lr"] == pytest.approx(scheduled_lr(5))
    stopped = torch.load(checkpoints / "epoch_latest.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"], stopped["step_in_epoch"]) == (1, 8, 9)
    assert stopped["optimizer"]["param_groups"][0]["lr"] == pytest.approx(scheduled_lr(8))


@pytest.mark.slow
def test_in_loop_eval_without_eval_data_fails_before_training(tiny_corpus, tmp_path):
    started = time.perf_counter()
    result = run_trainer(common_args(tiny_corpus, tmp_path, "noeval", "--epochs", "1", "--zeroshot-frequency", "1"),
                         check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --zeroshot/--linear/--retrieval-frequency need --eval-data-dir"
    assert not (tmp_path / "noeval").exists()  # no run folder: it stopped at the flags
    assert time.perf_counter() - started < 60, "failed, but only after training"


def test_resume_latest_orders_checkpoints_by_epoch_then_step(tmp_path):
    from foundation.checkpoint import find_resume_checkpoint

    def write(name, epoch, step):
        torch.save({"epoch": epoch, "step": step}, tmp_path / name)

    write("epoch_1.pt", 1, 100)
    write("epoch_2.pt", 2, 150)
    # left by the same run before a restart from epoch_1.pt with fewer steps per epoch: a higher step, but
    # older (fewer epochs done) than epoch_2.pt
    write("epoch_latest.pt", 1, 180)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "epoch_2.pt"
    write("epoch_latest.pt", 2, 160)  # mid-epoch 2, after epoch_2.pt
    assert find_resume_checkpoint(tmp_path) == tmp_path / "epoch_latest.pt"
    (tmp_path / "epoch_3.pt").write_bytes(b"truncated")  # unreadable: passed over
    assert find_resume_checkpoint(tmp_path) != tmp_path / "epoch_3.pt"


@pytest.mark.slow
def test_caption_less_images_train_image_only_distillation(tiny_corpus, tmp_path, one_run):
    """Cosine/FD distillation needs no captions: with --allow-empty-captions, caption-less rows are kept."""
    data = tmp_path / "data"
    data.mkdir()
    rows = (tiny_corpus / "train.tsv").read_text().splitlines()
    blanked = [rows[0]] + [f"{tiny_corpus / r.split(chr(9))[0]}\t" for r in rows[1:]]
    (data / "no_captions.tsv").write_text("\n".join(blanked) + "\n")
    args = common_args(tiny_corpus, tmp_path, "imgonly", "--epochs", "1", "--job", "distill", "--teacher-model", MODEL,
                       "--teacher-pretrained", str(one_run / "checkpoints" / "epoch_2.pt"),
                       "--student", "mobilenet_v3_small", "--distill-loss", "cosine,fd", "--allow-empty-captions")
    args[args.index("--train-data") + 1] = str(data / "no_captions.tsv")
    run_trainer(args)
    rows = read_results(tmp_path / "imgonly")
    assert rows[-1]["step"] == 256 // 16 and rows[-1]["data/skipped"] == 0
    # without the flag every row is bad and the run stops with one line
    args[args.index("--name") + 1] = "strict"
    result = run_trainer(args[:-1], check=False)
    assert result.returncode == 2 and "bad" in result.stderr and "Traceback" not in result.stderr
