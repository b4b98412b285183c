"""Index a gallery on disk and answer text queries with a cascade of checkpoints (the Python API of
`clipcompress cascade index` and `... search`).

    from utils.cascade import index_gallery, Searcher
    index_gallery("data/corpus/eval", ["student.pt", "clip.pt"], "logs/gallery_index")   # cheapest first
    searcher = Searcher.open("logs/gallery_index")
    hits = searcher.search(["a red circle"], k=10, m=[50])   # per query: [(path, score, gallery index), ...]

The algorithm and the folder format are compress.ops.cascade (`SearchIndex`); this module loads the
checkpoints (eval.load_encoder: validated model specs), names each level by its checkpoint's path and
SHA-256 (an index is only reused, resumed or searched with exactly the weights it was built with), and
reads galleries (utils.cascade.gallery).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from compress.ops.cascade import Cascade, IndexMismatch, IndexOptions, SearchIndex
from foundation.errors import UserError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from foundation.progress import Progress

log = logging.getLogger(__name__)

# candidates each level passes on when the caller names none (casCLIP's middle setting)
DEFAULT_M = 50


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LevelSource:
    """Where a level's encoder comes from: one of our checkpoints, or an open_clip model name with its weights
    (a local file or a tag open_clip knows)."""

    checkpoint: Optional[str] = None
    model: Optional[str] = None
    pretrained: Optional[str] = None
    label: Optional[str] = None  # how tables name it (a recipe's description); default the file name

    def name(self) -> str:
        if self.label:
            return self.label
        return os.path.basename(self.checkpoint) if self.checkpoint else f"{self.model}:{self.pretrained}"

    def identity(self) -> Dict[str, Any]:
        """What makes two levels the same encoder: the file's path and hash (or the model name and weights)."""
        if self.checkpoint:
            path = os.path.abspath(self.checkpoint)
            if not os.path.isfile(path):
                raise UserError(f"level checkpoint not found: {self.checkpoint}")
            return {"checkpoint": path, "sha256": file_sha256(path)}
        weights = self.pretrained
        if weights and os.path.isfile(weights):
            return {"model": self.model, "pretrained": os.path.abspath(weights), "sha256": file_sha256(weights)}
        return {"model": self.model, "pretrained": weights}

    def load(self, device: str = "cpu"):
        from eval.models import load_encoder

        try:
            if self.checkpoint:
                return load_encoder(self.checkpoint, device=device)
            return load_encoder(self.model, pretrained=self.pretrained, device=device)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(f"level {self.name()}: {error}") from None


def source_of_identity(identity: Dict[str, Any]) -> LevelSource:
    if "checkpoint" in identity:
        return LevelSource(checkpoint=identity["checkpoint"])
    return LevelSource(model=identity["model"], pretrained=identity.get("pretrained"))


def load_encoders(sources: Sequence[LevelSource], device: str = "cpu") -> List[Any]:
    """One eval Encoder per level; a source listed twice is loaded once (and shares its store)."""
    loaded: Dict[LevelSource, Any] = {}
    for source in sources:
        if source not in loaded:
            loaded[source] = source.load(device)
    return [loaded[source] for source in sources]


