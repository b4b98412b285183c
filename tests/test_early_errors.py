"""A path that is read only after the work (the in-loop eval's root, the monitor's and the sweep's, a cascade
experiment's, ProtoRKD's --external-teacher) is checked when the command starts: exit 2, one line, nothing
trained or written."""
import json

import pytest
from conftest import run_trainer

from foundation.errors import UserError


def classification_root(root):
    """An eval root holding one ImageFolder classification set (found by its layout: test/<class>/)."""
    for name in ("red", "blue"):
        (root / "shapes" / "test" / name).mkdir(parents=True)
    return root


def retrieval_root(root):
    """An eval root holding one retrieval set (coco2017/: val2017/ and its captions file)."""
    (root / "coco2017" / "val2017").mkdir(parents=True)
    (root / "coco2017" / "annotations").mkdir()
    (root / "coco2017" / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"images": [], "annotations": []}))
    return root


def trainer_args(logs, *extra):
    return ["--train-data", "synthetic", "--train-num-samples", "64", "--model", "clipc-vit-t2-32", "--batch-size",
            "32", "--workers", "0", "--epochs", "1", "--logs-root", str(logs), "--name", "early", *extra]


def one_error_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


@pytest.mark.parametrize("layout, flags, says", [
    (None, ["--zeroshot-frequency", "1"], "folder not found"),
    ("empty", ["--zeroshot-frequency", "1"], "no evaluation sets in it"),
    ("retrieval", ["--zeroshot-frequency", "1"], "zeroshot needs a classification set"),
    ("retrieval", ["--zeroshot-frequency", "1", "--linear-frequency", "2"], "zeroshot/linear_probe need"),
    ("classification", ["--retrieval-frequency", "1"], "retrieval needs a retrieval set"),
])
def test_the_trainer_checks_the_eval_root_before_training(tmp_path, capsys, layout, flags, says):
    from training.main import main

    root = tmp_path / "eval"
    if layout is not None:
        root.mkdir()
        {"empty": lambda r: r, "retrieval": retrieval_root, "classification": classification_root}[layout](root)
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_info:
        main(trainer_args(logs, "--eval-data-dir", str(root), *flags))
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--eval-data-dir {root}" in line and says in line, line
    assert not logs.exists(), "a refused run must not create its run folder"


def test_the_trainer_takes_an_eval_root_with_a_set_for_each_benchmark(tmp_path):
    from training.params import parse_args

    root = retrieval_root(classification_root(tmp_path / "eval"))
    args = parse_args(trainer_args(tmp_path / "logs", "--eval-data-dir", str(root), "--zeroshot-frequency", "1",
                                   "--linear-frequency", "1", "--retrieval-frequency", "1"))
    assert args.eval_data_dir == str(root)


