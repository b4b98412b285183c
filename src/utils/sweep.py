"""`clipcompress sweep TOOL`: run one post-training tool over a grid, score every result, one table + plots.

    clipcompress sweep lowrank --pretrained CKPT --ratio 0.25 0.5 0.75 --layers 3 6 9 \\
        --eval-data-dir DIR --out DIR [--towers image,text ...any other flag of the tool]
    clipcompress sweep text_layers --pretrained CKPT --keep-first 1 2 4 8 --eval-data-dir DIR --out DIR

Accuracy and time against the number of compressed layers and against the compression ratio show where a
tool stops paying for itself; this driver draws those curves for any tool. Every grid point (the product of
the tool's grid flags) is one run folder `OUT/<tool>_<name>-<value>_...` written by the tool's own command line
(the flags this driver does not know go to the tool unchanged), then scored by the monitor
(utils.evaluate_checkpoints, in-process; its table goes to `OUT/<point>/monitor.txt`). The input model is scored
too, as run `input`. A point already written or scored is reused, so a stopped sweep continues where it was.

`--layers N` means the first N transformer blocks of each chosen tower, counted from the input end, so a larger
N compresses the blocks of every smaller N and more. Output: `OUT/sweep.csv` (grid columns, then every monitor
column), the table printed, and per grid column `<metric>_vs_<column>.png` and
`latency_image_ms_vs_<column>.png` (one line per value of the other grid column), drawn by utils.report, which
also replots the table: `clipcompress report --table OUT/sweep.csv
--x ratio --y METRIC --group layers`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import itertools
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from foundation.checkpoint import atomic_write_bytes
from foundation.errors import UserError
from utils import evaluate_checkpoints, report

# per tool: grid flag (dest) → (the tool's flag, how a grid value becomes that flag's value)
Grid = Dict[str, Tuple[str, Callable[[Any], str]]]


def _first_layers(count: int) -> str:
    if count < 1:
        raise UserError(f"--layers {count}: a number of layers is at least 1")
    return ",".join(str(i) for i in range(count))


TOOLS: Dict[str, Grid] = {
    "lowrank": {"ratio": ("--ratio", str), "layers": ("--layers", _first_layers)},
    "fisher_prune": {"mac_constraint": ("--mac-constraint", str), "layers": ("--layers", _first_layers)},
    "heads": {"num_heads": ("--num-heads", str), "layers": ("--layers", _first_layers)},
    "token_mask": {"drop": ("--drop", str)},
    "text_layers": {"keep_first": ("--keep-first", str)},
    "quantize": {"scheme": ("--scheme", str)},
}
GRID_TYPES = {"ratio": float, "layers": int, "mac_constraint": float, "num_heads": int, "drop": float,
              "keep_first": int, "scheme": str}
INPUT_RUN = "input"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcompress sweep",
        description="run a post-training tool over a grid, score each result with the monitor, write one table "
                    "and plots; flags not listed here go to the tool")
    parser.add_argument("tool", choices=sorted(TOOLS), help="the post-training tool (utils.<tool>) to sweep")
    parser.add_argument("--pretrained", required=True, help="the input checkpoint (or hf:DIR), as for the tool")
    parser.add_argument("--model", default=None, help="open_clip config of a weights file that is not ours")
    parser.add_argument("--eval-data-dir", required=True, help="evaluation sets the monitor scores on")
    parser.add_argument("--out", required=True, help="folder for the run folders, sweep.csv and the plots")
    grid = parser.add_argument_group("grid (each a list; the sweep runs their product)")
    grid.add_argument("--ratio", type=float, nargs="+", help="lowrank: kept-parameter ratios")
    grid.add_argument("--layers", type=int, nargs="+",
                      help="lowrank, fisher_prune, heads: numbers N of compressed blocks (the first N of each tower)")
    grid.add_argument("--mac-constraint", type=float, nargs="+", help="fisher_prune: MAC budgets")
    grid.add_argument("--num-heads", type=int, nargs="+", help="heads: heads removed")
    grid.add_argument("--drop", type=float, nargs="+", help="token_mask: fractions of patch tokens dropped")
    grid.add_argument("--keep-first", type=int, nargs="+", help="text_layers: text blocks kept")
    grid.add_argument("--scheme", nargs="+", help="quantize: int8_dynamic and/or int8_weight_only")
    scoring = parser.add_argument_group("scoring (the monitor's flags)")
    scoring.add_argument("--benchmarks", nargs="+", default=["zeroshot", "retrieval"],
                         help="monitor benchmarks (default zeroshot retrieval)")
    scoring.add_argument("--datasets", nargs="+", default=None, help="restrict to these eval datasets")
    scoring.add_argument("--metric", default=None,
                         help="y column of the plots (default: the first zeroshot/*/acc1, else a retrieval recall)")
    scoring.add_argument("--device", default="cpu", help="where the tool and the monitor run")
    scoring.add_argument("--batch-size", type=int, default=64, help="monitor: images per encoder forward")
    scoring.add_argument("--profile-batch-size", type=int, default=32, help="monitor: batch of the latency measure")
    scoring.add_argument("--workers", type=int, default=2, help="monitor: data loader workers")
    scoring.add_argument("--threads", type=int, default=None, help="torch CPU threads for the monitor")
    scoring.add_argument("--no-input", action="store_true", help="do not score the input model as run 'input'")
    return parser


def grid_points(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every combination of the tool's grid values (in the order given), as {dest: value}."""
    grid = TOOLS[args.tool]
    foreign = [f"--{dest.replace('_', '-')}" for dest in GRID_TYPES if dest not in grid and getattr(args, dest)]
    if foreign:
        raise UserError(f"{' '.join(foreign)}: not a grid of {args.tool} (its grid: "
                        f"{', '.join('--' + d.replace('_', '-') for d in grid)})")
    chosen = {dest: getattr(args, dest) for dest in grid if getattr(args, dest)}
    if not chosen:
        raise UserError(f"give at least one grid for {args.tool}: "
                        f"{', '.join('--' + d.replace('_', '-') + ' V ...' for d in grid)}")
    return [dict(zip(chosen, values)) for values in itertools.product(*chosen.values())]


