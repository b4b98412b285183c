"""Progress of long work shows where stderr is a file (SLURM): foundation.progress logs a line at a steady
interval without a terminal and draws a tqdm bar on one; the trainer's epochs report through it."""
import io
import logging
import re
import time

import pytest
from conftest import run_trainer, subprocess_env

from foundation.errors import UserError
from foundation.progress import INTERVAL_ENV, Progress, default_interval


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def logger():
    log = logging.getLogger("test_progress")
    log.setLevel(logging.INFO)
    handler = Records()
    log.addHandler(handler)
    log.propagate = False
    yield log, handler.lines
    log.removeHandler(handler)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_without_a_terminal_it_logs_the_first_and_last_update_and_every_interval(logger):
    log, lines = logger
    with Progress(total=8, desc="embedding", unit="img", logger=log, interval=3600, stream=io.StringIO()) as progress:
        for _ in range(8):
            progress.update(1)
    assert len(lines) == 2, lines  # the first update, then the end: the interval never passed
    assert re.fullmatch(r"embedding: 1/8 img \(12%\) in 00:00, [\d.e+]+ img/s, ~00:00 left", lines[0]), lines[0]
    assert lines[1].startswith("embedding: 8/8 img (100%) in 00:00") and "left" not in lines[1], lines[1]

    lines.clear()
    with Progress(total=4, desc="rows", unit="row", logger=log, interval=0, stream=io.StringIO()) as progress:
        for _ in range(4):
            progress.update(1)
            progress.set_postfix(loss="0.5")
    assert [line.split(" in ")[0] for line in lines] == [f"rows: {n}/4 row ({25 * n}%)" for n in range(1, 5)]
    assert lines[-1].endswith(", loss 0.5")  # the end repeats nothing: the last update said it all


def test_a_resumed_count_starts_at_initial_and_its_rate_counts_only_new_work(logger):
    log, lines = logger
    progress = Progress(total=10, initial=6, desc="epoch 1", unit="batch", logger=log, interval=3600,
                        stream=io.StringIO())
    progress.update(2)
    progress.close()
    progress.close()  # closing twice logs nothing more; nor does the end, which the last update already said
    assert len(lines) == 1 and lines[0].startswith("epoch 1: 8/10 batch (80%) in 00:00, "), lines
    # two batches in 4 s: 0.5 batch/s, so 4 s for the two left (the 6 done before the resume do not count)
    assert progress.line(progress.started + 4.0) == "epoch 1: 8/10 batch (80%) in 00:04, 0.5 batch/s, ~00:04 left"


def test_the_interval_comes_from_the_environment(monkeypatch, logger):
    log, lines = logger
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert default_interval() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert default_interval() == 0.5
    assert Progress(total=1, logger=log, stream=io.StringIO()).interval == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(UserError, match=INTERVAL_ENV):
            default_interval()


def test_on_a_terminal_it_is_a_tqdm_bar_and_logs_nothing(logger):
    log, lines = logger
    terminal = Terminal()
    with Progress(total=3, desc="level 1", unit="img", logger=log, interval=0, stream=terminal, leave=True) as progress:
        progress.update(3)
    assert progress.mode == "bar" and lines == []
    assert "level 1" in terminal.getvalue() and "3/3" in terminal.getvalue()


@pytest.mark.parametrize("quiet", ["disabled", "logger at warning", "rank 1"])
def test_it_is_quiet_when_asked_below_info_or_off_rank_zero(logger, monkeypatch, quiet):
    log, lines = logger
    enabled = quiet != "disabled"
    if quiet == "logger at warning":
        log.setLevel(logging.WARNING)
    if quiet == "rank 1":
        monkeypatch.setenv("RANK", "1")
    for stream in (io.StringIO(), Terminal()):
        with Progress(total=2, desc="x", logger=log, interval=0, enabled=enabled, stream=stream) as progress:
            progress.update(2)
            with progress.ticking():
                time.sleep(0.1)
        assert progress.mode is None and lines == [] and stream.getvalue() == ""


def test_ticking_logs_the_elapsed_time_of_work_that_reports_no_count(logger):
    log, lines = logger
    with Progress(desc="k-means: training 4 centroids", logger=log, interval=0.05, stream=io.StringIO()) as progress:
        with progress.ticking():
            time.sleep(0.4)
    assert len(lines) >= 3, lines
    assert all(line.startswith("k-means: training 4 centroids: running in 00:00") for line in lines[:-1]), lines
    assert lines[-1].startswith("k-means: training 4 centroids: done in 00:00"), lines


@pytest.mark.slow
def test_the_trainer_logs_progress_lines_when_stderr_is_no_terminal(tmp_path):
    """run_trainer's stderr is a pipe, as a SLURM job's is a file: the epoch's progress is logged, to stderr
    and to the run's out.log, at the interval the environment sets."""
    result = run_trainer(["--train-data", "synthetic", "--train-num-samples", "128", "--model", "clipc-vit-t2-32",
                          "--batch-size", "32", "--workers", "0", "--epochs", "1", "--log-every-n-steps", "100",
                          "--logs-root", str(tmp_path), "--name", "progress"],
                         env=subprocess_env(**{INTERVAL_ENV: "0"}), timeout=240)
    pattern = re.compile(r"\| INFO \| epoch 0: (\d)/4 batch \((\d+)%\) in \d\d:\d\d")
    on_stderr = [m.group(1) for m in map(pattern.search, result.stderr.splitlines()) if m]
    assert on_stderr == ["1", "2", "3", "4"], result.stderr[-3000:]
    out_log = (tmp_path / "progress" / "out.log").read_text()
    assert [m.group(1) for m in map(pattern.search, out_log.splitlines()) if m] == on_stderr, out_log
    assert "\r" not in result.stderr  # no bar was drawn into the file

    quiet = run_trainer(["--train-data", "synthetic", "--train-num-samples", "64", "--model", "clipc-vit-t2-32",
                         "--batch-size", "32", "--workers", "0", "--epochs", "1", "--log-level", "warning",
                         "--logs-root", str(tmp_path), "--name", "quiet"],
                        env=subprocess_env(**{INTERVAL_ENV: "0"}), timeout=240)
    assert not pattern.search(quiet.stderr) and not pattern.search((tmp_path / "quiet" / "out.log").read_text())
