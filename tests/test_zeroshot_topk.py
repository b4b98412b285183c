"""Zero-shot (and linear-probe) accuracy at any k: acc{k} by hand, through run_benchmarks, the monitor's
--topk columns, and the trainer's in-loop eval; the default stays acc1 and acc5."""
import csv
import json

import pytest
import torch
from conftest import run_trainer

from eval.metrics import classification_metrics
from foundation.errors import UserError
from training.params import parse_args
from utils import evaluate_checkpoints as monitor_cli

MODEL = "clipc-vit-t2-32"


def test_accuracy_at_any_k_by_hand():
    logits = torch.tensor([
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0],  # true 0: rank 0
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0],  # true 3: rank 3
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0],  # true 7: rank 7
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true 2: tied with 0, 1, 3 -> rank 3
    ])
    labels = torch.tensor([0, 3, 7, 2])
    metrics = classification_metrics(logits, labels, topk=[20, 3, 1, 4, 10])
    assert metrics == {"acc1": 0.25, "acc3": 0.25, "acc4": 0.75, "acc10": 1.0, "acc20": 1.0,
                       "mean_per_class_recall": pytest.approx(1 / 4)}
    assert set(classification_metrics(logits, labels)) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(classification_metrics(logits, labels, prefix="lp_", topk=[2])) == {"lp_acc2",
                                                                                     "lp_mean_per_class_recall"}
    for bad in ([0], [], [1.5]):
        with pytest.raises(ValueError, match="k >= 1"):
            classification_metrics(logits, labels, topk=bad)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("topk") / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"job: clip\nmodel: {MODEL}\nname: run\n")
    model = open_clip.create_model(MODEL)
    torch.save({"epoch": 1, "step": 5, "model_spec": open_clip_spec(MODEL), "state_dict": model.state_dict()},
               run / "checkpoints" / "epoch_1.pt")
    return run


def _monitor(run, tiny_corpus, *extra):
    return monitor_cli.main(["--logs-dir", str(run), "--eval-data-dir", str(tiny_corpus / "eval"), "--once",
                             "--workers", "0", "--device", "cpu", "--batch-size", "64", "--profile-batch-size", "4",
                             "--benchmarks", "zeroshot", "--datasets", "shapes", "--threads", "1", *extra])


def test_monitor_topk_columns_are_the_eval_packages_numbers(run_dir, tiny_corpus):
    import eval

    assert _monitor(run_dir, tiny_corpus, "--topk", "1", "3", "20") == 0
    with open(run_dir / "evaluation_metrics_all.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    zero_shot = {k.split("/")[-1]: float(v) for k, v in row.items() if k.startswith("zeroshot/shapes/")}
    assert set(zero_shot) == {"acc1", "acc3", "acc20", "mean_per_class_recall"}
    assert zero_shot["acc1"] <= zero_shot["acc3"] <= zero_shot["acc20"] < 1.0  # 36 classes: top-20 can miss
    expected = eval.run_benchmarks(eval.load_encoder(run_dir / "checkpoints" / "epoch_1.pt"), tiny_corpus / "eval",
                                   benchmarks=("zeroshot",), datasets=["shapes"], batch_size=64, topk=(1, 3, 20))
    assert zero_shot == pytest.approx({k.split("/")[-1]: v for k, v in expected.items()})


def test_monitor_refuses_a_bad_k(run_dir, tiny_corpus, capsys):
    assert _monitor(run_dir, tiny_corpus, "--topk", "0") == 2
    assert "--topk 0: every k must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_trainer_topk_flag_reaches_the_in_loop_eval(tiny_corpus, tmp_path):
    assert parse_args(["--train-data", "synthetic"]).topk == [1, 5]
    with pytest.raises(UserError, match="--topk 1 0"):
        parse_args(["--train-data", "synthetic", "--topk", "1", "0"])
    run_trainer(["--job", "clip", "--model", MODEL, "--train-data", "synthetic", "--train-num-samples", "64",
                 "--batch-size", "32", "--epochs", "1", "--warmup", "1", "--workers", "0", "--zeroshot-frequency", "1",
                 "--eval-data-dir", str(tiny_corpus / "eval"), "--topk", "2", "20", "--logs", str(tmp_path),
                 "--name", "topk", "--report-to", "none", "--log-level", "warning"])
    rows = [json.loads(line) for line in (tmp_path / "topk" / "results.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "eval/zeroshot/shapes/acc20" in row]
    assert evaluated and "eval/zeroshot/shapes/acc2" in evaluated[0]
    assert "eval/zeroshot/shapes/acc1" not in evaluated[0] and "eval/zeroshot/shapes/acc5" not in evaluated[0]
