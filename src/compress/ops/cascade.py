"""Cascaded text→image search (casCLIP, Cascade CLIP): a cheap encoder shortlists, larger encoders re-rank.

Level 1 embeds the whole gallery once with the cheapest image encoder into a faiss inner-product index
(normalised features: cosine). For a query, level 1 returns its top-m_1 gallery images; level 2 embeds those
candidates it has not seen yet (lazily, kept for every later query) and keeps the top-m_2 by its own
scores; … the last level returns the top-k. Every level scores against the same query embedding, so all
image encoders must live in one text embedding space (a distilled student paired with its teacher's text
tower, a pruned copy of the large CLIP, …).

Scoring after level 1 is exact (float64 dot products over the candidates); ties go to the lower gallery
index. Level 1 uses faiss (float32) only to choose the candidates. An encoder that appears at several
levels is embedded once (its store is shared), so a cascade of one encoder ranks exactly like that encoder.

The pieces, usable on their own:

- an image source (`TensorImages`: a tensor in RAM; `ImageFiles`: paths decoded with foundation.images and
  preprocessed on demand, so no gallery has to fit in memory);
- a `FeatureStore` per encoder: float32 features and one state byte per image (not embedded yet, embedded,
  unreadable), in RAM or as two numpy memmaps on disk. Features are flushed before their state bytes, so a
  state byte that says "embedded" always has its feature behind it, whatever interrupts the process. The
  memmaps' disk space is reserved when they are created (posix_fallocate): a full disk is then one line
  (UserError) rather than a SIGBUS when a page of the map is written;
- a `Level` (encoder + source + store) that embeds missing images in ascending index order, in batches;
- `Cascade`, the search over levels and a level-1 faiss index (`build_faiss_index`: exact IndexFlatIP, or
  IVF / HNSW for large galleries);
- `SearchIndex`, the on-disk form: a folder holding the gallery's paths, every level's store, the level-1
  index and a manifest; `build` streams the gallery through level 1 and resumes where an interrupted build
  stopped, and searches persist what the higher levels embed for later queries and processes.

What loads the encoders (checkpoints, eval.load_encoder) is the caller's business: `python -m utils.cascade`
(utils/cascade/) is the command line, the experiment harness and the benchmark's engine.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from compress.models.preprocess import split_preprocess
from foundation.checkpoint import atomic_write, atomic_write_bytes
from foundation.errors import UserError
from foundation.files import preallocate, write_failure
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, open_rgb

log = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]

# a FeatureStore's state byte per image
MISSING, ENCODED, UNREADABLE = 0, 1, 2

# Candidate scores are gathered as Q×m×D float64 blocks: at most this many elements per block (128 MiB), so m = N
# on a large gallery does not need Q×N×D memory.
SCORE_BLOCK_ELEMENTS = 1 << 24


# --- image sources ---------------------------------------------------------------------------------------


class TensorImages:
    """A gallery already decoded and preprocessed, as one (N, C, H, W) tensor (small galleries, tests)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load(self, indices: np.ndarray) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(images of `indices` that could be read, those indices, the indices that could not)."""
        return self.images[torch.from_numpy(indices)], indices, indices[:0]


class ImageFiles:
    """Gallery images by path, decoded with foundation.images.open_rgb (the training and eval decoding rules:
    pixel limit, raster formats, 16-bit and transparency handling) and preprocessed only when asked for (the
    tensor steps of the transform once per batch: `split_preprocess`).

    An image that cannot be decoded is reported as unreadable (one warning line naming it) and never ranked.
    `workers` > 0 decodes in that many threads (PIL's decoders and resizes release the GIL)."""

    def __init__(self, paths: Sequence[Union[str, Path]], preprocess: Callable,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, workers: int = 0):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self._per_image, self._per_batch = split_preprocess(preprocess)
        self.max_pixels = max_pixels
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> Optional[torch.Tensor]:
        path = self.paths[index]
        try:
            return self._per_image(open_rgb(path, self.max_pixels))
        except (ImageError, OSError, ValueError) as error:
            log.warning("gallery image %d (%s) is not used: %s", index, path, error)
            return None

    def load(self, indices: np.ndarray) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        pixels = list(self._pool.map(self._read, indices.tolist())) if self._pool else [self._read(int(i))
                                                                                          for i in indices]
        readable = np.array([p is not None for p in pixels], dtype=bool)
        read = [p for p in pixels if p is not None]
        if not read:
            images = torch.empty(0)
        else:
            images = self._per_batch(read) if self._per_batch is not None else torch.stack(read)
        return images, indices[readable], indices[~readable]


ImageSource = Union[TensorImages, ImageFiles]


# --- feature stores --------------------------------------------------------------------------------------


def _reserve(path: str, size: int) -> None:
    """A new file of `size` zero bytes at `path`, its blocks allocated now (a memmap over it never meets a
    full disk); on failure nothing is left and the error is one line."""
    try:
        with open(path, "xb") as f:
            preallocate(f, size)
            f.truncate(size)  # where glibc emulated fallocate by writing, the size is already right
    except OSError as error:
        if os.path.exists(path) and not isinstance(error, FileExistsError):
            os.remove(path)
        raise UserError(f"cannot write {path}: {write_failure(error)}") from None


class FeatureStore:
    """Features (N, D) float32 and a state byte per image (MISSING / ENCODED / UNREADABLE) of one encoder.

    `path` None keeps both in RAM; otherwise they are the memmaps `<path>.f32` and `<path>.state`. D is learnt
    from the first batch written (the .f32 file is created then, and its size gives D when reopened)."""

    def __init__(self, size: int, path: Optional[Union[str, Path]] = None):
        self.size = int(size)
        self.path = None if path is None else str(path)
        self.features: Optional[np.ndarray] = None
        if self.path is None:
            self.state = np.zeros(self.size, dtype=np.uint8)
            return
        state_file = self.path + ".state"
        if os.path.exists(state_file):
            if os.path.getsize(state_file) != self.size:
                raise ValueError(f"{state_file} holds {os.path.getsize(state_file)} states for {self.size} images")
            self.state = np.memmap(state_file, dtype=np.uint8, mode="r+", shape=(self.size,))
        else:
            _reserve(state_file, self.size)
            self.state = np.memmap(state_file, dtype=np.uint8, mode="r+", shape=(self.size,))
        feature_file = self.path + ".f32"
        if os.path.exists(feature_file):
            dim, rest = divmod(os.path.getsize(feature_file), 4 * max(1, self.size))
            if rest or not dim:
                raise ValueError(f"{feature_file}: its size fits no (images={self.size}, dim) float32 array")
            self.features = np.memmap(feature_file, dtype=np.float32, mode="r+", shape=(self.size, dim))

    @property
    def dim(self) -> Optional[int]:
        return None if self.features is None else int(self.features.shape[1])

    def _allocate(self, dim: int) -> None:
        if self.path is None:
            self.features = np.zeros((self.size, dim), dtype=np.float32)
        else:
            _reserve(self.path + ".f32", 4 * self.size * dim)
            self.features = np.memmap(self.path + ".f32", dtype=np.float32, mode="r+", shape=(self.size, dim))

    def missing(self, indices: np.ndarray) -> np.ndarray:
        """The distinct indices among `indices` not embedded (or found unreadable) yet, ascending."""
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        return indices[self.state[indices] == MISSING]

    def write(self, indices: np.ndarray, features: np.ndarray, unreadable: np.ndarray = np.empty(0, np.int64)) -> None:
        """Store the features of `indices` and mark `unreadable`; features reach the disk before the states."""
        if len(indices):
            if self.features is None:
                self._allocate(features.shape[1])
            elif features.shape[1] != self.features.shape[1]:
                raise ValueError(f"features of width {features.shape[1]} for a store of width {self.features.shape[1]}")
            self.features[indices] = features
            if isinstance(self.features, np.memmap):
                self.features.flush()
        self.state[indices] = ENCODED
        self.state[unreadable] = UNREADABLE
        if isinstance(self.state, np.memmap):
            self.state.flush()

    def usable(self) -> np.ndarray:
        """Bool (N,): the images whose features are stored."""
        return self.state == ENCODED

    def done(self) -> int:
        """Images embedded or found unreadable so far."""
        return int(np.count_nonzero(self.state != MISSING))

    def features_tensor(self) -> torch.Tensor:
        """The features as a torch tensor sharing the store's memory (zeros where nothing is stored)."""
        if self.features is None:
            raise ValueError("nothing stored yet")
        return torch.from_numpy(np.asarray(self.features))


# --- levels ----------------------------------------------------------------------------------------------


class Level:
    """One cascade level: an image encoder (images → L2-normalised features), where its images come from, and
    the store of what it embedded. Counts what it did: images embedded, unreadable, seconds decoding (reading
    + preprocessing) and seconds encoding."""

    def __init__(self, encode: Encode, images: ImageSource, store: Optional[FeatureStore] = None,
                 batch_size: int = 256):
        self.encode = encode
        self.images = images
        self.store = store if store is not None else FeatureStore(len(images))
        if self.store.size != len(images):
            raise ValueError(f"a store of {self.store.size} images for a gallery of {len(images)}")
        self.batch_size = batch_size
        self.encoded = 0
        self.unreadable = 0
        self.decode_s = 0.0
        self.encode_s = 0.0

    @property
    def seconds(self) -> float:
        return self.decode_s + self.encode_s

    @torch.no_grad()
    def ensure(self, indices: Union[torch.Tensor, np.ndarray, Sequence[int]],
               progress: Optional[Callable[[int], None]] = None) -> None:
        """Embed the images among `indices` this level has not seen, ascending, in batches (so the result does
        not depend on which query asked first). `progress(n)` is called after each batch with its size."""
        if torch.is_tensor(indices):
            indices = indices.cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        missing = self.store.missing(indices[indices >= 0])
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            began = time.perf_counter()
            pixels, readable, unreadable = self.images.load(chunk)
            decoded = time.perf_counter()
            features = (self.encode(pixels).float().cpu().numpy() if len(readable)
                        else np.empty((0, self.store.dim or 0), np.float32))
            self.encode_s += time.perf_counter() - decoded
            self.decode_s += decoded - began
            self.store.write(readable, features, unreadable)
            self.encoded += len(readable)
            self.unreadable += len(unreadable)
            if progress is not None:
                progress(len(chunk))

    def embed_all(self, progress: Optional[Callable[[int], None]] = None) -> None:
        """Every image of the gallery not stored yet (a resumed build continues where the last one stopped)."""
        self.ensure(np.flatnonzero(self.store.state == MISSING), progress)

    def stats(self) -> Dict[str, float]:
        return {"encoded": self.encoded, "unreadable": self.unreadable, "decode_s": self.decode_s,
                "encode_s": self.encode_s}


# --- the level-1 index -----------------------------------------------------------------------------------

INDEX_KINDS = ("flat", "ivf", "hnsw")
# IVF: faiss wants >= 39 training points per list; sqrt(N)-ish lists is the usual trade-off (faiss's guidelines)
IVF_POINTS_PER_LIST = 39
# rows added to faiss per call: bounds the copy of features held in RAM beside the index while it is filled
ADD_CHUNK = 1 << 16


def default_nlist(size: int) -> int:
    """IVF lists for `size` vectors: about 4·√N, and few enough that each list has 39 training points."""
    return max(1, min(int(4 * np.sqrt(size)), size // IVF_POINTS_PER_LIST))


def build_faiss_index(store: FeatureStore, kind: str = "flat", nlist: Optional[int] = None, hnsw_m: int = 32,
                      seed: int = 0):
    """An inner-product faiss index over the usable features of `store`, their gallery indices as ids:
    `flat` (exact), `ivf` (IndexIVFFlat, `nlist` lists, trained on the features) or `hnsw` (IndexHNSWFlat,
    `hnsw_m` links per node)."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: choose from {', '.join(INDEX_KINDS)}")
    ids = np.flatnonzero(store.usable()).astype(np.int64)
    if not len(ids):
        raise ValueError("no gallery image could be embedded: nothing to index")
    dim = store.dim
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = nlist or default_nlist(len(ids))
        if nlist > len(ids):
            raise ValueError(f"--nlist {nlist} lists for {len(ids)} images: at most one list per image")
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on a seeded sample: faiss itself samples 256 points per list at most
        sample = np.random.default_rng(seed).permutation(ids)[:256 * nlist]
        base.cp.seed = seed
        base.train(np.ascontiguousarray(store.features[np.sort(sample)], dtype=np.float32))
    index = faiss.IndexIDMap2(base)
    for start in range(0, len(ids), ADD_CHUNK):
        chunk = ids[start:start + ADD_CHUNK]
        index.add_with_ids(np.ascontiguousarray(store.features[chunk], dtype=np.float32), chunk)
    return index


def set_search_parameters(index, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
    """IVF lists probed / HNSW beam width of a `build_faiss_index` index (ignored by the other kinds)."""
    import faiss

    base = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    if nprobe is not None and hasattr(base, "nprobe"):
        base.nprobe = int(nprobe)
    if ef_search is not None and hasattr(base, "hnsw"):
        base.hnsw.efSearch = int(ef_search)


# --- ranking ---------------------------------------------------------------------------------------------


def rank_candidates(query_features: torch.Tensor, gallery_features: torch.Tensor, candidates: torch.Tensor,
                    keep: int, usable: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (Q, keep) candidates with the highest float64 scores, best first (ties → lower gallery index),
    and those scores. A candidate −1 (an approximate index found fewer) or one `usable` marks False (an
    unreadable image) scores −inf and comes back as −1."""
    candidates, _ = candidates.sort(dim=1)  # the stable sort below then breaks ties by index
    valid = candidates >= 0
    safe = candidates.clamp_min(0)
    if usable is not None:
        valid &= usable[safe]
    rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, candidates.shape[1] * gallery_features.shape[1]))
    scores = torch.cat([
        torch.einsum("qd,qmd->qm", query_features[i:i + rows].double(), gallery_features[safe[i:i + rows]].double())
        for i in range(0, len(candidates), rows)])
    scores = scores.masked_fill(~valid, float("-inf"))
    best = torch.sort(scores, dim=1, descending=True, stable=True)
    kept = candidates.gather(1, best.indices[:, :keep])
    kept_scores = best.values[:, :keep]
    return kept.masked_fill(torch.isinf(kept_scores) & (kept_scores < 0), -1), kept_scores


class Cascade:
    """r-level cascade over one gallery. `levels[i]` is a `Level`, or an encoder (a batch of images →
    normalised features) with `images` giving its gallery (one tensor / image source for every level, or one
    per level); `ms[i]` is how many candidates level i+1 passes on (len(ms) == levels − 1). Levels given as the
    same encoder on the same images share one store, and so does one `Level` object used twice.

    `index`: a level-1 faiss index whose ids are gallery indices (`build_faiss_index`); built (exact) on first
    use when not given."""

    def __init__(self, levels: Sequence[Union[Level, Encode]], ms: Sequence[int],
                 images: Union[None, torch.Tensor, ImageSource, Sequence[Union[torch.Tensor, ImageSource]]] = None,
                 batch_size: int = 256, index=None):
        if len(ms) != len(levels) - 1:
            raise ValueError(f"{len(levels)} levels need {len(levels) - 1} candidate counts m, got {list(ms)}")
        if images is None or isinstance(images, (torch.Tensor, TensorImages, ImageFiles)):
            images = [images] * len(levels)
        made: Dict[Tuple[int, int], Level] = {}
        self.levels: List[Level] = []
        for level, level_images in zip(levels, images):
            if not isinstance(level, Level):
                if level_images is None:
                    raise ValueError("an encoder level needs its gallery images")
                key = (id(level), id(level_images))  # one encoder on the same images: one store
                if key not in made:
                    source = TensorImages(level_images) if torch.is_tensor(level_images) else level_images
                    made[key] = Level(level, source, batch_size=batch_size)
                level = made[key]
            self.levels.append(level)
        self.gallery_size = len(self.levels[0].images)
        if any(len(level.images) != self.gallery_size for level in self.levels):
            raise ValueError("every level must see the same gallery")
        self.ms = [min(int(m), self.gallery_size) for m in ms]
        if any(m < 1 for m in self.ms):
            raise ValueError(f"candidate counts must be positive, got {list(ms)}")
        self.index = index

    def build(self) -> None:
        """Level 1 embeds every image it has not stored yet; an exact inner-product index is built over them
        unless one was given."""
        self.levels[0].embed_all()
        if self.index is None:
            self.index = build_faiss_index(self.levels[0].store, "flat")

    @torch.no_grad()
    def search(self, query_features: torch.Tensor, k: int) -> torch.Tensor:
        """(Q, k) gallery indices, best first, for L2-normalised query features (Q, D); −1 pads a row when
        fewer than k images are usable."""
        return self.search_scored(query_features, k)[0]

    @torch.no_grad()
    def search_scored(self, query_features: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """`search`'s (Q, k) indices and the last level's float64 scores of them: what a recall that counts
        ties against the model (eval.metrics) needs, since the indices alone hide ties."""
        if self.index is None:
            self.build()
        k = min(k, self.gallery_size)
        query_features = query_features.float().cpu()
        first = self.levels[0].store
        keeps = self.ms + [k]  # how many candidates each level passes on; the last level gives the top-k
        usable = torch.from_numpy(first.usable())
        if keeps[0] >= int(usable.sum()):  # everything passes: no search needed
            candidates = torch.from_numpy(np.flatnonzero(first.usable())).expand(len(query_features), -1)
        else:
            _, found = self.index.search(np.ascontiguousarray(query_features.numpy()), keeps[0])
            candidates = torch.from_numpy(found).long()
        # level 1's own order only matters when it is the last level
        scores = torch.zeros(candidates.shape, dtype=torch.float64)
        for level_index in range(0 if len(self.levels) == 1 else 1, len(self.levels)):
            level = self.levels[level_index]
            level.ensure(candidates)
            keep = min(keeps[level_index], candidates.shape[1])
            if level.store.features is None:  # nothing this level was asked for could be read
                candidates = torch.full((len(candidates), keep), -1, dtype=torch.long)
                scores = torch.full(candidates.shape, float("-inf"), dtype=torch.float64)
                continue
            candidates, scores = rank_candidates(query_features, level.store.features_tensor(), candidates, keep,
                                                 torch.from_numpy(level.store.usable()))
        return candidates[:, :k], scores[:, :k]

    def unique_levels(self) -> List[Optional[Level]]:
        """`levels` with a shared level replaced by None after its first use."""
        seen, unique = set(), []
        for level in self.levels:
            unique.append(None if id(level) in seen else level)
            seen.add(id(level))
        return unique

    def images_encoded(self) -> List[int]:
        """Images each level embedded so far (shared stores count once, at their first level)."""
        return [level.encoded if level else 0 for level in self.unique_levels()]

    def image_seconds(self) -> float:
        """Wall time all levels spent decoding and embedding images so far."""
        return sum(level.seconds for level in self.unique_levels() if level)


# --- the on-disk index -----------------------------------------------------------------------------------

MANIFEST = "manifest.json"
GALLERY = "gallery.jsonl"
LEVEL1_INDEX = "level1.faiss"
FORMAT_VERSION = 1


@dataclass
class IndexOptions:
    """How the level-1 faiss index is built (`build_faiss_index`); recorded in the index's manifest."""

    kind: str = "flat"
    nlist: Optional[int] = None  # IVF lists (default: default_nlist)
    hnsw_m: int = 32  # HNSW links per node (faiss's usual default)
    seed: int = 0  # IVF k-means sample and seed

    def to_json(self) -> Dict[str, Any]:
        return {"kind": self.kind, "nlist": self.nlist, "hnsw_m": self.hnsw_m, "seed": self.seed}


def _write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class IndexMismatch(ValueError):
    """An index folder that was built for another gallery, other levels or another index kind."""


class SearchIndex:
    """A cascade index on disk:

        DIR/manifest.json       format, gallery size, levels (the caller's identity of each encoder: checkpoint
                                and its hash, …), which store each level uses, index options, build state
        DIR/gallery.jsonl       one JSON string per line: the image paths, in gallery order
        DIR/store{i}.f32/.state one FeatureStore per distinct level (a level listed twice shares one)
        DIR/level1.faiss        the level-1 index, once the build is complete

    `create` starts (or, for the same gallery, levels and options, resumes) a build; `open` reads a folder
    back. Every file is written atomically or guarded by the stores' state bytes, so a build killed at any
    point resumes with `create(...).build(...)`, embedding only what it had not stored."""

    def __init__(self, folder: Path, manifest: Dict[str, Any], paths: List[str]):
        self.folder = folder
        self.manifest = manifest
        self.paths = paths
        size = len(paths)
        self.stores = {name: FeatureStore(size, folder / name) for name in sorted(set(manifest["stores"]))}

    # --- creating and opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Union[str, Path], paths: Sequence[Union[str, Path]], levels: Sequence[Dict[str, Any]],
               options: IndexOptions = IndexOptions(), gallery_info: Optional[Dict[str, Any]] = None,
               overwrite: bool = False) -> "SearchIndex":
        """A new index folder, or the interrupted (or finished) build of the same gallery, levels and options.
        `levels`: one JSON-able identity per level, cheapest first (equal identities share a store)."""
        folder = Path(folder)
        paths = [str(p) for p in paths]
        if not paths:
            raise ValueError("the gallery has no images")
        store_of: Dict[str, str] = {}  # equal identities: one store
        for level in levels:
            store_of.setdefault(json.dumps(level, sort_keys=True), f"store{len(store_of) + 1}")
        stores = [store_of[json.dumps(level, sort_keys=True)] for level in levels]
        manifest = {"format": FORMAT_VERSION, "size": len(paths), "levels": list(levels), "stores": stores,
                    "index": options.to_json(), "gallery": gallery_info or {}, "complete": False}
        gallery_text = "".join(json.dumps(p) + "\n" for p in paths)
        if (folder / MANIFEST).exists() and not overwrite:
            existing = cls.open(folder, check_complete=False)
            ours = {key: manifest[key] for key in ("size", "levels", "stores", "index")}
            theirs = {key: existing.manifest.get(key) for key in ours}
            if ours != theirs or existing.paths != paths:
                differs = sorted(key for key in ours if ours[key] != theirs[key]) or ["gallery paths"]
                raise IndexMismatch(f"{folder} holds an index of another gallery or other levels ({', '.join(differs)}"
                                    " differ): choose another folder, or overwrite it")
            return existing
        if overwrite and folder.exists():
            for name in os.listdir(folder):
                if name in (MANIFEST, GALLERY, LEVEL1_INDEX) or name.startswith("store"):
                    os.remove(folder / name)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / GALLERY, gallery_text.encode("utf-8"))
        _write_json(folder / MANIFEST, manifest)  # last: a folder without it is not an index yet
        return cls(folder, manifest, paths)

    @classmethod
    def open(cls, folder: Union[str, Path], check_complete: bool = True) -> "SearchIndex":
        """Read an index folder back; with `check_complete`, refuse one whose build has not finished."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} is not a cascade index (no {MANIFEST})") from None
        except ValueError as error:
            raise ValueError(f"{folder / MANIFEST}: not valid JSON ({error})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder}: index format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
        paths = [json.loads(line) for line in (folder / GALLERY).read_text(encoding="utf-8").splitlines()]
        if len(paths) != manifest["size"]:
            raise ValueError(f"{folder / GALLERY} lists {len(paths)} images, the manifest {manifest['size']}")
        index = cls(folder, manifest, paths)
        if check_complete and not manifest.get("complete"):
            raise ValueError(f"{folder}: the index build has not finished ({index.level1_store.done()} of "
                             f"{len(paths)} images embedded): run the index command again to resume it")
        return index

    # --- what it holds ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def levels(self) -> List[Dict[str, Any]]:
        return self.manifest["levels"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def level1_store(self) -> FeatureStore:
        return self.stores[self.manifest["stores"][0]]

    def store_of(self, level: int) -> FeatureStore:
        """The feature store of a level (0-based); levels with the same identity share one."""
        return self.stores[self.manifest["stores"][level]]

    # --- building ----------------------------------------------------------------------------------

    def build(self, encode: Encode, preprocess: Callable, batch_size: int = 256, workers: int = 0,
              max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
              progress: Optional[Callable[[int], None]] = None) -> Level:
        """Stream the gallery through level 1 (`encode`, `preprocess`: its encoder and image transform),
        skipping what an earlier, interrupted build stored, then write the level-1 index. Returns the level
        (its counts say what this call embedded)."""
        level = Level(encode, ImageFiles(self.paths, preprocess, max_pixels, workers), self.level1_store, batch_size)
        level.embed_all(progress)
        options = IndexOptions(**self.manifest["index"])
        index = build_faiss_index(self.level1_store, options.kind, options.nlist, options.hnsw_m, options.seed)
        self._write_index(index)
        self.manifest = {**self.manifest, "complete": True,
                         "unreadable": int(np.count_nonzero(self.level1_store.state == UNREADABLE))}
        _write_json(self.folder / MANIFEST, self.manifest)
        return level

    def _write_index(self, index) -> None:
        import faiss

        # streamed through atomic_write: a full disk is one line, and the previous index stays whole
        atomic_write(self.folder / LEVEL1_INDEX, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))

    def read_index(self):
        """The level-1 faiss index, as written when the build completed."""
        import faiss

        return faiss.read_index(str(self.folder / LEVEL1_INDEX))

    # --- searching ---------------------------------------------------------------------------------

    def cascade(self, encoders: Sequence[Encode], preprocesses: Sequence[Callable], ms: Sequence[int],
                batch_size: int = 256, workers: int = 0, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> Cascade:
        """A `Cascade` over this index: `encoders[i]` / `preprocesses[i]` are level i's (the manifest's
        levels, in order); what the higher levels embed goes into their stores on disk, for later queries.
        Levels that share a store must get the same encoder."""
        if len(encoders) != len(self.levels) or len(preprocesses) != len(self.levels):
            raise ValueError(f"the index has {len(self.levels)} levels; got {len(encoders)} encoders")
        by_store: Dict[str, Level] = {}
        levels = []
        for store_name, encode, preprocess in zip(self.manifest["stores"], encoders, preprocesses):
            if store_name not in by_store:
                source = ImageFiles(self.paths, preprocess, max_pixels, workers)
                by_store[store_name] = Level(encode, source, self.stores[store_name], batch_size)
            levels.append(by_store[store_name])
        index = self.read_index()
        set_search_parameters(index, nprobe, ef_search)
        return Cascade(levels, ms, index=index)
