"""The checkpoint monitor end to end: real tiny models, real files, corrupt ones among them."""
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env
from PIL import Image, ImageDraw

from utils import evaluate_checkpoints as monitor_cli

MODEL = "clipc-vit-t2-32"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SHAPES = {"red_circle": ((220, 30, 30), "ellipse"), "blue_square": ((30, 30, 220), "rectangle")}


def draw(colour, shape, offset, size=32):
    image = Image.new("RGB", (size, size), (235, 235, 235))
    getattr(ImageDraw.Draw(image), shape)([offset, offset, offset + 14, offset + 14], fill=colour)
    return image


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    """shapes/{train,test}/<class>/ and coco2017/ with a handful of 32-px pictures."""
    root = tmp_path_factory.mktemp("eval")
    for split, count in (("train", 4), ("test", 2)):
        for name, (colour, shape) in SHAPES.items():
            folder = root / "shapes" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                draw(colour, shape, 2 + 3 * i).save(folder / f"{i}.jpg")
    coco = root / "coco2017"
    (coco / "val2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (name, (colour, shape)) in enumerate(list(SHAPES.items()) * 2, start=1):
        draw(colour, shape, 4 * image_id).save(coco / "val2017" / f"{image_id:012d}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg"})
        for caption in (f"a {name.replace('_', ' ')}", f"one {name.split('_')[0]} shape"):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    (coco / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return root


def age(path: Path, seconds: float = 60) -> None:
    """Backdate a file so the monitor sees it as settled without waiting."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def our_checkpoint(epoch: int, step: int, seed: int) -> dict:
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL)
    return {"epoch": epoch, "step": step, "name": "run", "job": "clip", "model_spec": open_clip_spec(MODEL),
            "state_dict": model.state_dict(), "optimizer": {}, "scaler": {}, "job_state": {}, "rng": {},
            "args": {"model": MODEL}}


@pytest.fixture
def experiment(tmp_path):
    """LOGS/run with two good checkpoints, a mid-epoch one, a corrupt one and a truncated one."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    (run / "params.txt").write_text(f"job: clip\nmodel: {MODEL}\nname: run\n")
    for epoch in (1, 2):
        torch.save(our_checkpoint(epoch, step=10 * epoch, seed=epoch), checkpoints / f"epoch_{epoch}.pt")
    torch.save(our_checkpoint(2, step=25, seed=3), checkpoints / "epoch_latest.pt")
    (checkpoints / "epoch_3.pt").write_bytes(os.urandom(2048))
    whole = (checkpoints / "epoch_1.pt").read_bytes()
    (checkpoints / "epoch_4.pt").write_bytes(whole[: len(whole) // 2])
    for path in checkpoints.iterdir():
        age(path)
    return run


def monitor_args(run, eval_root, *extra):
    return ["--logs-dir", str(run), "--eval-data-dir", str(eval_root), "--workers", "0", "--device", "cpu",
            "--batch-size", "8", "--profile-batch-size", "4", *extra]


def csv_rows(run):
    with open(run / "evaluation_metrics_all.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_monitor_scores_good_checkpoints_once_and_survives_bad_ones(experiment, eval_root, capsys, caplog):
    caplog.set_level(logging.INFO, logger="evaluate_checkpoints")
    assert monitor_cli.main(monitor_args(experiment, eval_root, "--once")) == 0

    rows = csv_rows(experiment)
    assert [(r["checkpoint"], r["epoch"], r["step"]) for r in rows] == [("epoch_1.pt", "1", "10"),
                                                                        ("epoch_2.pt", "2", "20")]
    for column in ("zeroshot/shapes/acc1", "linear_probe/shapes/lp_acc1", "retrieval/coco2017/mean_recall",
                   "retrieval/coco2017/image_retrieval_recall@10", "features/coco2017/modality_gap",
                   "params", "params_image", "macs_image", "macs_text", "latency_image_ms", "latency_text_ms"):
        assert all(r[column] != "" for r in rows), column
    assert rows[0]["zeroshot/shapes/acc1"] != "" and float(rows[0]["params"]) > 1e6
    assert json.loads((experiment / "eval" / "epoch_2.json").read_text())["step"] == 20
    scalars = tensorboard_scalars(experiment)
    assert [step for step, _ in scalars["eval/zeroshot/shapes/acc1"]] == [10, 20]
    assert "eval/latency_image_ms" in scalars

    skipped = {record.getMessage().split(":")[0] for record in caplog.records
               if record.name == "evaluate_checkpoints" and record.levelno == logging.WARNING}
    assert skipped == {"skipping epoch_3.pt", "skipping epoch_4.pt"}
    table = capsys.readouterr().out
    assert "zero-shot shapes acc1" in table and "coco2017 image R@10" in table and "params (M)" in table

    # A restart re-scores nothing that the CSV holds (a new process does look at the bad files once more).
    caplog.clear()
    assert monitor_cli.main(monitor_args(experiment, eval_root, "--once")) == 0
    assert len(csv_rows(experiment)) == 2
    rescored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring")]
    assert not [m for m in rescored if m.endswith(("epoch_1.pt", "epoch_2.pt"))]


def test_watching_retries_a_bad_file_only_after_it_changes(experiment, eval_root, caplog):
    caplog.set_level(logging.INFO, logger="evaluate_checkpoints")
    args = monitor_cli.parse_args(monitor_args(experiment, eval_root, "--benchmarks", "zeroshot"))
    monitor = monitor_cli.Monitor(monitor_cli.open_experiment(args.logs_dir), args, str(eval_root))
    assert monitor.poll() == 2
    assert monitor.poll() == 0  # nothing new; corrupt files not retried
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "evaluate_checkpoints" and r.levelno == logging.WARNING]
    assert len(warnings) == 2

    # The writer finishes epoch_4.pt: it changes, so it is tried again and scored.
    fixed = experiment / "checkpoints" / "epoch_4.pt"
    torch.save(our_checkpoint(4, step=40, seed=4), fixed)
    age(fixed, 30)
    assert monitor.poll() == 1
    assert [r["checkpoint"] for r in csv_rows(experiment)] == ["epoch_1.pt", "epoch_2.pt", "epoch_4.pt"]
    # only the asked-for benchmark ran (plus the profile)
    assert not any(key.startswith("retrieval/") for key in csv_rows(experiment)[0])

    # A file still being written (fresh mtime) waits for the next poll.
    torch.save(our_checkpoint(5, step=50, seed=5), experiment / "checkpoints" / "epoch_5.pt")
    ready, settling = monitor.pending()
    assert [p.name for p in settling] == ["epoch_5.pt"] and not ready


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_monitor_reads_an_open_clip_train_log_dir(tmp_path, eval_root):
    """A real open_clip_train run (its own params.txt and checkpoint format) on our tiny config."""
    launcher = ("import sys; sys.path.insert(0, 'src'); from foundation.model_configs import register_model_configs; "
                "register_model_configs(); from open_clip_train.main import main; main(sys.argv[1:])")
    command = [sys.executable, "-c", launcher, "--model", MODEL, "--dataset-type", "synthetic",
               "--train-num-samples", "16", "--batch-size", "4", "--epochs", "1", "--workers", "0",
               "--save-frequency", "1", "--logs", str(tmp_path), "--name", "oc", "--device", "cpu",
               "--precision", "fp32", "--report-to", ""]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "oc"
    checkpoint = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert "model_spec" not in checkpoint  # the model comes from params.txt
    age(run / "checkpoints" / "epoch_1.pt")

    assert monitor_cli.main(monitor_args(run, eval_root, "--once")) == 0
    [row] = csv_rows(run)
    assert row["checkpoint"] == "epoch_1.pt" and row["epoch"] == "1" and row["step"] == ""
    assert float(row["retrieval/coco2017/mean_recall"]) >= 0
    # no global step in open_clip_train checkpoints: tensorboard gets the epoch
    assert [step for step, _ in tensorboard_scalars(run)["eval/zeroshot/shapes/acc1"]] == [1]


def test_interactive_prompt_and_single_epoch(experiment, eval_root, monkeypatch):
    with open(experiment / "params.txt", "a") as params:
        params.write(f"eval_data_dir: {eval_root}\n")  # so the prompt needn't ask for it
    answers = iter([str(experiment), "2"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert monitor_cli.main([]) == 0  # watches until epoch 2 is scored, then returns
    assert [r["checkpoint"] for r in csv_rows(experiment)] == ["epoch_2.pt"]


def test_user_errors_are_one_line(experiment, eval_root, tmp_path, capsys):
    cases = [
        (["--logs-dir", str(tmp_path / "missing"), "--eval-data-dir", str(eval_root), "--once"],
         "experiment dir not found"),
        (["--logs-dir", str(experiment), "--once"], "--eval-data-dir"),
        (["--logs-dir", str(experiment), "--eval-data-dir", str(tmp_path / "nope"), "--once"], "not found"),
        (monitor_args(experiment, eval_root, "--once", "--datasets", "cifar10"), "cifar10"),
        (monitor_args(experiment, eval_root, "--once", "--benchmarks", "zero-shot"), "unknown benchmark"),
        (monitor_args(experiment, eval_root, "--once", "--epoch", "9"), "no epoch_9.pt"),
        (monitor_args(tmp_path, eval_root, "--once"), "no epoch_N.pt checkpoints"),
    ]
    for argv, message in cases:
        assert monitor_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, (argv, err)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_runs_as_a_plain_script(tmp_path):
    """`python src/utils/evaluate_checkpoints.py` finds its packages (no PYTHONPATH); with no arguments and no
    terminal to prompt on, it says so in one line."""
    script = str(REPO / "src" / "utils" / "evaluate_checkpoints.py")
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: no arguments and no terminal")
    assert "Traceback" not in result.stderr


def test_parser_names_the_script_and_explains_every_flag():
    parser = monitor_cli.build_parser()
    assert parser.prog == "python src/utils/evaluate_checkpoints.py"
    assert all(action.help for action in parser._actions)
