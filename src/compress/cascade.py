"""casCLIP's topk and speedup experiments on the cascaded image search of compress.ops.cascade, from a TOML config.

    python -m compress.cascade --config scripts/experiments/cascade_topk_demo.toml

runs casCLIP's two experiment kinds on a COCO-layout retrieval set (captions are the queries, images the
gallery): `topk` (recall@k of each cascade vs the last level alone) and `speedup` (measured wall time of
the whole search "lifetime" — embedding the gallery and answering every query — and per query), printing
a table and plotting recall vs measured speedup over m. Recall is eval.metrics' image_retrieval_recall@k
(ties count against the model), computed from each system's ranked results and their scores.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from compress.ops.cascade import Cascade
from eval.metrics import ranks_in_ranking, recall_at_ks
from foundation.images import open_rgb

log = logging.getLogger(__name__)


# --- measured runs -------------------------------------------------------------------------------------


@dataclass
class SearchRun:
    ranked: torch.Tensor
    scores: torch.Tensor  # the last level's scores of `ranked`: recall needs them to see ties
    lifetime_s: float  # embed the gallery at level 1 + embed and answer every query
    images_encoded: List[int]
    image_s: float  # of which: embedding images (all levels)
    text_s: float  # of which: embedding the queries


def run_lifetime(make_cascade: Callable[[], Cascade], encode_text: Callable[[List[str]], torch.Tensor],
                 queries: List[str], k: int, query_batch_size: int) -> SearchRun:
    """A fresh cascade (cold caches) answers every query in batches; the whole thing is timed."""
    start = time.perf_counter()
    cascade = make_cascade()
    cascade.build()
    ranked, scores, text_s = [], [], 0.0
    for begin in range(0, len(queries), query_batch_size):
        text_start = time.perf_counter()
        text = encode_text(queries[begin:begin + query_batch_size])
        text_s += time.perf_counter() - text_start
        found, found_scores = cascade.search_scored(text, k)
        ranked.append(found)
        scores.append(found_scores)
    elapsed = time.perf_counter() - start
    return SearchRun(torch.cat(ranked), torch.cat(scores), elapsed, cascade.images_encoded(), cascade.image_seconds(),
                     text_s)


def first_query_seconds(make_cascade: Callable[[], Cascade], encode_text: Callable[[List[str]], torch.Tensor],
                        queries: List[str], k: int) -> float:
    """Median time to answer one query on a gallery nothing has embedded yet (casCLIP's one-off search):
    level 1 embeds the whole gallery, the later levels only that query's candidates."""
    times = []
    for query in queries:
        start = time.perf_counter()
        cascade = make_cascade()
        cascade.build()
        cascade.search(encode_text([query]), k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_query_seconds(make_cascade: Callable[[], Cascade], encode_text: Callable[[List[str]], torch.Tensor],
                      queries: List[str], k: int) -> float:
    """Mean latency of one query (text embedding + search + lazy re-encoding) once level 1 is built,
    queries arriving one at a time with the caches starting cold."""
    cascade = make_cascade()
    cascade.build()
    times = []
    for query in queries:
        start = time.perf_counter()
        cascade.search(encode_text([query]), k)
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


# --- experiments (casCLIP's topk and speedup) ------------------------------------------------------------


@dataclass
class Experiment:
    kind: str  # "topk" or "speedup"
    name: str
    levels: List[str]  # checkpoints (or open_clip model names), cheapest first
    eval_data_dir: str
    ms: List[List[int]]  # one candidate-count list per cascade to try
    ks: List[int] = field(default_factory=lambda: [1, 5, 10])
    device: str = "cpu"
    batch_size: int = 256
    query_batch_size: int = 256
    repeats: int = 1
    per_query_queries: int = 100
    lifetime_queries: int = 0  # speedup: also time a lifetime of only this many queries (0: no)
    first_query_queries: int = 3
    max_images: int = 0
    plot: Optional[str] = None
    threads: int = 0


def read_experiment(path: str, overrides: argparse.Namespace) -> Experiment:
    import tomllib

    try:
        config = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: --config {path}: no such file")
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"error: --config {path}: not valid TOML ({error})")
    cascade = config.get("cascade", {})
    data = config.get("data", {})
    levels = overrides.levels or [level["checkpoint"] for level in config.get("levels", [])]
    eval_data_dir = overrides.eval_data_dir or data.get("eval_data_dir")
    kind = config.get("experiment")
    if kind not in ("topk", "speedup"):
        raise SystemExit(f"error: {path}: experiment must be 'topk' or 'speedup', got {kind!r}")
    if len(levels) < 1 or not eval_data_dir:
        raise SystemExit(f"error: {path}: needs [[levels]] checkpoint = … (or --levels) and [data] eval_data_dir "
                         f"(or --eval-data-dir)")
    ms = [m if isinstance(m, list) else [m] for m in cascade.get("m", [])]
    if len(levels) > 1 and (not ms or any(len(m) != len(levels) - 1 for m in ms)):
        raise SystemExit(f"error: {path}: [cascade] m must list, per cascade to try, {len(levels) - 1} candidate "
                         f"count(s) for {len(levels)} levels")
    return Experiment(
        kind=kind, name=config.get("name", Path(path).stem), levels=levels, eval_data_dir=eval_data_dir, ms=ms,
        ks=list(cascade.get("k", [1, 5, 10])), device=overrides.device or cascade.get("device", "cpu"),
        batch_size=int(cascade.get("batch_size", 256)), query_batch_size=int(cascade.get("query_batch_size", 256)),
        repeats=overrides.repeats or int(cascade.get("repeats", 1 if kind == "topk" else 3)),
        per_query_queries=int(cascade.get("per_query_queries", 100)),
        first_query_queries=int(cascade.get("first_query_queries", 3)),
        lifetime_queries=int(cascade.get("lifetime_queries", 0)), max_images=int(data.get("max_images", 0)),
        plot=overrides.plot or config.get("output", {}).get("plot"), threads=int(cascade.get("threads", 0)),
    )


def load_gallery(eval_data_dir: str, max_images: int = 0):
    """The COCO-layout retrieval set under `eval_data_dir` (`coco2017/…`, or the coco2017 folder itself)."""
    from eval.data import find_coco_root, load_coco_captions

    coco_root = find_coco_root(eval_data_dir)
    if coco_root is None:
        expected = Path(eval_data_dir) / "coco2017" / "annotations" / "captions_val2017.json"
        raise SystemExit(f"error: no COCO captions at {expected}")
    data = load_coco_captions(coco_root)
    if max_images:
        keep = [j for j, i in enumerate(data.text_to_image) if i < max_images]
        data.image_paths = data.image_paths[:max_images]
        data.captions = [data.captions[j] for j in keep]
        data.text_to_image = [data.text_to_image[j] for j in keep]
    return data


def load_images(paths: Sequence[Path], preprocess: Callable) -> torch.Tensor:
    return torch.stack([preprocess(open_rgb(path)) for path in paths])


def run_experiment(exp: Experiment) -> Dict[str, Any]:
    from eval.models import load_encoder

    if exp.threads:
        torch.set_num_threads(exp.threads)
    encoders = []
    for level in exp.levels:
        try:
            encoders.append(load_encoder(level, device=exp.device))
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: level {level}: {error}")
    data = load_gallery(exp.eval_data_dir, exp.max_images)
    targets = torch.tensor(data.text_to_image)
    queries = list(data.captions)

    # decode + preprocess once per distinct transform; shared by every system, so not part of the timings
    start = time.perf_counter()
    images_by_transform: Dict[str, torch.Tensor] = {}
    level_images = []
    for encoder in encoders:
        key = repr(encoder.preprocess)
        if key not in images_by_transform:
            images_by_transform[key] = load_images(data.image_paths, encoder.preprocess).to(exp.device)
        level_images.append(images_by_transform[key])
    decode_s = time.perf_counter() - start

    encode_fns = [lambda x, e=e: e.encode_image(x, normalize=True) for e in encoders]
    large = encoders[-1]  # the text tower every level shares (a student carries its teacher's)
    # one result more than the largest k: a result tied with the target right after the k-th must be seen for
    # the tie to count against the model (eval.metrics.ranks_in_ranking)
    depth = max(exp.ks) + 1

    def encode_text(texts: List[str]) -> torch.Tensor:
        return large.encode_text(texts, normalize=True).cpu()

    def factory(level_ids: List[int], ms: List[int]) -> Callable[[], Cascade]:
        return lambda: Cascade([encode_fns[i] for i in level_ids], ms, [level_images[i] for i in level_ids],
                               batch_size=exp.batch_size)

    last = len(encoders) - 1
    systems: List[Tuple[str, List[int], List[int]]] = [("large alone", [last], [])]
    if last > 0:
        systems.append(("level 1 alone", [0], []))
    systems += [("cascade m=" + ",".join(map(str, ms)), list(range(len(encoders))), ms) for ms in exp.ms]

    for _, ids, ms in systems[:1]:  # warm-up: first calls pay allocator / thread-pool start-up
        run_lifetime(factory(ids, ms), encode_text, queries[: exp.query_batch_size], depth, exp.query_batch_size)
    # a sparser workload (fewer queries than gallery images) is where a cascade's lifetime pays off: the
    # large model then embeds only the union of few shortlists
    sparse = (queries[:: max(1, len(queries) // exp.lifetime_queries)][: exp.lifetime_queries]
              if exp.kind == "speedup" and exp.lifetime_queries else [])
    results: Dict[str, Dict[str, Any]] = {name: {"lifetimes": [], "image_s": [], "text_s": [], "sparse": []}
                                          for name, _, _ in systems}
    for _ in range(max(1, exp.repeats)):  # interleaved repeats: machine load hits every system alike
        for name, ids, ms in systems:
            run = run_lifetime(factory(ids, ms), encode_text, queries, depth, exp.query_batch_size)
            entry = results[name]
            if sparse:
                sparse_run = run_lifetime(factory(ids, ms), encode_text, sparse, depth, exp.query_batch_size)
                entry["sparse"].append(sparse_run.lifetime_s)
                entry["sparse_encoded"] = sparse_run.images_encoded
            entry["lifetimes"].append(run.lifetime_s)
            entry["image_s"].append(run.image_s)
            entry["text_s"].append(run.text_s)
            entry["recall"] = recall_at_ks(ranks_in_ranking(run.ranked, run.scores, targets), exp.ks)
            entry["encoded"] = run.images_encoded
    if exp.kind == "speedup":
        sample = queries[:: max(1, len(queries) // max(1, exp.per_query_queries))][: exp.per_query_queries]
        cold_sample = sample[: exp.first_query_queries]
        for name, ids, ms in systems:
            results[name]["per_query_s"] = per_query_seconds(factory(ids, ms), encode_text, sample, depth)
            results[name]["first_query_s"] = first_query_seconds(factory(ids, ms), encode_text, cold_sample, depth)

    base = results["large alone"]
    base_lifetime = statistics.median(base["lifetimes"])
    base_image_s = statistics.median(base["image_s"])
    rows = []
    for name, ids, ms in systems:
        entry = results[name]
        lifetime = statistics.median(entry["lifetimes"])
        image_s = statistics.median(entry["image_s"])
        row = {"system": name, "m": ms, "lifetime_s": lifetime, "lifetime_speedup": base_lifetime / lifetime,
               "image_s": image_s, "image_speedup": base_image_s / image_s,
               "text_s": statistics.median(entry["text_s"]),
               "large_encoded_fraction": (entry["encoded"][-1] / len(data.image_paths)) if ids[-1] == last else 0.0,
               **{f"R@{k}": 100 * v for k, v in entry["recall"].items()},
               **{f"dR@{k}": 100 * (v - base["recall"][k]) for k, v in entry["recall"].items()}}
        if sparse:
            row["sparse_queries"] = len(sparse)
            row["sparse_lifetime_s"] = statistics.median(entry["sparse"])
            row["sparse_lifetime_speedup"] = statistics.median(base["sparse"]) / row["sparse_lifetime_s"]
            row["sparse_large_encoded_fraction"] = (
                entry["sparse_encoded"][-1] / len(data.image_paths) if ids[-1] == last else 0.0)
        if "per_query_s" in entry:
            row["per_query_ms"] = 1000 * entry["per_query_s"]
            row["per_query_speedup"] = base["per_query_s"] / entry["per_query_s"]
            row["first_query_s"] = entry["first_query_s"]
            row["first_query_speedup"] = base["first_query_s"] / entry["first_query_s"]
        rows.append(row)
    summary = {"experiment": exp.kind, "name": exp.name, "levels": exp.levels, "gallery": len(data.image_paths),
               "queries": len(queries), "decode_s": decode_s, "repeats": exp.repeats, "rows": rows}
    if exp.plot:
        plot_recall_vs_speedup(rows, exp.ks, exp.plot, exp.name)
        summary["plot"] = exp.plot
    return summary


# --- output ----------------------------------------------------------------------------------------------


def format_table(summary: Dict[str, Any], ks: Sequence[int]) -> str:
    kind = summary["experiment"]
    lines = [f"{summary['name']} ({kind}): {summary['gallery']} gallery images, {summary['queries']} caption "
             f"queries; levels (cheapest first): {', '.join(summary['levels'])}",
             f"image decoding + preprocessing, shared by every system and not timed below: "
             f"{summary['decode_s']:.2f} s"]
    if kind == "topk":
        header = (["system"] + [f"R@{k}" for k in ks] + [f"ΔR@{k}" for k in ks]
                  + ["large enc.", "lifetime ×", "images ×"])
    else:
        header = ["system", "lifetime s", "lifetime ×", "images ×", "text s", "large enc.", "1st query s",
                  "1st query ×", "warm query ms", "warm query ×"] + [f"R@{k}" for k in ks]
        sparse_queries = summary["rows"][0].get("sparse_queries")
        if sparse_queries:
            header[6:6] = [f"lifetime × {sparse_queries}q", f"large enc. {sparse_queries}q"]
    table = [header]
    for row in summary["rows"]:
        if kind == "topk":
            table.append([row["system"]] + [f"{row[f'R@{k}']:.2f}" for k in ks] +
                         [f"{row[f'dR@{k}']:+.2f}" for k in ks] +
                         [f"{100 * row['large_encoded_fraction']:.0f}%", f"{row['lifetime_speedup']:.2f}x",
                          f"{row['image_speedup']:.2f}x"])
        else:
            cells = ([row["system"], f"{row['lifetime_s']:.3f}", f"{row['lifetime_speedup']:.2f}x",
                      f"{row['image_speedup']:.2f}x", f"{row['text_s']:.3f}",
                      f"{100 * row['large_encoded_fraction']:.0f}%",
                      f"{row['first_query_s']:.3f}", f"{row['first_query_speedup']:.2f}x",
                      f"{row['per_query_ms']:.2f}", f"{row['per_query_speedup']:.2f}x"]
                     + [f"{row[f'R@{k}']:.2f}" for k in ks])
            if sparse_queries:
                cells[6:6] = [f"{row['sparse_lifetime_speedup']:.2f}x",
                              f"{100 * row['sparse_large_encoded_fraction']:.0f}%"]
            table.append(cells)
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("lifetime = measured wall time to embed the gallery at level 1, then embed, search and lazily "
                 "re-encode for every query (median of repeats); images = the part of it spent embedding images (all "
                 "levels), text = embedding the queries (same text tower for every system); × = 'large alone' time / "
                 "the system's; large enc. = share of the gallery the last level embedded over the lifetime")
    if kind == "speedup":
        lines.append("1st query = one query on a gallery nothing has embedded yet (median); warm query = mean latency "
                     "of single queries once level 1 is built, caches starting cold")
        if summary["rows"][0].get("sparse_queries"):
            lines.append(f"lifetime × {summary['rows'][0]['sparse_queries']}q = the same lifetime measured for a "
                         f"workload of only that many (evenly spaced) caption queries")
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def plot_recall_vs_speedup(rows: List[Dict[str, Any]], ks: Sequence[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cascades = [r for r in rows if r["m"]]
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in ks:
        line = ax.plot([r["lifetime_speedup"] for r in cascades], [r[f"R@{k}"] for r in cascades], marker="o",
                       label=f"cascade R@{k}")[0]
        ax.axhline(base[f"R@{k}"], color=line.get_color(), linestyle="--", linewidth=0.8)
        for r in cascades:
            ax.annotate("m=" + ",".join(map(str, r["m"])), (r["lifetime_speedup"], r[f"R@{k}"]), fontsize=7)
    ax.set_xlabel("measured lifetime speedup over the large model alone (×)")
    ax.set_ylabel("recall@k (%)  (dashed: large model alone)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.cascade", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment TOML (scripts/experiments/*.toml)")
    parser.add_argument("--levels", nargs="+", default=None,
                        help="override the config's level checkpoints, cheapest first (the last is 'the large model')")
    parser.add_argument("--eval-data-dir", default=None, help="override the config's eval root (holds coco2017/)")
    parser.add_argument("--device", default=None, help="override the config's device (cpu, cuda)")
    parser.add_argument("--plot", default=None, help="override where the recall-vs-speedup PNG goes")
    parser.add_argument("--repeats", type=int, default=None, help="override the config's timing repeats")
    parser.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    exp = read_experiment(args.config, args)
    summary = run_experiment(exp)
    print(format_table(summary, exp.ks), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