def point_name(tool: str, point: Dict[str, Any]) -> str:
    return "_".join([tool] + [f"{dest}-{value:g}" if isinstance(value, float) else f"{dest}-{value}"
                              for dest, value in point.items()])


def tool_argv(args: argparse.Namespace, point: Dict[str, Any], out: Path, passthrough: Sequence[str]) -> List[str]:
    argv = ["--pretrained", args.pretrained, "--out", str(out), "--device", args.device]
    if args.model:
        argv += ["--model", args.model]
    for dest, value in point.items():
        flag, render = TOOLS[args.tool][dest]
        argv += [flag, render(value)]
    return argv + list(passthrough)


def run_tool(tool: str, argv: List[str]) -> None:
    """The tool's own command line, in this process; its one-line user errors stop the sweep."""
    module = importlib.import_module(f"utils.{tool}")
    try:
        module.main(argv)
    except SystemExit as stop:
        if stop.code:
            raise UserError(f"utils.{tool} {' '.join(argv)} failed (exit {stop.code}; its error is above)")


def scored_benchmarks(args: argparse.Namespace) -> None:
    """Check --eval-data-dir (it holds the --datasets and a set for at least one of --benchmarks) and keep in
    args.benchmarks those it has sets for: the monitor refuses a benchmark named to it that it cannot score."""
    from eval.benchmarks import TASK_OF_BENCHMARK, check_eval_data

    found = check_eval_data(args.eval_data_dir, args.benchmarks, args.datasets, every_benchmark=False)
    tasks = {entry.task for entry in found.values()}
    args.benchmarks = [b for b in args.benchmarks if TASK_OF_BENCHMARK[b] in tasks]


def score(run_dir: Path, args: argparse.Namespace) -> Dict[str, str]:
    """The monitor's row for the run's last checkpoint (scored now unless it already was)."""
    argv = ["--logs-dir", str(run_dir), "--once", "--eval-data-dir", args.eval_data_dir, "--device", args.device,
            "--batch-size", str(args.batch_size), "--profile-batch-size", str(args.profile_batch_size),
            "--workers", str(args.workers), "--log-level", "warning", "--benchmarks", *args.benchmarks]
    if args.datasets:
        argv += ["--datasets", *args.datasets]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    with open(run_dir / "monitor.txt", "w") as log, contextlib.redirect_stdout(log):
        code = evaluate_checkpoints.main(argv)
    if code:
        raise UserError(f"the monitor could not score {run_dir} (exit {code})")
    _, rows = evaluate_checkpoints.read_results(run_dir / evaluate_checkpoints.CSV_NAME)
    return max(rows, key=lambda r: (int(r.get("epoch") or 0), int(r.get("step") or 0)))


