"""casCLIP's experiments on the on-disk cascaded search, from a TOML config (scripts/experiments/*.toml).

    experiment = "topk"      R@k of each cascade, of the large model alone and of level 1 alone
    experiment = "speedup"   measured wall time of each system's search lifetime, first query and warm queries
    experiment = "distill"   build (or find in the cache) a distilled student level and score it zero-shot at
                             any k beside its teacher (casCLIP's `distilling_*`, Cascade CLIP's top-k check)

Captions of a retrieval set (COCO or Flickr30k) are the queries, its images the gallery. Every system — the
large model alone, level 1 alone, each cascade — runs the real search: a fresh index folder, level 1 streams
the gallery from disk into its store and faiss index, then every query is embedded, searched, and its
candidates lazily decoded and embedded by the higher levels. The lifetime is all of that, timed; recall is
eval.metrics' image_retrieval_recall@k (ties count against the model) of each system's ranked results, and
overlap@k (k the largest of the config's k) the share of the large model's own top k each system returns: the
cascade judged as approximate search, which says something even where the large model seldom finds the target.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from compress.ops.cascade import INDEX_KINDS, Cascade, ImageFiles, IndexOptions, SearchIndex
from eval.metrics import overlap_at_k, ranks_in_ranking, recall_at_ks
from foundation.errors import UserError
from utils.cascade.gallery import Gallery, read_gallery
from utils.cascade.recipes import DEFAULT_CACHE_DIR, BuildSettings, build_level, recipe_kind
from utils.cascade.search import LevelSource, encode_functions, load_encoders

log = logging.getLogger(__name__)

KINDS = ("topk", "speedup", "distill")
# zero-shot accuracies a distill experiment reports: up to Cascade CLIP's top-20
DISTILL_TOPK = (1, 3, 5, 10, 20)

LevelEntry = Union[str, LevelSource, Dict[str, Any]]


@dataclass
class Experiment:
    kind: str  # one of KINDS
    name: str
    levels: List[LevelEntry]  # cheapest first: checkpoints, LevelSources or config tables (recipes)
    eval_data_dir: Optional[str]
    ms: List[List[int]] = field(default_factory=list)  # one candidate-count list per cascade to try
    ks: List[int] = field(default_factory=lambda: [1, 5, 10])
    dataset: str = "auto"  # coco2017 | flickr30k | auto (COCO when both are there)
    device: str = "cpu"
    batch_size: int = 256
    query_batch_size: int = 256
    repeats: int = 1
    per_query_queries: int = 100
    lifetime_queries: int = 0  # speedup: also time a lifetime of only this many queries (0: no)
    first_query_queries: int = 3
    max_images: int = 0
    max_queries: int = 0  # 0: every caption; else this many, evenly spaced
    plot: Optional[str] = None
    threads: int = 0
    workers: int = 0  # decoding threads of every level
    index: IndexOptions = field(default_factory=IndexOptions)
    nprobe: Optional[int] = None
    ef_search: Optional[int] = None
    work_dir: Optional[str] = None  # where each system's index folder goes (a temp dir by default)
    build: BuildSettings = field(default_factory=BuildSettings)
    topk: List[int] = field(default_factory=lambda: list(DISTILL_TOPK))


# --- config --------------------------------------------------------------------------------------------


def _section(config: Dict[str, Any], name: str) -> Dict[str, Any]:
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"[{name}] must be a table")
    return value


def read_experiment(path: str, overrides: argparse.Namespace) -> Experiment:
    import tomllib

    try:
        config = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--config {path}: not valid TOML ({error})") from None
    cascade, data, output = _section(config, "cascade"), _section(config, "data"), _section(config, "output")
    calibration, distill = _section(config, "calibration"), _section(config, "distill")
    cache = _section(config, "cache")
    kind = config.get("experiment")
    if kind not in KINDS:
        raise UserError(f"{path}: experiment must be one of {', '.join(KINDS)}, got {kind!r}")
    levels: List[LevelEntry] = list(config.get("levels", []))
    if overrides.levels:
        levels = list(overrides.levels)
    elif overrides.large:
        if not levels:
            raise UserError(f"{path}: --large replaces the last [[levels]] entry, and there is none")
        levels[-1] = {"checkpoint": overrides.large}
    if not levels:
        raise UserError(f"{path}: needs [[levels]] (cheapest first; the last is the large model) or --levels")
    eval_data_dir = overrides.eval_data_dir or data.get("eval_data_dir")
    if kind != "distill" and not eval_data_dir:
        raise UserError(f"{path}: needs [data] eval_data_dir (or --eval-data-dir)")
    ms = [m if isinstance(m, list) else [m] for m in cascade.get("m", [])]
    if kind != "distill" and len(levels) > 1 and (not ms or any(len(m) != len(levels) - 1 for m in ms)):
        raise UserError(f"{path}: [cascade] m must list, per cascade to try, {len(levels) - 1} candidate count(s) "
                        f"for {len(levels)} levels")
    index_kind = cascade.get("index", "flat")
    if index_kind not in INDEX_KINDS:
        raise UserError(f"{path}: [cascade] index must be one of {', '.join(INDEX_KINDS)}")
    device = overrides.device or cascade.get("device", "cpu")
    build = BuildSettings(
        cache_dir=overrides.cache_dir or cache.get("dir", DEFAULT_CACHE_DIR),
        calib_data=overrides.calib_data or calibration.get("data"),
        calib_batches=int(calibration.get("batches", 8)), calib_batch_size=int(calibration.get("batch_size", 32)),
        calib_seed=int(calibration.get("seed", 0)), train_data=overrides.train_data or distill.get("train_data"),
        device=device, quiet=overrides.log_level == "warning")
    return Experiment(
        kind=kind, name=config.get("name", Path(path).stem), levels=levels, eval_data_dir=eval_data_dir, ms=ms,
        ks=list(cascade.get("k", [1, 5, 10])), dataset=overrides.dataset or data.get("dataset", "auto"),
        device=device, batch_size=int(cascade.get("batch_size", 256)),
        query_batch_size=int(cascade.get("query_batch_size", 256)),
        repeats=overrides.repeats or int(cascade.get("repeats", 1 if kind == "topk" else 3)),
        per_query_queries=int(cascade.get("per_query_queries", 100)),
        first_query_queries=int(cascade.get("first_query_queries", 3)),
        lifetime_queries=int(cascade.get("lifetime_queries", 0)),
        max_images=overrides.max_images if overrides.max_images is not None else int(data.get("max_images", 0)),
        max_queries=overrides.max_queries if overrides.max_queries is not None else int(data.get("max_queries", 0)),
        plot=overrides.plot or output.get("plot"), threads=int(cascade.get("threads", 0)),
        workers=int(cascade.get("workers", 0)),
        index=IndexOptions(index_kind, cascade.get("nlist"), int(cascade.get("hnsw_m", 32))),
        nprobe=cascade.get("nprobe"), ef_search=cascade.get("ef_search"),
        work_dir=output.get("work_dir"), build=build, topk=list(distill.get("topk", DISTILL_TOPK)))


def resolve_levels(exp: Experiment) -> List[LevelSource]:
    """Every level as a LevelSource; recipes are built from the large model (the last level) or found in the
    cache."""
    entries = [LevelSource(checkpoint=entry) if isinstance(entry, str) else entry for entry in exp.levels]
    large = entries[-1]
    if isinstance(large, dict):
        if recipe_kind(large):
            raise UserError("the last level is the large model the recipes start from: a checkpoint or a model, "
                            "not a recipe")
        large = build_level(large, None, exp.build)  # type: ignore[arg-type]  (a plain level needs no source)
    return [entry if isinstance(entry, LevelSource) else build_level(entry, large, exp.build)
            for entry in entries[:-1]] + [large]


def load_retrieval_gallery(exp: Experiment) -> Gallery:
    kind = {"auto": "auto", "coco2017": "coco", "coco": "coco", "flickr30k": "flickr30k",
            "flickr30": "flickr30k"}.get(exp.dataset)
    if kind is None:
        raise UserError(f"[data] dataset {exp.dataset!r}: coco2017 or flickr30k")
    gallery = read_gallery(exp.eval_data_dir, kind, exp.max_images)
    if gallery.kind not in ("coco", "flickr30k") or not gallery.captions:
        raise UserError(f"{exp.eval_data_dir}: the experiments need a captioned retrieval set (coco2017/ or "
                        f"flickr30k/ / flickr30/ under it), found {gallery.kind}")
    return gallery


def query_sample(gallery: Gallery, max_queries: int) -> Tuple[List[str], torch.Tensor]:
    """The caption queries and their target images: all, or `max_queries` evenly spaced."""
    rows = list(range(len(gallery.captions)))
    if max_queries and max_queries < len(rows):
        step = len(rows) / max_queries
        rows = [int(i * step) for i in range(max_queries)]
    return [gallery.captions[j] for j in rows], torch.tensor([gallery.text_to_image[j] for j in rows])


# --- measured runs -------------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    level_ids: List[int]  # into the experiment's levels
    ms: List[int]


@dataclass
class SearchRun:
    ranked: torch.Tensor
    scores: torch.Tensor  # the last level's scores of `ranked`: recall needs them to see ties
    lifetime_s: float  # index the gallery at level 1 + embed and answer every query
    levels: List[Dict[str, float]]  # per level: images encoded, unreadable, decode and encode seconds
    text_s: float  # embedding the queries


class Runner:
    """Runs the systems of one experiment on fresh index folders, the encoders loaded once."""

    def __init__(self, exp: Experiment, sources: List[LevelSource], gallery: Gallery):
        self.exp, self.sources, self.gallery = exp, sources, gallery
        self.encoders = load_encoders(sources, exp.device)
        self.encode_fns = encode_functions(self.encoders)
        self.identities = [source.identity() for source in sources]  # hashed once, outside every timing
        self.work_dir = exp.work_dir or tempfile.mkdtemp(prefix="cascade-")
        self.own_work_dir = exp.work_dir is None
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        if self.own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def encode_text(self, texts: List[str]) -> torch.Tensor:
        return self.encoders[-1].encode_text(texts, normalize=True).cpu()  # the text tower every level shares

    def warm_up(self, queries: List[str]) -> None:
        """One untimed batch through every encoder and the text tower: first calls pay allocator and thread-pool
        start-up, which would otherwise land on whichever system runs first."""
        indices = np.arange(min(self.exp.batch_size, len(self.gallery.paths)))
        for encoder, encode in {id(e): (e, f) for e, f in zip(self.encoders, self.encode_fns)}.values():
            images, _, _ = ImageFiles(self.gallery.paths, encoder.preprocess).load(indices)
            if len(images):
                encode(images)
        self.encode_text(queries)

    def fresh(self, system: System) -> Tuple[SearchIndex, Dict[str, float], Cascade, str]:
        """A new index folder for `system`, level 1 built: (index, level-1 build stats, cascade, folder)."""
        folder = tempfile.mkdtemp(prefix="index-", dir=self.work_dir)
        ids, exp = system.level_ids, self.exp
        index = SearchIndex.create(folder, self.gallery.paths, [self.identities[i] for i in ids], exp.index)
        built = index.build(self.encode_fns[ids[0]], self.encoders[ids[0]].preprocess, exp.batch_size, exp.workers)
        cascade = index.cascade([self.encode_fns[i] for i in ids], [self.encoders[i].preprocess for i in ids],
                                system.ms, exp.batch_size, exp.workers, nprobe=exp.nprobe, ef_search=exp.ef_search)
        return index, built.stats(), cascade, folder

    def lifetime(self, system: System, queries: List[str], k: int) -> SearchRun:
        start = time.perf_counter()
        _, first, cascade, folder = self.fresh(system)
        ranked, scores, text_s = [], [], 0.0
        for begin in range(0, len(queries), self.exp.query_batch_size):
            text_start = time.perf_counter()
            text = self.encode_text(queries[begin:begin + self.exp.query_batch_size])
            text_s += time.perf_counter() - text_start
            found, found_scores = cascade.search_scored(text, k)
            ranked.append(found)
            scores.append(found_scores)
        elapsed = time.perf_counter() - start
        shutil.rmtree(folder, ignore_errors=True)
        return SearchRun(torch.cat(ranked), torch.cat(scores), elapsed, level_stats(first, cascade), text_s)

    def first_query_seconds(self, system: System, queries: List[str], k: int) -> float:
        """Median time to answer one query on a gallery nothing has indexed yet (casCLIP's one-off search)."""
        times = []
        for query in queries:
            start = time.perf_counter()
            _, _, cascade, folder = self.fresh(system)
            cascade.search(self.encode_text([query]), k)
            times.append(time.perf_counter() - start)
            shutil.rmtree(folder, ignore_errors=True)
        return statistics.median(times)

    def per_query_seconds(self, system: System, queries: List[str], k: int) -> float:
        """Mean latency of one query (text embedding + search + lazy re-encoding) once level 1 is built,
        queries arriving one at a time with the higher levels' stores starting empty."""
        _, _, cascade, folder = self.fresh(system)
        times = []
        for query in queries:
            start = time.perf_counter()
            cascade.search(self.encode_text([query]), k)
            times.append(time.perf_counter() - start)
        shutil.rmtree(folder, ignore_errors=True)
        return statistics.mean(times)


def level_stats(first: Dict[str, float], cascade: Cascade) -> List[Dict[str, float]]:
    """What each level of a lifetime did: level 1's build plus anything it embedded lazily; a level sharing an
    earlier level's store did nothing of its own."""
    stats = []
    for position, level in enumerate(cascade.unique_levels()):
        own = level.stats() if level is not None else {"encoded": 0, "unreadable": 0, "decode_s": 0.0,
                                                        "encode_s": 0.0}
        if position == 0:
            own = {key: own[key] + first[key] for key in own}
        stats.append(own)
    return stats


# --- topk and speedup ----------------------------------------------------------------------------------


def run_experiment(exp: Experiment) -> Dict[str, Any]:
    if exp.threads:
        torch.set_num_threads(exp.threads)
    if exp.kind == "distill":
        return run_distill_experiment(exp)
    gallery = load_retrieval_gallery(exp)  # first: the recipe levels may take a training run to build
    sources = resolve_levels(exp)
    queries, targets = query_sample(gallery, exp.max_queries)
    runner = Runner(exp, sources, gallery)
    try:
        return _run_search_experiment(exp, sources, gallery, queries, targets, runner)
    finally:
        runner.close()


def _run_search_experiment(exp: Experiment, sources: List[LevelSource], gallery: Gallery, queries: List[str],
                           targets: torch.Tensor, runner: Runner) -> Dict[str, Any]:
    # one result more than the largest k: a result tied with the target right after the k-th must be seen for
    # the tie to count against the model (eval.metrics.ranks_in_ranking)
    depth = max(exp.ks) + 1
    last = len(sources) - 1
    systems = [System("large alone", [last], [])]
    if last > 0:
        systems.append(System("level 1 alone", [0], []))
    systems += [System("cascade m=" + ",".join(map(str, ms)), list(range(len(sources))), list(ms)) for ms in exp.ms]

    runner.warm_up(queries[: exp.query_batch_size])
    # a sparser workload (fewer queries than gallery images) is where a cascade's lifetime pays off: the
    # large model then embeds only the union of few shortlists
    sparse = (queries[:: max(1, len(queries) // exp.lifetime_queries)][: exp.lifetime_queries]
              if exp.kind == "speedup" and exp.lifetime_queries else [])
    results: Dict[str, Dict[str, Any]] = {s.name: {"lifetimes": [], "image_s": [], "text_s": [], "sparse": []}
                                          for s in systems}
    for _ in range(max(1, exp.repeats)):  # interleaved repeats: machine load hits every system alike
        for system in systems:
            run = runner.lifetime(system, queries, depth)
            entry = results[system.name]
            if sparse:
                sparse_run = runner.lifetime(system, sparse, depth)
                entry["sparse"].append(sparse_run.lifetime_s)
                entry["sparse_encoded"] = [level["encoded"] for level in sparse_run.levels]
            entry["lifetimes"].append(run.lifetime_s)
            entry["image_s"].append(sum(level["decode_s"] + level["encode_s"] for level in run.levels))
            entry["text_s"].append(run.text_s)
            entry["levels"] = run.levels
            entry["recall"] = recall_at_ks(ranks_in_ranking(run.ranked, run.scores, targets), exp.ks)
            entry["ranked"] = run.ranked
    if exp.kind == "speedup" and exp.per_query_queries and exp.first_query_queries:
        sample = queries[:: max(1, len(queries) // max(1, exp.per_query_queries))][: exp.per_query_queries]
        cold_sample = sample[: exp.first_query_queries]
        for system in systems:
            results[system.name]["per_query_s"] = runner.per_query_seconds(system, sample, depth)
            results[system.name]["first_query_s"] = runner.first_query_seconds(system, cold_sample, depth)

    base = results["large alone"]
    overlap_k = max(exp.ks)
    base_lifetime = statistics.median(base["lifetimes"])
    base_image_s = statistics.median(base["image_s"])
    size = len(gallery.paths)
    rows = []
    for system in systems:
        entry = results[system.name]
        lifetime = statistics.median(entry["lifetimes"])
        image_s = statistics.median(entry["image_s"])
        encoded = [level["encoded"] for level in entry["levels"]]
        row = {"system": system.name, "m": system.ms, "lifetime_s": lifetime,
               "lifetime_speedup": base_lifetime / lifetime, "image_s": image_s,
               "image_speedup": base_image_s / image_s, "text_s": statistics.median(entry["text_s"]),
               "levels": [{"level": sources[i].name(), **stats} for i, stats in zip(system.level_ids,
                                                                                    entry["levels"])],
               "large_encoded_fraction": (encoded[-1] / size) if system.level_ids[-1] == last else 0.0,
               **{f"R@{k}": 100 * v for k, v in entry["recall"].items()},
               **{f"dR@{k}": 100 * (v - base["recall"][k]) for k, v in entry["recall"].items()},
               "overlap_k": overlap_k, "overlap": overlap_at_k(entry["ranked"], base["ranked"], overlap_k)}
        if sparse:
            row["sparse_queries"] = len(sparse)
            row["sparse_lifetime_s"] = statistics.median(entry["sparse"])
            row["sparse_lifetime_speedup"] = statistics.median(base["sparse"]) / row["sparse_lifetime_s"]
            row["sparse_large_encoded_fraction"] = (
                entry["sparse_encoded"][-1] / size if system.level_ids[-1] == last else 0.0)
        if "per_query_s" in entry:
            row["per_query_ms"] = 1000 * entry["per_query_s"]
            row["per_query_speedup"] = base["per_query_s"] / entry["per_query_s"]
            row["first_query_s"] = entry["first_query_s"]
            row["first_query_speedup"] = base["first_query_s"] / entry["first_query_s"]
        rows.append(row)
    summary = {"experiment": exp.kind, "name": exp.name, "levels": [s.name() for s in sources],
               "checkpoints": [s.checkpoint for s in sources], "dataset": gallery.name, "gallery": size,
               "queries": len(queries), "repeats": exp.repeats, "index": exp.index.kind, "rows": rows}
    if exp.plot:
        plot_recall_vs_speedup(rows, exp.ks, exp.plot,
                               f"{exp.name}: {gallery.name}, {size} images, {len(queries)} captions as queries")
        summary["plot"] = exp.plot
    return summary


# --- distill -------------------------------------------------------------------------------------------


def run_distill_experiment(exp: Experiment) -> Dict[str, Any]:
    """Build the config's distill level (or find it in the cache) from the large model; with an eval root,
    score student and teacher zero-shot at every k of `topk`."""
    distilled = [entry for entry in exp.levels if isinstance(entry, dict) and recipe_kind(entry) == "distill"]
    if len(distilled) != 1 or len(exp.levels) != 2:
        raise UserError("a distill experiment has two [[levels]]: the distill recipe, then the teacher")
    if exp.eval_data_dir:  # scored after the student is built (a training run): checked before it
        from eval.benchmarks import check_eval_data

        check_eval_data(exp.eval_data_dir, ("zeroshot",), what="[data] eval_data_dir / --eval-data-dir")
    built_before = len(exp.build.built)
    student, teacher = resolve_levels(exp)
    summary: Dict[str, Any] = {"experiment": "distill", "name": exp.name, "student": student.checkpoint,
                               "student_level": student.name(), "teacher": teacher.name(),
                               "built": len(exp.build.built) > built_before, "zeroshot": {}}
    if exp.eval_data_dir:
        import eval

        for role, source in (("student", student), ("teacher", teacher)):
            metrics = eval.run_benchmarks(source.load(exp.device), exp.eval_data_dir, benchmarks=("zeroshot",),
                                          batch_size=exp.batch_size, topk=exp.topk)
            summary["zeroshot"][role] = metrics
    return summary


# --- output ----------------------------------------------------------------------------------------------


def _levels_cell(row: Dict[str, Any]) -> str:
    return "+".join(str(level["encoded"]) for level in row["levels"])


def format_table(summary: Dict[str, Any], ks: Sequence[int]) -> str:
    if summary["experiment"] == "distill":
        return format_distill(summary)
    kind = summary["experiment"]
    lines = [f"{summary['name']} ({kind}): {summary['dataset']}, {summary['gallery']} gallery images, "
             f"{summary['queries']} caption queries, level-1 index {summary['index']}; levels (cheapest first): "
             f"{', '.join(summary['levels'])}"]
    overlap_name = f"overlap@{summary['rows'][0]['overlap_k']}"
    if kind == "topk":
        header = (["system"] + [f"R@{k}" for k in ks] + [f"ΔR@{k}" for k in ks] + [overlap_name]
                  + ["large enc.", "images enc.", "lifetime ×", "images ×"])
    else:
        header = ["system", "lifetime s", "lifetime ×", "images ×", "text s", "large enc.", "images enc.",
                  "1st query s", "1st query ×", "warm query ms", "warm query ×"] + [f"R@{k}" for k in ks] + [
                      overlap_name]
        sparse_queries = summary["rows"][0].get("sparse_queries")
        if sparse_queries:
            header[7:7] = [f"lifetime × {sparse_queries}q", f"large enc. {sparse_queries}q"]
        if "first_query_s" not in summary["rows"][0]:
            header = [h for h in header if not h.startswith(("1st query", "warm query"))]
    table = [header]
    for row in summary["rows"]:
        if kind == "topk":
            table.append([row["system"]] + [f"{row[f'R@{k}']:.2f}" for k in ks] +
                         [f"{row[f'dR@{k}']:+.2f}" for k in ks] + [f"{row['overlap']:.2f}"] +
                         [f"{100 * row['large_encoded_fraction']:.0f}%", _levels_cell(row),
                          f"{row['lifetime_speedup']:.2f}x", f"{row['image_speedup']:.2f}x"])
            continue
        cells = [row["system"], f"{row['lifetime_s']:.3f}", f"{row['lifetime_speedup']:.2f}x",
                 f"{row['image_speedup']:.2f}x", f"{row['text_s']:.3f}",
                 f"{100 * row['large_encoded_fraction']:.0f}%", _levels_cell(row)]
        if sparse_queries:
            cells += [f"{row['sparse_lifetime_speedup']:.2f}x", f"{100 * row['sparse_large_encoded_fraction']:.0f}%"]
        if "first_query_s" in row:
            cells += [f"{row['first_query_s']:.3f}", f"{row['first_query_speedup']:.2f}x",
                      f"{row['per_query_ms']:.2f}", f"{row['per_query_speedup']:.2f}x"]
        table.append(cells + [f"{row[f'R@{k}']:.2f}" for k in ks] + [f"{row['overlap']:.2f}"])
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("lifetime = measured wall time to index the gallery at level 1 (decode from disk + embed + faiss), "
                 "then embed, search and lazily decode + re-encode for every query (median of repeats); images = the "
                 "part of it spent decoding and embedding images (all levels), text = embedding the queries (same "
                 "text tower for every system); × = 'large alone' time / the system's; large enc. = share of the "
                 "gallery the last level embedded; images enc. = images each level embedded (cheapest first); "
                 f"{overlap_name} = share of the large model's own top {summary['rows'][0]['overlap_k']} that the "
                 "system returns (approximate-search quality, no labels needed)")
    if kind == "speedup":
        if "first_query_s" in summary["rows"][0]:
            lines.append("1st query = one query on a gallery nothing has indexed yet (median); warm query = mean "
                         "latency of single queries once level 1 is built, the higher levels' stores starting empty")
        if summary["rows"][0].get("sparse_queries"):
            lines.append(f"lifetime × {summary['rows'][0]['sparse_queries']}q = the same lifetime measured for a "
                         f"workload of only that many (evenly spaced) caption queries")
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}")
    return "\n".join(lines)


def format_distill(summary: Dict[str, Any]) -> str:
    lines = [f"{summary['name']} (distill): {summary['student_level']} from {summary['teacher']}, "
             f"{'built now' if summary['built'] else 'from the cache'}: {summary['student']}"]
    scores = summary["zeroshot"]
    if scores:
        keys = sorted({key for metrics in scores.values() for key in metrics},
                      key=lambda key: (key.rsplit("/", 1)[0], _k_order(key)))
        lines.append(f"{'zero-shot':<40}  {'student':>8}  {'teacher':>8}")
        for key in keys:
            lines.append(f"{key:<40}  " + "  ".join(f"{scores[role].get(key, float('nan')):>8.4f}"
                                                    for role in ("student", "teacher")))
    return "\n".join(lines)


def _k_order(key: str) -> int:
    metric = key.rsplit("/", 1)[-1]
    return int(metric[3:]) if metric.startswith("acc") and metric[3:].isdigit() else 1 << 30


# one marker per cascade (its m), one colour per k
CASCADE_MARKERS = "osD^vP*Xh<>p"


def recall_speedup_figure(rows: List[Dict[str, Any]], ks: Sequence[int], title: str):
    """The figure `plot_recall_vs_speedup` saves: each cascade's recall@k against its measured lifetime
    speedup, a dashed line per k at the large model alone, and level 1 alone where it ran. Points are told
    apart by a legend (colour: k, marker: the cascade's m), not by text beside them, so none overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cascades = sorted((r for r in rows if r["m"]), key=lambda r: r["lifetime_speedup"])
    base = rows[0]  # the large model alone
    level1 = next((r for r in rows if r["system"] == "level 1 alone"), None)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    handles = []
    for i, k in enumerate(ks):
        colour = colours[i % len(colours)]
        ax.plot([r["lifetime_speedup"] for r in cascades], [r[f"R@{k}"] for r in cascades], color=colour,
                linewidth=1, zorder=2)
        for j, r in enumerate(cascades):
            ax.plot(r["lifetime_speedup"], r[f"R@{k}"], marker=CASCADE_MARKERS[j % len(CASCADE_MARKERS)],
                    color=colour, linestyle="none", zorder=3)
        ax.axhline(base[f"R@{k}"], color=colour, linestyle="--", linewidth=0.8, zorder=1)
        if level1 is not None:
            ax.plot(level1["lifetime_speedup"], level1[f"R@{k}"], marker="x", color=colour, linestyle="none",
                    zorder=3)
        handles.append(Line2D([], [], color=colour, label=f"recall@{k}"))
    handles.append(Line2D([], [], color="0.4", linestyle="--", linewidth=0.8, label="large model alone"))
    if level1 is not None:
        handles.append(Line2D([], [], color="0.3", marker="x", linestyle="none", label="level 1 alone"))
    handles += [Line2D([], [], color="0.3", marker=CASCADE_MARKERS[j % len(CASCADE_MARKERS)], linestyle="none",
                       label="cascade m=" + ",".join(map(str, r["m"]))) for j, r in enumerate(cascades)]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0,
              title="m: candidates a level\npasses to the next", title_fontsize=8)
    ax.set_xlabel("speedup over the large model alone (×)\nmeasured wall time: index the gallery, then answer "
                  "every query", fontsize=9)
    ax.set_ylabel("text-to-image recall@k (%)")
    ax.set_title(f"Cascaded search: recall against speedup\n{title}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_recall_vs_speedup(rows: List[Dict[str, Any]], ks: Sequence[int], path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = recall_speedup_figure(rows, ks, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
