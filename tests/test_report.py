"""utils.report on hand-made monitor CSVs: one row per run, last/best selection, files written, Pareto front."""
import csv

import pytest

from utils import report

COLUMNS = ["checkpoint", "epoch", "step", "zeroshot/shapes/acc1", "retrieval/coco2017/image_retrieval_recall@1",
           "retrieval/coco2017/image_retrieval_recall@10", "retrieval/coco2017/image_retrieval_recall@5",
           "retrieval/coco2017/text_retrieval_recall@1", "params", "macs_image", "macs_text",
           "latency_image_ms", "latency_text_ms", "eval_seconds"]


def write_run(root, name, rows, job=None):
    run = root / name
    run.mkdir(parents=True)
    with open(run / "evaluation_metrics_all.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    if job:
        (run / "params.txt").write_text(f"job: {job}\nname: {name}\n")
    return run


def row(epoch, acc, latency, params=2_000_000, r1=0.1):
    return {"checkpoint": f"epoch_{epoch}.pt", "epoch": epoch, "step": 10 * epoch, "zeroshot/shapes/acc1": acc,
            "retrieval/coco2017/image_retrieval_recall@1": r1, "retrieval/coco2017/image_retrieval_recall@5": 0.5,
            "retrieval/coco2017/image_retrieval_recall@10": 0.7, "retrieval/coco2017/text_retrieval_recall@1": 0.2,
            "params": params, "macs_image": 3_500_000, "macs_text": 1_000_000, "latency_image_ms": latency,
            "latency_text_ms": 4.0, "eval_seconds": 1.0}


@pytest.fixture
def runs(tmp_path):
    dense = write_run(tmp_path, "dense", [row(1, 0.30, 20.0), row(3, 0.62, 20.5), row(2, 0.70, 19.0)], job="clip")
    lowrank = write_run(tmp_path, "lowrank", [row(0, 0.55, 12.0, params=1_200_000)], job="lowrank")
    flip = write_run(tmp_path, "flip", [row(0, 0.40, 14.0, params=2_000_000)], job="token_mask")
    return tmp_path, [dense, lowrank, flip]


def test_table_has_one_row_per_run_with_the_last_checkpoint(runs, capsys):
    root, dirs = runs
    out = root / "report"
    assert report.main([str(d) for d in dirs] + ["--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    header, body = lines[0], lines[1:]
    assert len(body) == 3
    for label in ("params (M)", "img MMACs", "img ms/batch", "shapes acc1", "coco2017 t2i R@1", "coco2017 i2t R@1"):
        assert label in header
    # R@1, R@5, R@10 in natural order
    assert header.index("t2i R@1 ") < header.index("t2i R@5") < header.index("t2i R@10")
    dense_line = next(line for line in body if line.startswith("| dense"))
    assert "epoch_3.pt" in dense_line and "0.6200" in dense_line and "| clip " in dense_line
    assert "1.200" in next(line for line in body if line.startswith("| lowrank"))  # params in millions
    with open(out / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["dense", "lowrank", "flip"]
    assert rows[0]["checkpoint"] == "epoch_3.pt" and rows[2]["job"] == "token_mask"
    assert (out / "report.md").read_text().startswith("| run ")
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_best_selection_and_all_checkpoints(runs):
    root, dirs = runs
    rows, metric = report.gather([str(dirs[0])], select="best")
    assert metric == "zeroshot/shapes/acc1" and rows[0]["checkpoint"] == "epoch_2.pt"
    rows, _ = report.gather([str(dirs[0])], all_checkpoints=True)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    rows, _ = report.gather([str(dirs[0])], select="best", metric="retrieval/coco2017/text_retrieval_recall@1")
    assert len(rows) == 1


def test_pareto_front_by_hand():
    # (latency, accuracy): b is slower and worse than a; d is fastest; c is slowest but most accurate
    points = [(10.0, 0.5), (12.0, 0.4), (20.0, 0.7), (5.0, 0.3)]
    assert report.pareto_front(points) == [3, 0, 2]


def test_missing_runs_are_skipped_and_none_is_an_error(runs, tmp_path, capsys):
    root, dirs = runs
    rows, _ = report.gather([str(dirs[1]), str(root / "never_scored")])
    assert [r["run"] for r in rows] == ["lowrank"]
    assert "never_scored" in capsys.readouterr().err
    assert report.main([str(root / "never_scored"), "--out-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no scored runs")


def test_parser_names_the_module_and_explains_every_flag():
    parser = report.build_parser()
    assert parser.prog == "clipcompress report"
    assert all(action.help for action in parser._actions)


def test_pareto_plot_reads_without_the_code():
    # nine runs, five of them crowded within 2 ms and 0.013 accuracy of each other (the demo's report)
    demo = [("clip_dense", 48.91, 0.2140), ("protorkd_minilm", 29.22, 0.1924), ("protorkd_no_teacher", 29.84, 0.1667),
            ("prune_p0.5_kd", 17.49, 0.2171), ("prune_p0.5", 15.74, 0.2058), ("distill_student", 16.21, 0.2047),
            ("lowrank_0.5", 19.70, 0.1872), ("fisher_mac0.6", 16.99, 0.2119), ("flip_0.5", 17.10, 0.2130)]
    rows = [{"run": name, "checkpoint": "epoch_5.pt", "latency_image_ms": str(ms), "zeroshot/shapes/acc1": str(acc),
             "latency_batch_size": "32"} for name, ms, acc in demo]
    figure, count = report.pareto_figure(rows, "zeroshot/shapes/acc1", "latency_image_ms")
    axes = figure.axes[0]
    assert count == 9
    assert axes.get_title() == "Zero-shot top-1 accuracy on shapes against image latency"
    assert axes.get_xlabel() == "image latency (ms per batch of 32, median wall time)"
    assert axes.get_ylabel() == "zero-shot top-1 accuracy on shapes (0 to 1)"
    renderer = figure.canvas.get_renderer()
    labels = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
    assert set(labels) == {name for name, _, _ in demo}
    boxes = list(labels.items())
    overlapping = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1:] if box.overlaps(other)]
    assert not overlapping, overlapping
    import matplotlib.pyplot as plt

    plt.close(figure)
    # a column the report knows nothing of keeps its name; millions are scaled on the axis
    assert report.axis_label("ratio") == "ratio"
    assert report.axis_name("params") == ("parameters", "millions", 1e6)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(runs, small_disk, capsys):
    """The report's CSV, markdown and plot are each written whole or not at all; a disk with no room is exit 2
    and one line (these writes cannot SIGBUS, so the probe runs in-process)."""
    root, dirs = runs
    out = small_disk / "report"
    out.mkdir()
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # every block taken
        with pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(bytes(4096))
    assert report.main([str(d) for d in dirs] + ["--out-dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: cannot write") and "No space left on device" in error and "\n" not in error
    assert list(out.iterdir()) == []  # nothing half-written, no temp file left
