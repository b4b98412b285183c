"""Checkpoint monitor: score every completed checkpoint of an experiment, once, while (or after) it trains.

    python src/utils/evaluate_checkpoints.py                        # asks for the experiment dir (and an epoch)
    python src/utils/evaluate_checkpoints.py --logs-dir logs/run --eval-data-dir data/eval          # keep watching
    clipcompress monitor --logs-dir logs/run --eval-data-dir data/eval --once      # score, print

It watches `<logs-dir>/checkpoints/` for `epoch_N.pt` (never `epoch_latest.pt`, which is rewritten mid-epoch),
rebuilds each model — from the checkpoint's `model_spec`, or for an open_clip_train run from the `model:` line
of its params.txt — scores it with `eval.run_benchmarks`, and profiles it (params, MACs, latency). Results go to
  <logs-dir>/evaluation_metrics_all.csv   one row per checkpoint (rewritten atomically)
  <logs-dir>/eval/epoch_N.json            the same row as JSON
  <logs-dir>/tensorboard/                 scalars eval/<metric> at the checkpoint's global step
What the CSV already holds is never scored again, so the monitor can be stopped and restarted at will.
The `stage` column says where a job with stages wrote the checkpoint (`--job prune`: search, after search,
fine-tune, after fine-tune; empty for other jobs). A checkpoint written during UPop's search holds the dense
weights and masks; it is scored as the model surgery makes of it (compress.models.pruning.prune_clip: the same
function), so its params and MACs are those of the pruned model, not the dense one.
A file that is still being written, is corrupt, or is not a checkpoint is logged in one line and skipped; it is
tried again only if it changes.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a plain script: Python put src/utils/ first on sys.path; the package root is src/.
    _src = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _src / "utils"]
    sys.path.insert(0, str(_src))

import argparse
import csv
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from foundation import checkpoint as checkpoint_io
from foundation.errors import CheckpointRefused, UserError
from foundation.locks import RunLock

log = logging.getLogger("evaluate_checkpoints")

CSV_NAME = "evaluation_metrics_all.csv"
MONITOR_LOCK = "monitor.lock"
LEADING_COLUMNS = ["checkpoint", "epoch", "step", "stage"]
# A file whose size and mtime have not moved for this long is taken as complete (open_clip_train's epoch_N.pt
# is written in place, not atomically).
SETTLE_SECONDS = 2.0


# --- command line --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python src/utils/evaluate_checkpoints.py",
        description="Score each epoch_N.pt of an experiment once: zero-shot, linear probe, retrieval, "
        "feature stats, params/MACs/latency. With no arguments, asks for the experiment dir."
    )
    parser.add_argument("--logs-dir", help="the experiment dir LOGS/<name> (holds checkpoints/ and params.txt)")
    parser.add_argument("--epoch", type=int, default=None, help="score only checkpoints/epoch_N.pt")
    parser.add_argument("--once", action="store_true", help="score what is there, print a table, exit")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="how often to look for new checkpoints")
    parser.add_argument("--eval-data-dir", default=None,
                        help="root of the evaluation sets (default: eval_data_dir in params.txt)")
    parser.add_argument("--benchmarks", nargs="+", default=None,
                        help="any of zeroshot linear_probe retrieval features (default: all)")
    parser.add_argument("--datasets", nargs="+", default=None, help="restrict to these dataset names")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 5], metavar="K",
                        help="k of the zero-shot and linear-probe accuracies, columns acc{k} / lp_acc{k} "
                             "(e.g. 1 3 5 10 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where models are scored (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images (and captions) per encoder forward")
    parser.add_argument("--allow-text-encoder", action="append", default=[], metavar="NAME_OR_FILE",
                        help="a sentence-transformers model or open_clip text-teacher weights file that a ProtoRKD "
                             "checkpoint may name (repeatable); by default only the bundled all-MiniLM-L6-v2 is "
                             "loaded, since a checkpoint never chooses what is read or downloaded")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers for image decoding")
    parser.add_argument("--model", default=None,
                        help="open_clip model name for open_clip_train checkpoints (default: params.txt `model`)")
    parser.add_argument("--profile-batch-size", type=int, default=32, help="batch size of the latency measure")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1-2 keeps a monitor beside a "
                        "CPU training run from slowing it down")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="verbosity of the monitor's own log lines (debug adds tracebacks of failed scorings). "
                             "Embedding progress is a bar on a terminal, else a line every "
                             "$CLIPCOMPRESS_PROGRESS_SECONDS (default 30); warning: none")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def ask_interactively() -> List[str]:
    """ProtoCLIP-style prompts, turned into the equivalent command-line arguments."""
    try:
        logs_dir = input("Experiment dir to watch (LOGS/<name>): ").strip()
        epoch = input("Epoch to evaluate (blank: every epoch, keep watching): ").strip()
        argv = ["--logs-dir", logs_dir]
        if epoch:
            argv += ["--epoch", epoch]
        params_file = Path(logs_dir).expanduser() / "params.txt"
        if not _params_eval_data_dir(params_file):
            argv += ["--eval-data-dir", input("Evaluation data dir: ").strip()]
    except EOFError:
        raise UserError("no arguments and no terminal to ask on: pass --logs-dir and --eval-data-dir") from None
    return argv


def _params_eval_data_dir(params_file: Path) -> Optional[str]:
    from eval.models import read_params_file

    if params_file.is_file():
        value = read_params_file(params_file).get("eval_data_dir")
        if value and Path(str(value)).is_dir():
            return str(value)
    return None


# --- the experiment dir --------------------------------------------------------------------------------


@dataclass
class Experiment:
    root: Path
    params: Dict[str, Any]

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def csv_path(self) -> Path:
        return self.root / CSV_NAME

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"


def open_experiment(logs_dir: str) -> Experiment:
    from eval.models import read_params_file

    root = Path(logs_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"experiment dir not found: {root}")
    params_file = root / "params.txt"
    return Experiment(root, read_params_file(params_file) if params_file.is_file() else {})


def epoch_checkpoints(experiment: Experiment, only_epoch: Optional[int] = None) -> List[Tuple[int, Path]]:
    """(epoch, path) of every checkpoints/epoch_N.pt, by epoch; epoch_latest.pt and temp files never match."""
    found = checkpoint_io.epoch_checkpoints(experiment.checkpoints)
    return sorted((epoch, path) for epoch, path in found.items() if only_epoch is None or epoch == only_epoch)


# --- results: CSV, JSON, tensorboard -------------------------------------------------------------------


def read_results(csv_path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    if not csv_path.is_file():
        return [], []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def append_result(csv_path: Path, row: Dict[str, Any]) -> None:
    """Add `row` to the CSV, growing the header when it brings new columns.

    The whole (small) file is rewritten atomically every time rather than appended to: an interrupted append
    would leave a half row that the restart logic would then misread.
    """
    columns, rows = read_results(csv_path)
    for column in LEADING_COLUMNS + sorted(row):
        if column not in columns:
            columns.append(column)
    columns = LEADING_COLUMNS + [c for c in columns if c not in LEADING_COLUMNS]
    rows.append({key: _csv_value(value) for key, value in row.items()})

    text = io.StringIO(newline="")  # csv writes its own \r\n row ends; nothing may translate them
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    checkpoint_io.atomic_write_bytes(csv_path, text.getvalue().encode("utf-8"))


def _csv_value(value: Any) -> Any:
    return "" if value is None else value


def write_json(path: Path, row: Dict[str, Any]) -> None:
    checkpoint_io.atomic_write_bytes(path, json.dumps(row, indent=2, sort_keys=False).encode("utf-8"))


class TensorboardScalars:
    """eval/<metric> scalars into the experiment's tensorboard dir (own event file beside the trainer's)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer = None

    def write(self, values: Dict[str, Any], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"eval/{name}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


# --- scoring -------------------------------------------------------------------------------------------


class SkipCheckpoint(Exception):
    """This file can't be scored as it is (corrupt, truncated, unknown format)."""


class Monitor:
    def __init__(self, experiment: Experiment, args: argparse.Namespace, eval_data_dir: str):
        self.experiment = experiment
        self.args = args
        self.eval_data_dir = eval_data_dir
        self.tensorboard = TensorboardScalars(experiment.tensorboard_dir)
        # path -> (size, mtime) at the failed attempt: not retried until the file changes.
        self.failed: Dict[Path, Tuple[int, int]] = {}

    def scored_checkpoint_names(self) -> set:
        return {row.get("checkpoint", "") for row in read_results(self.experiment.csv_path)[1]}

    def pending(self) -> Tuple[List[Tuple[int, Path]], List[Path]]:
        """(checkpoints ready to score, ones still settling)."""
        scored = self.scored_checkpoint_names()
        ready, settling = [], []
        for epoch, path in epoch_checkpoints(self.experiment, self.args.epoch):
            if path.name in scored:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed between listing and stat (--delete-previous-checkpoint)
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if self.failed.get(path) == signature:
                continue
            if time.time() - stat.st_mtime < SETTLE_SECONDS:
                settling.append(path)
            else:
                ready.append((epoch, path))
        return ready, settling

    def poll(self) -> int:
        """Score every ready checkpoint; the number scored."""
        ready, _ = self.pending()
        scored = 0
        for epoch, path in ready:
            try:
                self.score(epoch, path)
                scored += 1
            except SkipCheckpoint as reason:
                self._remember_failure(path)
                log.warning("skipping %s: %s (retried only if the file changes)", path.name, reason)
            # keep watching whatever one checkpoint does (a UserError from loading it, such as a refused
            # model_spec, is about that file too); details at --log-level debug
            except Exception as error:
                self._remember_failure(path)
                log.warning("failed to score %s: %s: %s", path.name, type(error).__name__, _first_line(error))
                log.debug("traceback", exc_info=True)
        return scored

    def _remember_failure(self, path: Path) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        self.failed[path] = (stat.st_size, stat.st_mtime_ns)

    def score(self, epoch_from_name: int, path: Path) -> Dict[str, Any]:
        from compress.ops.profile import model_size_bytes, profile_encoder
        from eval import encoder_from_model, run_benchmarks
        from eval.models import model_from_checkpoint
        from foundation.checkpoint import load_checkpoint

        started = time.perf_counter()
        log.info("scoring %s", path)
        try:
            # only a regular file is opened, and nothing is read that foundation.checkpoint's checks refuse
            # (truncated, another format, a FIFO, a link to /dev/zero, a compressed record, an unsafe pickle)
            checkpoint = load_checkpoint(str(path))
        except CheckpointRefused as error:
            raise SkipCheckpoint(f"unreadable ({_first_line(error)})") from None
        try:
            model = model_from_checkpoint(checkpoint, model_name=self.args.model, params=self.experiment.params,
                                          allowed_text_encoders=self.args.allow_text_encoder)
        except CheckpointRefused as error:  # a spec its schema refuses, weights that do not fit it: never built
            raise SkipCheckpoint(f"refused ({_first_line(error)})") from None
        except (ValueError, KeyError, TypeError) as error:
            raise SkipCheckpoint(f"unknown checkpoint format ({_first_line(error)})") from None
        stage = training_stage(checkpoint, model, self.experiment.params)
        model = surgically_pruned(model, path.name)
        encoder = encoder_from_model(model.to(self.args.device), device=self.args.device)

        metrics = run_benchmarks(
            encoder,
            self.eval_data_dir,
            benchmarks=self.args.benchmarks or ("zeroshot", "linear_probe", "retrieval", "features"),
            datasets=self.args.datasets,
            batch_size=self.args.batch_size,
            workers=self.args.workers,
            topk=self.args.topk,
        )
        profile = profile_encoder(encoder, batch_size=self.args.profile_batch_size)
        # size on disk beside params: a quantized model keeps its parameter count but not its bytes; the
        # file size also holds what a training checkpoint carries besides the model (optimizer, RNG state)
        profile.update(size_bytes=model_size_bytes(encoder.model), checkpoint_bytes=path.stat().st_size)

        epoch = int(checkpoint.get("epoch", epoch_from_name))
        step = checkpoint.get("step")  # open_clip_train checkpoints have none: tensorboard falls back to epoch
        row = {
            "checkpoint": path.name,
            "epoch": epoch,
            "step": int(step) if step is not None else None,
            "stage": stage,
            **metrics,
            **profile,
            "eval_seconds": round(time.perf_counter() - started, 2),
            "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(self.experiment.eval_dir / f"epoch_{epoch_from_name}.json", row)
        self.tensorboard.write({**metrics, **profile}, step=int(step) if step is not None else epoch)
        append_result(self.experiment.csv_path, row)  # last: a crash before here means "not scored yet"
        log.info("%s: %s (%.1fs)", path.name, _headline(row), row["eval_seconds"])
        return row

    def run_once(self) -> int:
        ready, settling = self.pending()
        if settling:  # just written: give the writer SETTLE_SECONDS to finish
            time.sleep(SETTLE_SECONDS)
        return self.poll()

    def watch(self) -> None:
        if not self.experiment.checkpoints.is_dir():
            log.info("waiting for %s to appear", self.experiment.checkpoints)
        while True:
            self.poll()
            if self.args.epoch is not None and f"epoch_{self.args.epoch}.pt" in self.scored_checkpoint_names():
                return
            time.sleep(self.args.poll_seconds)


PRUNE_STAGES = ("search", "after search", "fine-tune", "after fine-tune")


def training_stage(checkpoint: Dict[str, Any], model: torch.nn.Module, params: Dict[str, Any]) -> str:
    """Where a `--job prune` run was when it wrote `checkpoint` (one of PRUNE_STAGES): during the search the
    model is a masked_clip, and the search is over once the step reaches the job's search length; after surgery
    it is a pruned_clip, fine-tuned until the run's last epoch. '' for any other job."""
    from compress.models.pruning import MASKED_KIND

    if (checkpoint.get("job") or params.get("job")) != "prune":
        return ""
    step, epoch = checkpoint.get("step"), checkpoint.get("epoch")
    if getattr(model, "model_spec", {}).get("kind") == MASKED_KIND:
        job_state = checkpoint.get("job_state")
        search_steps = job_state.get("search_steps") if isinstance(job_state, dict) else None
        done = type(search_steps) is int and type(step) is int and step >= search_steps
        return "after search" if done else "search"
    args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else params
    return "after fine-tune" if type(epoch) is int and epoch == args.get("epochs") else "fine-tune"


def surgically_pruned(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """A masked_clip (UPop's search) as the genuinely smaller model its masks make (prune_clip: cut units
    removed, the other mask values folded in, the same function), so its cost is what pruning leaves; any
    other model as it is."""
    from compress.models import pruning

    if getattr(model, "model_spec", {}).get("kind") != pruning.MASKED_KIND:
        return model
    try:
        return pruning.prune_clip(model, pruning.attached_masks(model))
    except ValueError as error:  # a mask that removes a whole layer: scored masked, at the dense cost
        log.warning("%s: scored as the masked dense model (%s)", name, _first_line(error))
        return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# --- the summary table ---------------------------------------------------------------------------------

_TABLE_METRICS = [  # (regex on column name, short label)
    (r"^zeroshot/(.+)/acc1$", "zero-shot {} acc1"),
    (r"^linear_probe/(.+)/lp_acc1$", "linear probe {} acc1"),
    (r"^retrieval/(.+)/image_retrieval_recall@(\d+)$", "{} image R@{}"),
    (r"^retrieval/(.+)/text_retrieval_recall@(\d+)$", "{} text R@{}"),
    (r"^retrieval/(.+)/mean_recall$", "{} mean recall"),
    (r"^features/(.+)/modality_gap$", "{} modality gap"),
    (r"^params$", "params (M)"),
    (r"^macs_image$", "image MMACs/sample"),
    (r"^macs_text$", "text MMACs/sample"),
    (r"^latency_image_ms$", "image ms/batch"),
    (r"^latency_text_ms$", "text ms/batch"),
    (r"^size_bytes$", "weights MB"),
]


def format_table(columns: List[str], rows: List[Dict[str, str]], max_checkpoints: int = 8) -> str:
    """Key metrics (rows) × the last `max_checkpoints` checkpoints (columns)."""
    rows = sorted(rows, key=lambda r: int(r.get("epoch") or 0))[-max_checkpoints:]
    if not rows:
        return "(no checkpoints scored)"
    lines: List[Tuple[str, List[str]]] = [("epoch", [r.get("epoch") or "-" for r in rows]),
                                          ("step", [r.get("step") or "-" for r in rows])]
    if any(r.get("stage") for r in rows):
        lines.append(("stage", [r.get("stage") or "-" for r in rows]))
    for pattern, label in _TABLE_METRICS:
        for column in sorted(columns, key=_natural_order):  # R@1, R@5, R@10 — not R@1, R@10, R@5
            match = re.match(pattern, column)
            if match:
                scale = 1e-6 if column in ("params", "macs_image", "macs_text", "size_bytes") else 1.0
                lines.append((label.format(*match.groups()), [_format_number(r.get(column, ""), scale) for r in rows]))
    label_width = max(len(label) for label, _ in lines)
    value_width = max(8, *(len(v) for _, values in lines for v in values))
    return "\n".join(f"{label:<{label_width}}  " + "  ".join(f"{v:>{value_width}}" for v in values)
                     for label, values in lines)


def _natural_order(text: str) -> List[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def _format_number(text: str, scale: float) -> str:
    try:
        value = float(text) * scale
    except (TypeError, ValueError):
        return text or "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


# --- main ----------------------------------------------------------------------------------------------


def _headline(row: Dict[str, Any]) -> str:
    keys = [k for k in row if k.endswith(("/acc1", "/lp_acc1", "/mean_recall"))]
    return ", ".join(f"{k}={row[k]:.4f}" for k in keys) or "no metrics"


def configure_logging(level: str) -> None:
    # open_clip logs chatty INFO lines on the root logger for every model it builds: keep the root at
    # WARNING and let only this monitor's and eval's own INFO lines through.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in ("evaluate_checkpoints", "eval"):
        logging.getLogger(name).setLevel(level.upper())
    # every model is built randomly initialised, then filled from the checkpoint
    from foundation.logs import quiet_open_clip

    quiet_open_clip()


def resolve_eval_data_dir(args: argparse.Namespace, experiment: Experiment) -> str:
    """The eval root (--eval-data-dir, else the run's params.txt), checked before anything is scored or
    written: it exists and holds the --datasets and a set for the --benchmarks (eval.check_eval_data)."""
    from eval.benchmarks import BENCHMARKS, check_eval_data

    eval_data_dir = args.eval_data_dir or experiment.params.get("eval_data_dir")
    if not eval_data_dir:
        raise UserError("no evaluation data: pass --eval-data-dir (the root holding coco2017/, shapes/, …)")
    what = "--eval-data-dir" if args.eval_data_dir else f"eval_data_dir of {experiment.root / 'params.txt'}"
    check_eval_data(str(eval_data_dir), args.benchmarks or BENCHMARKS, args.datasets,
                    every_benchmark=bool(args.benchmarks), what=what)
    return str(eval_data_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lock = None
    try:
        if not argv:
            argv = ask_interactively()
        args = parse_args(argv)
        configure_logging(args.log_level)
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.logs_dir:
            raise UserError("pass --logs-dir LOGS/<name> (the experiment dir)")
        if any(k < 1 for k in args.topk):
            raise UserError(f"--topk {' '.join(map(str, args.topk))}: every k must be at least 1")
        if args.benchmarks:
            from eval.benchmarks import BENCHMARKS

            args.benchmarks = [b for item in args.benchmarks for b in item.split(",") if b]
            unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
            if unknown:
                raise UserError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
        experiment = open_experiment(args.logs_dir)
        eval_data_dir = resolve_eval_data_dir(args, experiment)  # before the lock: a bad root writes nothing
        # one monitor per run: two would score every checkpoint twice into one CSV. A lock file of its own,
        # so the run's trainer (which holds trainer.lock) and its monitor run side by side
        lock = RunLock(experiment.root / MONITOR_LOCK, "monitor").acquire()
        monitor = Monitor(experiment, args, eval_data_dir)

        if args.once:
            if not epoch_checkpoints(experiment, args.epoch):
                which = f"epoch_{args.epoch}.pt" if args.epoch is not None else "epoch_N.pt checkpoints"
                raise UserError(f"no {which} in {experiment.checkpoints}")
            monitor.run_once()
            print(format_table(*read_results(experiment.csv_path)))
            asked = [path.name for _, path in epoch_checkpoints(experiment, args.epoch)]
            if not set(asked) & monitor.scored_checkpoint_names():  # each failure was logged with its reason
                print(f"error: none of the {len(asked)} checkpoints to score could be scored (the warnings above "
                      f"say why)", file=sys.stderr)
                return 1
        else:
            log.info("watching %s every %gs (Ctrl-C to stop)", experiment.checkpoints, args.poll_seconds)
            monitor.watch()
        monitor.tensorboard.close()
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
