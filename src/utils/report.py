"""One table and one Pareto plot over any number of runs, from the monitor's CSVs.

    clipcompress report logs/dense logs/lowrank logs/fisher logs/flip --out-dir logs/report

Each LOGDIR is a run folder the monitor (`src/utils/evaluate_checkpoints.py`) has scored: it reads
`LOGDIR/evaluation_metrics_all.csv` (one row per checkpoint: params, macs_image, macs_text,
latency_image_ms, latency_text_ms, zeroshot/<set>/acc1, retrieval/<set>/{image,text}_retrieval_recall@k, …)
and the `job:` line of `LOGDIR/params.txt` when there is one. One row per run (its last checkpoint, or its best
by `--metric`; `--all-checkpoints` for every row) goes to stdout and to `report.csv` / `report.md`;
`pareto.png` plots accuracy against measured latency, with the Pareto front (no other run both faster and
more accurate) drawn through.

Any column against any other: `--x COLUMN --y METRIC` (e.g. `--x size_bytes`, `--x macs_image`, or a flag of
the tool that made the run, such as `--x ratio`, read from its params.txt when the CSV has no such column),
`--group COLUMN` for one line per value (a ratio, a layer count). `--table CSV` reads rows from a table that
has a `run` column instead of run folders: what `clipcompress sweep` writes, with its grid columns.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from foundation.checkpoint import atomic_write_bytes
from foundation.errors import UserError

CSV_NAME = "evaluation_metrics_all.csv"
# (column regex, header) in table order; a column appears when some run has it
TABLE_COLUMNS: List[Tuple[str, str]] = [
    (r"^params$", "params (M)"),
    (r"^macs_image$", "img MMACs"),
    (r"^macs_text$", "txt MMACs"),
    (r"^latency_image_ms$", "img ms/batch"),
    (r"^latency_text_ms$", "txt ms/batch"),
    (r"^size_bytes$", "weights MB"),
    (r"^zeroshot/(.+)/acc1$", "{} acc1"),
    (r"^retrieval/(.+)/image_retrieval_recall@(\d+)$", "{} t2i R@{}"),
    (r"^retrieval/(.+)/text_retrieval_recall@(\d+)$", "{} i2t R@{}"),
]
MILLIONS = {"params", "macs_image", "macs_text", "size_bytes", "checkpoint_bytes"}
# x columns where less is better: the plot draws the Pareto front against them (against a grid column such
# as a ratio or a layer count it joins each group's points instead)
COST_COLUMNS = re.compile(r"^(latency_.*|macs_.*|params.*|size_bytes|checkpoint_bytes)$")


def read_rows(log_dir: Path) -> List[Dict[str, str]]:
    path = log_dir / CSV_NAME
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_params(log_dir: Path) -> Dict[str, str]:
    """`key: value` lines of the run's params.txt (values as text)."""
    params = log_dir / "params.txt"
    found: Dict[str, str] = {}
    if params.is_file():
        for line in params.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip():
                found.setdefault(key.strip(), value.strip())
    return found


def read_job(log_dir: Path) -> str:
    return read_params(log_dir).get("job", "")


def as_float(value: Optional[str]) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _order_key(row: Dict[str, str]) -> Tuple[float, float]:
    return (as_float(row.get("epoch")) if row.get("epoch") else -1.0,
            as_float(row.get("step")) if row.get("step") else -1.0)


def default_metric(columns: Sequence[str]) -> Optional[str]:
    """The accuracy the plot and `--select best` use when none is named: first zero-shot acc1, else R@1."""
    for pattern in (r"^zeroshot/.+/acc1$", r"^retrieval/.+/mean_recall$", r"^retrieval/.+_recall@1$"):
        found = sorted(c for c in columns if re.match(pattern, c))
        if found:
            return found[0]
    return None