def image_encoder(encoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """images → L2-normalised features on the CPU (what a cascade level stores)."""
    def encode(images: torch.Tensor) -> torch.Tensor:
        return encoder.encode_image(images, normalize=True).cpu()
    encode.encoder = encoder  # one encoder object → one function: levels sharing it share a store
    return encode


def encode_functions(encoders: Sequence[Any]) -> List[Callable]:
    made: Dict[int, Callable] = {}
    return [made.setdefault(id(e), image_encoder(e)) for e in encoders]


# --- index -----------------------------------------------------------------------------------------------


@dataclass
class IndexReport:
    folder: Path
    size: int
    already_done: int  # images a previous (interrupted) build had stored
    encoded: int  # images this call embedded
    unreadable: int
    decode_s: float
    encode_s: float
    complete_before: bool


def index_gallery(gallery: str | os.PathLike, levels: Sequence[str | LevelSource], out: str | os.PathLike,
                  gallery_format: str = "auto", max_images: int = 0, index: str = "flat",
                  nlist: Optional[int] = None, hnsw_m: int = 32, batch_size: int = 256, workers: int = 0,
                  device: str = "cpu", max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, overwrite: bool = False,
                  quiet: bool = True, img_key: str = "filepath", sep: str = "\t") -> IndexReport:
    """Build (or resume building) the cascade index of `gallery` in `out`: level 1 embeds every image,
    streamed from disk in batches, into its feature store, then the level-1 faiss index is written. The higher
    levels' stores start empty; searches fill them."""
    from utils.cascade.gallery import read_gallery

    sources = [s if isinstance(s, LevelSource) else LevelSource(checkpoint=str(s)) for s in levels]
    if not sources:
        raise UserError("--levels: give at least one checkpoint (cheapest first)")
    data = read_gallery(gallery, gallery_format, max_images, img_key=img_key, sep=sep)
    try:
        search_index = SearchIndex.create(out, data.paths, [s.identity() for s in sources],
                                          IndexOptions(index, nlist, hnsw_m), gallery_info={
                                              "source": os.path.abspath(gallery), **data.describe()},
                                          overwrite=overwrite)
    except IndexMismatch as error:
        raise UserError(f"{error} (--overwrite)") from None
    store = search_index.level1_store
    already, complete_before = store.done(), search_index.complete
    if complete_before:
        return IndexReport(Path(out), search_index.size, already, 0, 0, 0.0, 0.0, True)
    encoder = sources[0].load(device)
    # a bar on a terminal, else a log line every $CLIPCOMPRESS_PROGRESS_SECONDS (a batch job's log file)
    with Progress(total=search_index.size, initial=already, desc=f"indexing {out}: level 1", unit="img",
                  enabled=not quiet, logger=log) as bar:
        try:
            level = search_index.build(encode_functions([encoder])[0], encoder.preprocess, batch_size, workers,
                                       max_pixels, progress=bar.update)
        except ValueError as error:  # nothing readable, an IVF too large for the gallery
            raise UserError(str(error)) from None
    return IndexReport(Path(out), search_index.size, already, level.encoded, level.unreadable, level.decode_s,
                       level.encode_s, False)


# --- search ----------------------------------------------------------------------------------------------


class Searcher:
    """Answers text queries over an index folder: the levels' checkpoints are checked against the hashes the
    index was built with and loaded once; queries are embedded by the last level's text tower."""

    def __init__(self, index: SearchIndex, encoders: Sequence[Any], batch_size: int = 256, workers: int = 0,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.index = index
        self.encoders = list(encoders)
        self.encode_fns = encode_functions(self.encoders)
        self.batch_size, self.workers, self.max_pixels = batch_size, workers, max_pixels

    @classmethod
    def open(cls, folder: str | os.PathLike, device: str = "cpu", batch_size: int = 256, workers: int = 0,
             max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> "Searcher":
        try:
            index = SearchIndex.open(folder)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(str(error)) from None
        sources = [source_of_identity(identity) for identity in index.levels]
        for source, identity in zip(sources, index.levels):
            if source.identity() != identity:
                raise UserError(f"{folder}: level {source.name()} is not the file the index was built with (its "
                                f"SHA-256 changed): index again with --overwrite")
        return cls(index, load_encoders(sources, device), batch_size, workers, max_pixels)

    def default_ms(self) -> List[int]:
        return [DEFAULT_M] * (len(self.encoders) - 1)

    def cascade(self, ms: Optional[Sequence[int]] = None, nprobe: Optional[int] = None,
                ef_search: Optional[int] = None) -> Cascade:
        ms = list(ms) if ms is not None else self.default_ms()
        if len(ms) != len(self.encoders) - 1:
            raise UserError(f"--m: the index has {len(self.encoders)} levels, so give {len(self.encoders) - 1} "
                            f"candidate count(s), got {ms}")
        return self.index.cascade(self.encode_fns, [e.preprocess for e in self.encoders], ms, self.batch_size,
                                  self.workers, self.max_pixels, nprobe, ef_search)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encoders[-1].encode_text(list(texts), normalize=True).cpu()

    def search(self, texts: Sequence[str], k: int = 10, m: Optional[Sequence[int]] = None,
               nprobe: Optional[int] = None, ef_search: Optional[int] = None,
               cascade: Optional[Cascade] = None) -> List[List[Tuple[str, float, int]]]:
        """Per query, its top-k as (image path, score of the last level, gallery index), best first."""
        cascade = cascade or self.cascade(m, nprobe, ef_search)
        found, scores = cascade.search_scored(self.encode_text(texts), k)
        return [[(self.index.paths[i], float(s), int(i)) for i, s in zip(row.tolist(), row_scores.tolist())
                 if i >= 0] for row, row_scores in zip(found, scores)]