def input_run(args: argparse.Namespace, out: Path) -> Path:
    """A run folder holding the input checkpoint (linked, else copied), so the monitor scores it like a point."""
    source = Path(args.pretrained)
    run = out / INPUT_RUN
    target = run / "checkpoints" / "epoch_0.pt"
    if not target.exists():
        if not source.is_file():
            raise UserError(f"--pretrained {args.pretrained}: the input is scored from a checkpoint file "
                            "(pass --no-input for hf:DIR or a weights file)")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(source.resolve())
        except OSError:
            shutil.copyfile(source, target)
        (run / "params.txt").write_text(f"job: input\nname: {INPUT_RUN}\nsource: {source}\n")
    return run


SHOWN = [("params", "params (M)", 1e-6), ("size_bytes", "weights MB", 1e-6), ("macs_image", "img MMACs", 1e-6),
         ("macs_text", "txt MMACs", 1e-6), ("latency_image_ms", "img ms", 1.0), ("latency_text_ms", "txt ms", 1.0)]


def format_table(rows: Sequence[Dict[str, Any]], grid: Sequence[str], metrics: Sequence[str]) -> str:
    headers = ["run", *grid] + [label for column, label, _ in SHOWN if any(column in r for r in rows)] + list(metrics)
    columns = ["run", *grid] + [column for column, _, _ in SHOWN if any(column in r for r in rows)] + list(metrics)
    scale = {column: factor for column, _, factor in SHOWN}

    def cell(row: Dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        number = report.as_float(str(value)) if value not in ("", None) else float("nan")
        if column in ("run", *grid) or number != number:
            return str(value) if value not in (None, "") else "-"
        number *= scale.get(column, 1.0)
        return f"{number:.4f}" if abs(number) < 10 else f"{number:.2f}"

    cells = [[cell(row, c) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_table(rows: Sequence[Dict[str, Any]], grid: Sequence[str], path: Path) -> None:
    rest = sorted({c for row in rows for c in row} - {"run", "tool", *grid},
                  key=lambda c: (c not in ("checkpoint", "epoch", "step"), c))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["run", "tool", *grid, *rest], restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))  # a full disk: one line, no half-written table


def plots(rows: Sequence[Dict[str, Any]], grid: Sequence[str], metric: Optional[str], out: Path) -> List[Path]:
    """Per grid column: the metric and the image latency against it, a line per value of the other grid column."""
    written = []
    points = [{k: str(v) for k, v in row.items()} for row in rows if row["run"] != INPUT_RUN]
    for x in grid:
        others = [g for g in grid if g != x]
        for y in ([metric] if metric else []) + ["latency_image_ms"]:
            path = out / report.plot_name(x, y)
            report.plot_pareto(points, y, x, path, group=others[0] if others else None)
            written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    try:
        points = grid_points(args)
        scored_benchmarks(args)  # before the first tool runs: a bad eval root is found now, not after it
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        grid = list(points[0])
        rows: List[Dict[str, Any]] = []
        if not args.no_input:
            rows.append({"run": INPUT_RUN, "tool": "", **score(input_run(args, out), args)})
        for point in points:
            run = out / point_name(args.tool, point)
            if not (run / "checkpoints" / "epoch_0.pt").is_file():
                run_tool(args.tool, tool_argv(args, point, run, passthrough))
            rows.append({"run": run.name, "tool": args.tool, **point, **score(run, args)})
            print(f"scored {run.name}", file=sys.stderr)
        metric = args.metric or report.default_metric(sorted({c for row in rows for c in row}))
        metrics = sorted(c for c in {c for row in rows for c in row}
                         if c == metric or (c.startswith("retrieval/") and c.endswith("_recall@1")))
        write_table(rows, grid, out / "sweep.csv")
        drawn = plots(rows, grid, metric, out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows, grid, metrics))
    print(f"\nwrote {out / 'sweep.csv'} and " + ", ".join(p.name for p in drawn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