def gather(log_dirs: Sequence[str], select: str = "last", metric: Optional[str] = None, all_checkpoints: bool = False,
           flag_columns: Sequence[str] = ()) -> Tuple[List[Dict[str, str]], Optional[str]]:
    """Rows (each with `run` and `job` added) of every run, and the accuracy metric used. `flag_columns` the
    CSV lacks are filled from each run's params.txt (a tool's --ratio, --layers, ...)."""
    runs: List[Tuple[Path, List[Dict[str, str]]]] = []
    for log_dir in map(Path, log_dirs):
        rows = read_rows(log_dir)
        if not rows:
            print(f"warning: {log_dir / CSV_NAME} missing or empty; run the monitor on {log_dir} first "
                  "(skipped)", file=sys.stderr)
            continue
        runs.append((log_dir, rows))
    if not runs:
        raise UserError("no scored runs: none of the given folders has an evaluation_metrics_all.csv")
    columns = sorted({c for _, rows in runs for row in rows for c in row})
    metric = metric or default_metric(columns)
    if select == "best" and metric not in columns:
        raise UserError(f"--metric {metric!r} is not a column of the CSVs; some columns: {columns[:12]}")
    gathered = []
    for log_dir, rows in runs:
        if all_checkpoints:
            chosen = sorted(rows, key=_order_key)
        elif select == "best":
            chosen = [max(rows, key=lambda r: (as_float(r.get(metric)) if not math.isnan(as_float(r.get(metric)))
                                               else -math.inf))]
        else:
            chosen = [max(rows, key=_order_key)]
        params = read_params(log_dir)
        flags = {c: params[c] for c in flag_columns if c not in columns and c in params}
        gathered += [{"run": log_dir.name, "job": params.get("job", ""), **row, **flags} for row in chosen]
    return gathered, metric


def read_table(path: str, metric: Optional[str] = None) -> Tuple[List[Dict[str, str]], Optional[str]]:
    """Rows of a CSV table with a `run` column (`utils.sweep`'s), and the accuracy metric used."""
    table = Path(path)
    if not table.is_file():
        raise UserError(f"--table {path}: no such file")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "run" not in rows[0]:
        raise UserError(f"--table {path}: expected a CSV with a 'run' column and at least one row")
    for row in rows:
        row.setdefault("job", "")
    return rows, metric or default_metric(sorted(rows[0]))


