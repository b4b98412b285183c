"""utils.sweep: a grid of tool runs, each scored by the monitor, one table and plots; utils.report replots
the table against any column. A tiny clipc-vit-t2-32 CLIP on the tiny corpus."""
import csv

import pytest
import torch

from compress.models.registry import build_model, open_clip_spec
from utils import report, sweep


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(open_clip_spec("clipc-vit-t2-32")).eval()
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save({"model_spec": model.model_spec, "state_dict": model.state_dict(), "epoch": 1, "step": 8}, path)
    return path


def run_sweep(source, eval_dir, out, ratios, layers):
    return sweep.main(["lowrank", "--pretrained", str(source), "--ratio", *ratios, "--layers", *layers,
                       "--eval-data-dir", str(eval_dir), "--out", str(out), "--benchmarks", "zeroshot",
                       "--workers", "0", "--profile-batch-size", "2", "--towers", "image,text"])


def test_lowrank_sweep_over_ratio_and_layers(source, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run_sweep(source, tiny_corpus / "eval", out, ["0.5"], ["1", "2"]) == 0
    capsys.readouterr()
    # a second sweep reuses the points already written and scored, and adds the new ones
    assert run_sweep(source, tiny_corpus / "eval", out, ["0.25", "0.5"], ["2"]) == 0
    printed = capsys.readouterr().out
    with open(out / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["input", "lowrank_ratio-0.25_layers-2", "lowrank_ratio-0.5_layers-2"]
    assert rows[1]["ratio"] == "0.25" and rows[1]["layers"] == "2" and rows[0]["ratio"] == ""
    with open(out / "input" / "evaluation_metrics_all.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 1  # the input was scored once, by the first sweep
    params = {r["run"]: int(r["params"]) for r in rows}
    with open(out / "lowrank_ratio-0.5_layers-1" / "evaluation_metrics_all.csv") as handle:
        params["lowrank_ratio-0.5_layers-1"] = int(next(csv.DictReader(handle))["params"])
    # more layers factorised, or a smaller kept ratio: fewer parameters; the input has the most
    assert params["input"] > params["lowrank_ratio-0.5_layers-1"] > params["lowrank_ratio-0.5_layers-2"]
    assert params["lowrank_ratio-0.5_layers-2"] > params["lowrank_ratio-0.25_layers-2"]
    assert all(r["zeroshot/shapes/acc1"] for r in rows)
    # the tool's own flag went through: text blocks were factorised too
    written = out / "lowrank_ratio-0.5_layers-1" / "checkpoints" / "epoch_0.pt"
    spec = torch.load(written, weights_only=True)["model_spec"]
    assert sorted(spec["blocks"]) == ["transformer.resblocks.0", "visual.transformer.resblocks.0"]
    for name in ("zeroshot_shapes_acc1_vs_ratio.png", "zeroshot_shapes_acc1_vs_layers.png",
                 "latency_image_ms_vs_ratio.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "| lowrank_ratio-0.25_layers-2 |" in printed and "shapes" in printed
    # the report replots the table against a grid column
    assert report.main(["--table", str(out / "sweep.csv"), "--x", "ratio", "--y", "params", "--group", "layers",
                        "--out-dir", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "params_vs_ratio.png").is_file()


def test_sweep_user_errors_are_one_line(source, tiny_corpus, tmp_path, capsys):
    common = ["--pretrained", str(source), "--eval-data-dir", str(tiny_corpus / "eval"), "--out", str(tmp_path)]
    assert sweep.main(["text_layers", "--ratio", "0.5", *common]) == 2
    assert capsys.readouterr().err.strip() == "error: --ratio: not a grid of text_layers (its grid: --keep-first)"
    assert sweep.main(["token_mask", *common]) == 2
    assert "give at least one grid for token_mask" in capsys.readouterr().err


def test_report_plots_any_column_and_reads_flags_from_params(tmp_path):
    for name, ratio, acc, size in (("a", "0.25", "0.2", "1000"), ("b", "0.5", "0.3", "2000"), ("c", "0.75", "0.35",
                                                                                               "3000")):
        run = tmp_path / name
        run.mkdir()
        (run / "params.txt").write_text(f"job: lowrank\nratio: {ratio}\nlayers: 0,1\n")
        (run / "evaluation_metrics_all.csv").write_text(
            "checkpoint,epoch,step,zeroshot/shapes/acc1,size_bytes,latency_image_ms\n"
            f"epoch_0.pt,0,0,{acc},{size},5.0\n")
    runs = [str(tmp_path / n) for n in "abc"]
    rows, _ = report.gather(runs, flag_columns=["ratio", "layers"])
    assert [r["ratio"] for r in rows] == ["0.25", "0.5", "0.75"] and report.axis_value(rows[0]["layers"]) == 2.0
    assert report.main([*runs, "--x", "ratio", "--out-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "zeroshot_shapes_acc1_vs_ratio.png").is_file()
    assert report.main([*runs, "--x", "size_bytes", "--out-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "zeroshot_shapes_acc1_vs_size_bytes.png").is_file()
    assert report.main([*runs, "--x", "nothing_like_this", "--out-dir", str(tmp_path / "r")]) == 2
