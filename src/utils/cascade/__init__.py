"""Cascaded image search: index a gallery once with a cheap encoder, answer text queries by re-ranking its
shortlists with larger ones; and casCLIP's experiments on it.

    clipcompress cascade index --gallery data/corpus/eval --levels STUDENT.pt CLIP.pt --out IDX
    clipcompress cascade search IDX "a red circle" --k 10 --m 50
    clipcompress cascade --config scripts/experiments/cascade_topk_demo.toml
    clipcompress cascade --name 2lvl_flip_topk_2x            # scripts/experiments/2lvl_flip_topk_2x.toml

`index` streams the gallery (COCO, Flickr30k, an ImageFolder or a TSV of image paths) from disk in batches
through level 1 into an on-disk feature store and faiss index, and resumes an interrupted build; `search`
embeds the queries with the last level's text tower, shortlists with level 1 and lazily decodes and embeds
the shortlisted images for the higher levels, keeping what it embedded on disk for later queries.
`--config` runs a topk / speedup / distill experiment (scripts/experiments/*.toml), `--name` one of those by
name (casCLIP's `run.py --name`); its table is printed and written, with the run's log lines, to a log of its
own, `<--log-dir>/<name>/<time>.log`. The configs' default paths are what scripts/demo.sh writes, relative to
the folder the command runs in. The search algorithm and folder format are compress.ops.cascade; here are the
checkpoints, galleries, recipes and the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from compress.ops.cascade import INDEX_KINDS
from foundation.checkpoint import atomic_write_bytes
from foundation.dependencies import FAISS_INSTALL, require
from foundation.errors import UserError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from utils.cascade.experiments import Experiment, format_table, read_experiment, run_experiment
from utils.cascade.gallery import FORMATS, Gallery, read_gallery
from utils.cascade.search import DEFAULT_M, IndexReport, LevelSource, Searcher, index_gallery

__all__ = ["Experiment", "Gallery", "IndexReport", "LevelSource", "Searcher", "build_index_parser", "build_parser",
           "build_search_parser", "format_table", "index_gallery", "main", "read_experiment", "read_gallery",
           "run_experiment"]

PROG = "clipcompress cascade"
LOG_LEVELS = ["debug", "info", "warning"]
# casCLIP's experiment configs, found by --name (this checkout's scripts/experiments/)
EXPERIMENTS_DIR = Path(__file__).resolve().parents[3] / "scripts" / "experiments"
DEFAULT_LOG_DIR = "logs/cascade"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the encoders run (cpu, cuda)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder forward")
    parser.add_argument("--workers", type=int, default=0,
                        help="threads decoding and preprocessing images (0: in the main thread)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="an image of more pixels is refused unread (and never ranked); 0: only PIL's limit")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="verbosity. The index build's progress is a bar on a terminal, else a log line every "
                             "$CLIPCOMPRESS_PROGRESS_SECONDS (default 30); warning: none")


def _add_index_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gallery", required=True,
                        help="the images: an eval root or folder with COCO (coco2017/) or Flickr30k (flickr30k/, "
                             "flickr30/), an ImageFolder (class folders, or a folder of images), or a TSV/CSV of "
                             "image paths")
    parser.add_argument("--levels", nargs="+", required=True, metavar="CHECKPOINT",
                        help="our checkpoints, cheapest first; the last level's text tower embeds the queries")
    parser.add_argument("--out", required=True, help="the index folder (created; an interrupted build there resumes)")
    parser.add_argument("--gallery-format", default="auto", choices=FORMATS,
                        help="how to read --gallery (auto: COCO, then Flickr30k for a folder; a file is a table)")
    parser.add_argument("--max-images", type=int, default=0, help="index only the first N images (0: all)")
    parser.add_argument("--csv-img-key", default="filepath",
                        help="column of a --gallery table holding image paths (relative to the table or absolute)")
    parser.add_argument("--csv-separator", default="\t", help="column separator of a --gallery table")
    parser.add_argument("--index", default="flat", choices=INDEX_KINDS,
                        help="the level-1 faiss index: flat (exact inner product), ivf (IndexIVFFlat) or hnsw "
                             "(IndexHNSWFlat), the approximate ones for large galleries")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default about 4·sqrt(N))")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an index of another gallery or other levels in --out")
    _common(parser)


def _add_search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index_dir", metavar="INDEX_DIR", help="a folder written by the index command")
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="text queries")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--m", type=int, nargs="+", default=None,
                        help=f"candidates each level passes on: one count per level but the last "
                             f"(default {DEFAULT_M} each)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (ivf indexes)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW search beam width (hnsw indexes)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    _common(parser)


def _add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="experiment TOML (scripts/experiments/*.toml)")
    parser.add_argument("--name", default=None, metavar="EXPERIMENT",
                        help="run scripts/experiments/EXPERIMENT.toml (casCLIP's run.py --name), e.g. "
                             "2lvl_flip_topk_2x")
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR,
                        help="each experiment's log and table go to LOG_DIR/<name>/<time>.log")
    parser.add_argument("--levels", nargs="+", default=None,
                        help="replace the config's levels by these checkpoints, cheapest first (the last is 'the "
                             "large model')")
    parser.add_argument("--large", default=None,
                        help="replace the config's last level (the large model, which its recipes start from) by "
                             "this checkpoint")
    parser.add_argument("--eval-data-dir", default=None,
                        help="override the config's gallery: an eval root with coco2017/ or flickr30k/ (flickr30/)")
    parser.add_argument("--dataset", default=None, choices=["auto", "coco2017", "flickr30k"],
                        help="override which retrieval set of the eval root is the gallery")
    parser.add_argument("--calib-data", default=None,
                        help="override the pruning recipes' calibration data (a TSV or an eval root)")
    parser.add_argument("--train-data", default=None, help="override the distill recipes' training TSV")
    parser.add_argument("--cache-dir", default=None, help="override where recipe levels are built and cached")
    parser.add_argument("--max-images", type=int, default=None, help="override the gallery size (first N images)")
    parser.add_argument("--max-queries", type=int, default=None,
                        help="override how many caption queries (evenly spaced; 0: all)")
    parser.add_argument("--device", default=None, help="override the config's device (cpu, cuda)")
    parser.add_argument("--plot", default=None, help="override where the recall-vs-speedup PNG goes")
    parser.add_argument("--repeats", type=int, default=None, help="override the config's timing repeats")
    parser.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="verbosity (warning also quiets the recipe builds' trainer)")


def _subcommand_parser(parser, name: str, description: str, add_flags) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog=f"{PROG} {name}", allow_abbrev=False)
    parser.description = description
    add_flags(parser)
    return parser


def build_index_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    return _subcommand_parser(parser, "index", "Index a gallery: level 1 embeds every image, streamed from disk in "
                              "batches, into an on-disk feature store and a faiss index; rerun to resume an "
                              "interrupted build.", _add_index_flags)


def build_search_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    return _subcommand_parser(parser, "search", "Answer text queries over an index: level 1 shortlists, the higher "
                              "levels embed the shortlisted images lazily (kept on disk for later queries) and "
                              "re-rank.", _add_search_flags)


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: the top-level parser would read a subcommand's --m as an ambiguous --max-…
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    _add_experiment_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="{index,search}",
                                     help="index a gallery, or search an index (without one: --config runs an "
                                          "experiment)")
    build_index_parser(commands.add_parser("index", help="index a gallery (resumable)", prog=f"{PROG} index",
                                           allow_abbrev=False))
    build_search_parser(commands.add_parser("search", help="answer text queries over an index",
                                            prog=f"{PROG} search", allow_abbrev=False))
    return parser


def _configure(log_level: str, threads: int = 0) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in ("compress", "eval", "utils"):  # utils: the index build's progress lines
        logging.getLogger(name).setLevel(log_level.upper())
    from foundation.logs import quiet_open_clip

    quiet_open_clip()
    if threads:
        import torch

        torch.set_num_threads(threads)


def experiment_config(name: str) -> Path:
    """scripts/experiments/NAME.toml (NAME may end in .toml); UserError naming the known experiments if there is
    none. A name, not a path: a separator or a leading dot is refused."""
    stem = name[:-5] if name.endswith(".toml") else name
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
    if not stem or stem.startswith(".") or "/" in stem or "\\" in stem or stem not in known:
        raise UserError(f"--name {name}: no experiment of that name in {EXPERIMENTS_DIR}; known: {', '.join(known)}")
    return EXPERIMENTS_DIR / f"{stem}.toml"


def open_experiment_log(log_dir: str, name: str, config: str) -> Path:
    """A new `<log_dir>/<name>/<time>.log` (casCLIP's `.log/<name>/<time>.log`), headed by the command and the
    config; the run's log lines follow it there as on the console."""
    folder = Path(log_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--log-dir {log_dir}: cannot create {folder} ({error.strerror or error})") from None
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    path, n = folder / f"{stamp}.log", 1
    while path.exists():  # two runs in one second: each keeps its own log
        path, n = folder / f"{stamp}_{n}.log", n + 1
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# {PROG} {' '.join(sys.argv[1:])}\n# config: {config}\n")
    return path


def _max_pixels(value: int) -> Optional[int]:
    return value or None


def run_index(args: argparse.Namespace) -> IndexReport:
    report = index_gallery(args.gallery, args.levels, args.out, gallery_format=args.gallery_format,
                           max_images=args.max_images, index=args.index, nlist=args.nlist, hnsw_m=args.hnsw_m,
                           batch_size=args.batch_size, workers=args.workers, device=args.device,
                           max_pixels=_max_pixels(args.max_image_pixels), overwrite=args.overwrite,
                           quiet=args.log_level == "warning", img_key=args.csv_img_key, sep=args.csv_separator)
    if report.complete_before:
        print(f"{report.folder}: already indexed ({report.size} images); nothing to do")
    else:
        resumed = f", resumed after {report.already_done}" if report.already_done else ""
        print(f"{report.folder}: indexed {report.size} images{resumed}: level 1 embedded {report.encoded} "
              f"({report.unreadable} unreadable) in {report.decode_s:.1f} s decoding + {report.encode_s:.1f} s "
              f"encoding; index {args.index}")
    return report


def run_search(args: argparse.Namespace) -> None:
    searcher = Searcher.open(args.index_dir, device=args.device, batch_size=args.batch_size, workers=args.workers,
                             max_pixels=_max_pixels(args.max_image_pixels))
    cascade = searcher.cascade(args.m, args.nprobe, args.ef_search)
    results = searcher.search(args.queries, k=args.k, cascade=cascade)
    encoded = cascade.images_encoded()
    if args.json:
        print(json.dumps([{"query": query, "results": [{"path": p, "score": s, "index": i} for p, s, i in hits]}
                          for query, hits in zip(args.queries, results)], indent=1))
        return
    for query, hits in zip(args.queries, results):
        print(f"query: {query}")
        for rank, (path, score, _) in enumerate(hits, start=1):
            print(f"  {rank:>3}  {score:.4f}  {path}")
    print(f"embedded now, per level: {'+'.join(map(str, encoded))} (kept in {args.index_dir} for later queries)")


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # index, search and the experiments all build or read a faiss index of level 1's features
        require(PROG, ["faiss"], FAISS_INSTALL)
        if args.command is not None:
            if args.config or args.name:
                parser.error("--config and --name run an experiment; give them without the index/search command")
            minimums = {"batch_size": 1, "workers": 0, "threads": 0, "max_image_pixels": 0}
            minimums.update({"max_images": 0, "hnsw_m": 1, "nlist": 1} if args.command == "index"
                            else {"k": 1, "nprobe": 1, "ef_search": 1})
            for flag, minimum in minimums.items():
                value = getattr(args, flag)
                if value is not None and value < minimum:
                    parser.error(f"--{flag.replace('_', '-')} {value}: must be at least {minimum}")
            if args.command == "search" and args.m is not None and min(args.m) < 1:
                parser.error("--m: every candidate count must be at least 1")
            _configure(args.log_level, args.threads)
            (run_index if args.command == "index" else run_search)(args)
            return
        if not args.config and not args.name:
            parser.error("give --config EXPERIMENT.toml or --name EXPERIMENT, or the index / search command")
        if args.config and args.name:
            parser.error("--config and --name both choose the experiment: give one")
        config = args.config or str(experiment_config(args.name))
        _configure(args.log_level)
        exp = read_experiment(config, args)
        log_path = open_experiment_log(args.log_dir, exp.name, config)
        to_log = logging.FileHandler(log_path, encoding="utf-8")
        to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logging.getLogger().addHandler(to_log)  # every line the console shows
        try:
            summary = run_experiment(exp)
        finally:
            logging.getLogger().removeHandler(to_log)
            to_log.close()
        table = format_table(summary, exp.ks)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(table + "\n")
        print(table, flush=True)
        print(f"log: {log_path}", file=sys.stderr)
        if args.json:
            atomic_write_bytes(args.json, json.dumps(summary, indent=1).encode("utf-8"))  # whole or not at all
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