def table_columns(rows: Sequence[Dict[str, str]]) -> List[Tuple[str, str]]:
    """(CSV column, header) of the table, in TABLE_COLUMNS order, R@1 before R@5 before R@10."""
    present = sorted({c for row in rows for c in row},
                     key=lambda t: [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", t)])
    chosen = [("run", "run"), ("job", "job"), ("checkpoint", "checkpoint")]
    for pattern, header in TABLE_COLUMNS:
        for column in present:
            match = re.match(pattern, column)
            if match:
                chosen.append((column, header.format(*match.groups())))
    return chosen


def format_value(column: str, value: Optional[str]) -> str:
    number = as_float(value)
    if value in (None, "") or (math.isnan(number) and column not in ("run", "job", "checkpoint")):
        return value or "-"
    if column in ("run", "job", "checkpoint"):
        return value
    if column in MILLIONS:
        return f"{number / 1e6:.3f}"
    return f"{number:.4f}" if abs(number) < 10 else f"{number:.2f}"


def markdown_table(rows: Sequence[Dict[str, str]], columns: Sequence[Tuple[str, str]]) -> str:
    cells = [[format_value(c, row.get(c)) for c, _ in columns] for row in rows]
    headers = [h for _, h in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both lower x (latency) and higher y (accuracy)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def axis_value(text: Optional[str]) -> float:
    """A cell as a number for a plot axis: a number, or a comma list of layer indices (its length)."""
    number = as_float(text)
    if math.isnan(number) and text and re.fullmatch(r"\d+(,\d+)*", text.strip()):
        return float(len(text.split(",")))
    return number


# a monitor column on a plot's axis, in words: (pattern, name, unit, scale); the name's {0}, {1} are the
# pattern's groups. A column that matches none (a sweep's grid column, a flag from params.txt) keeps its name.
AXIS_NAMES: List[Tuple[str, str, str, float]] = [
    (r"^latency_image_ms$", "image latency", "ms per batch{batch}, median wall time", 1.0),
    (r"^latency_text_ms$", "text latency", "ms per batch{batch}, median wall time", 1.0),
    (r"^macs_image$", "image MACs", "millions per image", 1e6),
    (r"^macs_text$", "text MACs", "millions per caption", 1e6),
    (r"^params$", "parameters", "millions", 1e6),
    (r"^params_image$", "image tower parameters", "millions", 1e6),
    (r"^params_text$", "text tower parameters", "millions", 1e6),
    (r"^size_bytes$", "weights size", "MB", 1e6),
    (r"^checkpoint_bytes$", "checkpoint file size", "MB", 1e6),
    (r"^zeroshot/(.+)/acc(\d+)$", "zero-shot top-{1} accuracy on {0}", "0 to 1", 1.0),
    (r"^zeroshot/(.+)/mean_per_class_recall$", "zero-shot mean per-class recall on {0}", "0 to 1", 1.0),
    (r"^linear_probe/(.+)/lp_acc(\d+)$", "linear-probe top-{1} accuracy on {0}", "0 to 1", 1.0),
    (r"^retrieval/(.+)/image_retrieval_recall@(\d+)$", "text-to-image recall@{1} on {0}", "0 to 1", 1.0),
    (r"^retrieval/(.+)/text_retrieval_recall@(\d+)$", "image-to-text recall@{1} on {0}", "0 to 1", 1.0),
    (r"^retrieval/(.+)/mean_recall$", "mean retrieval recall on {0}", "0 to 1", 1.0),
]


def axis_name(column: str, rows: Sequence[Dict[str, str]] = ()) -> Tuple[str, str, float]:
    """(name in words, unit, scale) of a column on a plot's axis; the unit is "" for a column we know nothing
    of. A latency names its batch size when every row was timed at the same one."""
    for pattern, name, unit, scale in AXIS_NAMES:
        match = re.match(pattern, column)
        if match:
            sizes = {row.get("latency_batch_size") for row in rows} - {None, ""}
            batch = f" of {int(as_float(sizes.pop()))}" if len(sizes) == 1 else ""
            return name.format(*match.groups()), unit.format(batch=batch), scale
    return column, "", 1.0


def axis_label(column: str, rows: Sequence[Dict[str, str]] = ()) -> str:
    name, unit, _ = axis_name(column, rows)
    return f"{name} ({unit})" if unit else name


def place_labels(axes, points: Sequence[Tuple[float, float]], labels: Sequence[str], fontsize: float = 7) -> None:
    """Write each label beside its point where it covers no other label, point or legend: the first free place
    among rings of candidates around the point (nearest first; a thin line leads from a far one to its point),
    else the place that overlaps least. Greedy, in order of x, on the figure as laid out now."""
    from matplotlib.transforms import Bbox

    figure = axes.figure
    renderer = figure.canvas.get_renderer()
    area = axes.get_window_extent(renderer)
    centres = axes.transData.transform(points) if len(points) else []
    taken = [Bbox.from_bounds(cx - 4, cy - 4, 8, 8) for cx, cy in centres]
    legend = axes.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    # (dx, dy, horizontal alignment, vertical alignment) in points, ring by ring
    sides = [(1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"),
             (-1, -1, "right", "top"), (0, 1, "center", "bottom"), (0, -1, "center", "top")]
    candidates = [(dx * ring, dy * ring, ha, va) for ring in (4, 12, 22, 34) for dx, dy, ha, va in sides]

    def cost(box) -> float:
        overlap = sum(max(0.0, min(box.x1, t.x1) - max(box.x0, t.x0)) * max(0.0, min(box.y1, t.y1) - max(box.y0, t.y0))
                      for t in taken)
        outside = box.width * box.height - max(0.0, min(box.x1, area.x1) - max(box.x0, area.x0)) * max(
            0.0, min(box.y1, area.y1) - max(box.y0, area.y0))
        return overlap + outside

    for index in sorted(range(len(points)), key=lambda i: points[i]):
        text = axes.annotate(labels[index], points[index], textcoords="offset points", fontsize=fontsize,
                             xytext=candidates[0][:2], ha=candidates[0][2], va=candidates[0][3])
        best = None
        for dx, dy, ha, va in candidates:
            text.xyann = (dx, dy)
            text.set_horizontalalignment(ha)
            text.set_verticalalignment(va)
            box = text.get_window_extent(renderer).padded(1)
            score = cost(box)
            if best is None or score < best[0]:
                best = (score, (dx, dy, ha, va), box)
            if score == 0:
                break
        text.remove()
        _, (dx, dy, ha, va), box = best
        far = max(abs(dx), abs(dy)) > candidates[0][1]
        axes.annotate(labels[index], points[index], textcoords="offset points", fontsize=fontsize, xytext=(dx, dy),
                      ha=ha, va=va, arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.6,
                                                "shrinkA": 1, "shrinkB": 3} if far else None)
        taken.append(box)


def pareto_figure(rows: Sequence[Dict[str, str]], metric: str, latency: str, group: Optional[str] = None):
    """The figure `plot_pareto` saves, and the number of points on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, x_scale = axis_name(latency)
    _, _, y_scale = axis_name(metric)
    # several checkpoints of a run (--all-checkpoints): one colour per run, each point labelled by its checkpoint
    by_run = not group and any(r.get("checkpoint") for r in rows) and len(rows) != len({r["run"] for r in rows})
    points, labels, groups = [], [], []
    for row in rows:
        x, y = axis_value(row.get(latency)), as_float(row.get(metric))
        if not (math.isnan(x) or math.isnan(y)):
            points.append((x / x_scale, y / y_scale))
            labels.append(row.get("checkpoint") or row["run"] if by_run else row["run"])
            groups.append(row["run"] if by_run else row.get(group, "") if group else "")
    figure, axes = plt.subplots(figsize=(7.5, 5.0))
    cost = bool(COST_COLUMNS.match(latency))
    if points:
        for value in sorted(set(groups), key=lambda g: (axis_value(g), g)):
            chosen = sorted((p for p, g in zip(points, groups) if g == value))
            axes.plot([p[0] for p in chosen], [p[1] for p in chosen], "o" if cost else "o-", zorder=3,
                      label=value if by_run else f"{group} = {value}" if group else None)
        if cost:
            front = pareto_front(points)
            axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red",
                      drawstyle="steps-post", label="Pareto front: no other point is both cheaper and better",
                      zorder=2)
        if cost or group or by_run:
            axes.legend(loc="best", fontsize=8)
    y_name, x_name = axis_name(metric)[0], axis_name(latency)[0]
    axes.set_xlabel(axis_label(latency, rows))
    axes.set_ylabel(axis_label(metric, rows))
    axes.set_title(f"{y_name[:1].upper()}{y_name[1:]} against {x_name}", fontsize=11)
    axes.grid(alpha=0.3)
    axes.margins(0.12)  # room for the labels of the points at the edges
    figure.tight_layout()
    place_labels(axes, points, labels)
    return figure, len(points)


def plot_pareto(rows: Sequence[Dict[str, str]], metric: str, latency: str, path: Path,
                group: Optional[str] = None) -> int:
    """`metric` against column `latency` (any x column): a scatter with the Pareto front when x is a cost,
    otherwise each `group`'s points joined in x order; returns the number of points drawn."""
    import matplotlib.pyplot as plt

    figure, count = pareto_figure(rows, metric, latency, group)
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, image.getvalue())  # a full disk: one line, no half-written file
    return count


def write_csv(rows: Sequence[Dict[str, str]], path: Path) -> None:
    columns = ["run", "job"] + sorted({c for row in rows for c in row} - {"run", "job"},
                                      key=lambda c: (c not in ("checkpoint", "epoch", "step"), c))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))