@pytest.mark.slow
def test_the_issue_command_exits_2_at_once_without_training(tmp_path):
    """`--eval-data-dir /no/such/dir --zeroshot-frequency 1` trained a whole epoch, saved, then ended in a
    FileNotFoundError traceback (rc 1)."""
    result = run_trainer(trainer_args(tmp_path / "logs", "--eval-data-dir", "/no/such/dir", "--zeroshot-frequency",
                                      "1"), check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_error_line(result.stderr) == "error: --eval-data-dir /no/such/dir: folder not found"
    assert not (tmp_path / "logs").exists()


def test_the_monitor_checks_the_eval_root_before_writing_anything(tmp_path, capsys):
    from utils import evaluate_checkpoints as monitor

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"eval_data_dir: {tmp_path / 'gone'}\n")
    before = sorted(p.name for p in run.rglob("*"))
    only_classes = classification_root(tmp_path / "eval")
    cases = [
        ([], f"eval_data_dir of {run / 'params.txt'} {tmp_path / 'gone'}: folder not found"),
        (["--eval-data-dir", str(tmp_path / "missing")], "folder not found"),
        (["--eval-data-dir", str(only_classes), "--benchmarks", "retrieval"], "retrieval needs a retrieval set"),
        (["--eval-data-dir", str(only_classes), "--datasets", "coco2017"], "['coco2017'] not in it"),
    ]
    for extra, says in cases:
        assert monitor.main(["--logs-dir", str(run), "--once", *extra]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert says in line, line
        assert sorted(p.name for p in run.rglob("*")) == before, "a refused monitor must write nothing (no lock)"
    # the default benchmarks score whatever the root has sets for: past the eval check, to the checkpoints
    assert monitor.main(["--logs-dir", str(run), "--once", "--eval-data-dir", str(only_classes)]) == 2
    assert "no epoch_N.pt checkpoints" in one_error_line(capsys.readouterr().err)


def test_the_sweep_checks_the_eval_root_before_running_a_tool(tmp_path, capsys):
    from utils import sweep

    out = tmp_path / "out"
    code = sweep.main(["lowrank", "--pretrained", str(tmp_path / "model.pt"), "--ratio", "0.5", "--layers", "1",
                       "--eval-data-dir", str(tmp_path / "missing"), "--out", str(out), "--no-input"])
    assert code == 2
    assert "folder not found" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_the_sweep_scores_the_benchmarks_its_root_has_sets_for(tmp_path):
    from utils import sweep

    args = sweep.build_parser().parse_args(["lowrank", "--pretrained", "m.pt", "--eval-data-dir",
                                            str(classification_root(tmp_path / "eval")), "--out", str(tmp_path)])
    assert args.benchmarks == ["zeroshot", "retrieval"]  # its default
    sweep.scored_benchmarks(args)
    assert args.benchmarks == ["zeroshot"]  # what the monitor is then asked for, and can score
    args.benchmarks = ["retrieval", "features"]
    with pytest.raises(UserError, match="retrieval/features need a retrieval set"):
        sweep.scored_benchmarks(args)


def test_a_distill_cascade_experiment_checks_its_eval_root_before_building_the_student(tmp_path, monkeypatch,
                                                                                        capsys):
    import utils.cascade as cascade
    from utils.cascade import experiments

    def must_not_build(*args, **kwargs):
        raise AssertionError("the levels were built before the eval root was checked")

    monkeypatch.setattr(experiments, "resolve_levels", must_not_build)
    config = tmp_path / "distill.toml"
    config.write_text(f"""
experiment = "distill"
[data]
eval_data_dir = "{tmp_path / 'missing'}"
[[levels]]
distill = {{student = "mobilenet_v3_small", epochs = 1}}
[[levels]]
checkpoint = "{tmp_path / 'large.pt'}"
""")
    with pytest.raises(SystemExit) as exit_info:
        cascade.main(["--config", str(config), "--log-dir", str(tmp_path / "logs")])
    assert exit_info.value.code == 2
    assert "folder not found" in one_error_line(capsys.readouterr().err)
    # a search experiment reads its gallery (the eval root) before building any level, too
    config.write_text(config.read_text().replace('experiment = "distill"', 'experiment = "topk"'))
    with pytest.raises(SystemExit) as exit_info:
        cascade.main(["--config", str(config), "--log-dir", str(tmp_path / "logs")])
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_protorkd_reads_its_external_teacher_before_the_teacher_pass(tiny_corpus, tmp_path):
    """--external-teacher is read before the teacher embeds every caption, not after."""
    missing = tmp_path / "external.npy"
    result = run_trainer(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model",
                          "clipc-vit-t2-32", "--batch-size", "32", "--workers", "0", "--epochs", "1",
                          "--distiller", "proto", "--k", "4", "--w-proto-external", "1", "--external-teacher",
                          str(missing), "--logs-root", str(tmp_path / "logs"), "--name", "ext"],
                         check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--external-teacher {missing}" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    log = (tmp_path / "logs" / "ext" / "out.log").read_text()
    assert "teacher embeddings" not in log, log  # neither built nor reused: never reached
    assert not list((tmp_path / "logs" / "ext").glob("checkpoints/*.pt"))
    assert not list((tmp_path / "logs" / "ext").glob("cache/teacher_*"))