def plot_name(x: str, y: str) -> str:
    """pareto.png for accuracy against image latency (the default), else `<y>_vs_<x>.png`."""
    if x == "latency_image_ms" and y == default_metric([y]):
        return "pareto.png"
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{y}_vs_{x}") + ".png"


def build_report(log_dirs: Sequence[str], out_dir: str | Path, select: str = "last", metric: Optional[str] = None,
                 latency: str = "latency_image_ms", all_checkpoints: bool = False, y: Optional[str] = None,
                 group: Optional[str] = None, table: Optional[str] = None) -> Tuple[str, Optional[Path]]:
    """Write report.csv, report.md and the plot (`plot_name`) under `out_dir`; return the markdown table and
    the plot's path (None without an accuracy column).

    `latency` is the plot's x column (any column), `y` its y column (default: `metric`)."""
    if table:
        rows, metric = read_table(table, metric)
    else:
        rows, metric = gather(log_dirs, select, metric, all_checkpoints,
                              flag_columns=[c for c in (latency, y, group) if c])
    y = y or metric
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(rows, table_columns(rows))
    write_csv(rows, out_dir / "report.csv")
    atomic_write_bytes(out_dir / "report.md", (markdown + "\n").encode("utf-8"))
    plot = None
    if y is None:
        print("warning: no accuracy column (zeroshot/*/acc1, retrieval/*) in the CSVs; no Pareto plot", file=sys.stderr)
    else:
        for column in (latency, y):
            if not any(not math.isnan(axis_value(row.get(column))) for row in rows):
                raise UserError(f"column {column!r} has no numbers in these runs; some columns: "
                                f"{sorted({c for row in rows for c in row})[:16]}")
        plot = out_dir / plot_name(latency, y)
        plot_pareto(rows, y, latency, plot, group)
    return markdown, plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcompress report",
                                     description="table + Pareto plot over the monitor CSVs of several runs")
    parser.add_argument("log_dirs", nargs="*", metavar="LOGDIR", help="run folders holding evaluation_metrics_all.csv")
    parser.add_argument("--out-dir", default=None,
                        help="where report.csv, report.md, pareto.png go (default: <parent of first LOGDIR>/report)")
    parser.add_argument("--select", choices=("last", "best"), default="last",
                        help="which checkpoint of each run: last (highest epoch/step) or best by --metric")
    parser.add_argument("--metric", default=None,
                        help="accuracy column for --select best and the plot (default: first zeroshot/*/acc1)")
    parser.add_argument("--x", "--latency", dest="x", default="latency_image_ms",
                        help="column of the plot's x axis: a monitor column (latency_image_ms, macs_image, params, "
                             "size_bytes, ...), a sweep table's grid column, or a flag in the runs' params.txt "
                             "(ratio, ...); --latency is an alias")
    parser.add_argument("--y", default=None, help="column of the plot's y axis (default: --metric)")
    parser.add_argument("--group", default=None,
                        help="draw one line per value of this column (e.g. ratio in a sweep over layers)")
    parser.add_argument("--table", default=None,
                        help="read rows from this CSV (a 'run' column; utils.sweep's sweep.csv) instead of "
                             "LOGDIRs")
    parser.add_argument("--all-checkpoints", action="store_true", help="one row per checkpoint instead of per run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.log_dirs) == bool(args.table):
            raise UserError("give run folders (LOGDIR ...) or --table CSV, not both and not neither")
        first = args.table or args.log_dirs[0]
        out_dir = args.out_dir or Path(first).resolve().parent / "report"
        table, plot = build_report(args.log_dirs, out_dir, args.select, args.metric, args.x, args.all_checkpoints,
                             y=args.y, group=args.group, table=args.table)
    except UserError as error:  # no CSV, unknown column: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {Path(out_dir) / 'report.csv'}, report.md" + (f" and {plot.name}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
