"""Training data: one function (`get_data`) turns flags into a loader.

Sources: a CSV/TSV of image paths and captions (CC3M style), webdataset shards, or synthetic data.
Every sample is a dict `{"index": row index, "image": tensor, "text": tokens, "caption": str}`; the row
index lets episodic jobs and teacher caches key their per-sample state.

Bad samples (missing/0-byte/truncated/non-image files, images over `--max-image-pixels`, malformed
TSV/CSV rows, empty or non-UTF-8 captions) never crash a run:
 * TSV: the dataset substitutes the next good row and reports what it skipped, so every batch keeps its
   size — distributed feature gathering needs equal batches on every rank;
 * shards: bad samples are dropped before batching.
Each batch carries `skipped` (count) and `skipped_reasons`; the trainer logs them, writes
`data/skipped` to tensorboard, and stops past `--max-bad-fraction`. Each reason names its kind ("missing
file", "image too large", "malformed row", ...). Images are decoded by `foundation.images.open_rgb`, the
rules eval and the compression tools use too.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from foundation.errors import DataError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, open_rgb
from training.preemption import loader_worker_init

# How many following rows a TSV sample may try before giving up: a run of more bad rows than this
# means the data is broken, not noisy.
MAX_CONSECUTIVE_BAD = 64


class BadSample(Exception):
    pass


def load_image(source: str | bytes, what: Callable[[], str],
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The decoded RGB image (`open_rgb`'s rules: too large is refused before decoding) or BadSample.
    `what()` names the sample; it is only built for the error message."""
    try:
        return open_rgb(source, max_pixels)
    except ImageError as e:
        hint = "; --max-image-pixels sets the limit" if isinstance(e, ImageTooLarge) else ""
        raise BadSample(f"{what()}: {e.why}{hint}") from None


def check_caption(caption: Any, what: Callable[[], str], allow_empty: bool = False) -> str:
    if not isinstance(caption, str):
        raise BadSample(f"{what()}: caption is not text")
    try:
        caption.encode("utf-8")  # surrogate escapes from invalid UTF-8 bytes fail here
    except UnicodeEncodeError:
        raise BadSample(f"{what()}: caption is not valid UTF-8")
    if not caption.strip() and not allow_empty:
        raise BadSample(f"{what()}: empty caption")
    return caption


# --- CSV / TSV --------------------------------------------------------------------------------------

# A quoted CSV field may hold newlines (a caption of several lines); a record spanning more lines than
# this is taken for an unterminated quote, which would otherwise swallow the rows after it.
MAX_RECORD_LINES = 16

# (line number, fields or None, what is wrong or ""): one record of a table, see table_records
Record = Tuple[int, Optional[List[str]], str]


def uses_quotes(sep: str, quoting: str = "auto") -> bool:
    """Whether fields may be quoted: "csv" yes, "none" no, "auto": yes unless tab-separated (CC3M-style
    TSVs carry captions with unbalanced quotes; a tab inside a TSV field is not allowed instead)."""
    if quoting not in ("auto", "csv", "none"):
        raise DataError(f"--csv-quoting {quoting!r}: one of auto, csv, none")
    return quoting == "csv" or (quoting == "auto" and sep != "\t")


def table_records(lines: Iterable[str], sep: str, quoted: bool) -> Iterator[Record]:
    """The records of a table, header first, empty lines left out. A row whose field count differs from
    the header's, or that cannot be parsed, comes as (its first line, None, why): it is skipped without
    shifting any other row's columns. `lines`: the file's physical lines, line ends kept (newline="").

    Quoted: standard CSV (RFC 4180 / Excel: a field in double quotes may hold the separator, newlines,
    and "" for a quote). Not quoted: every line is one row split at `sep`, quotes are plain characters."""
    if not quoted:
        yield from _plain_records(lines, sep)
        return
    if len(sep) != 1:
        raise DataError(f"a quoted CSV needs a one-character separator, not {sep!r} (or --csv-quoting none)")
    source = _Lines(lines)
    reader = csv.reader(source, delimiter=sep, quotechar='"', doublequote=True, strict=True)
    width, number = None, 1  # number: the line the next record starts on
    while True:
        source.taken = []
        try:
            fields, problem = next(reader), ""
        except StopIteration:
            return
        except (csv.Error, _RecordTooLong) as error:
            fields, problem = None, f"cannot be parsed as CSV ({error})"
        taken = len(source.taken)
        if fields == []:  # an empty line
            number += 1
            continue
        if fields is not None and width is not None and len(fields) != width:
            fields, problem = None, (f"{len(fields)} fields where the header has {width} (a separator "
                                     f"inside a field that is not quoted?)")
        if fields is None and taken > 1:
            # blame the first line only and read again from the next: an unterminated quote there must
            # not take the rows after it along
            source.give_back(source.taken[1:])
            taken = 1
        if fields is not None and width is None:
            width = len(fields)
        yield number, fields, problem
        number += taken


def _plain_records(lines: Iterable[str], sep: str) -> Iterator[Record]:
    width = None
    for number, line in enumerate(lines, 1):
        text = line.rstrip("\r\n")
        if not text:  # an empty line is no row (as pandas read them before); "\t" is a row, a bad one
            continue
        fields = text.split(sep)
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            hint = " (a tab inside a field? TSV fields are not quoted)" if sep == "\t" else ""
            yield number, None, f"{len(fields)} fields where the header has {width}{hint}"
            continue
        yield number, fields, ""


class _RecordTooLong(Exception):
    def __str__(self) -> str:
        return f"a quoted field runs over more than {MAX_RECORD_LINES} lines: an unterminated quote?"


class _Lines:
    """An iterator over lines that remembers what the current record took and can be given lines back,
    so that the CSV reader can read them again after a bad record."""

    def __init__(self, lines: Iterable[str]):
        self._lines, self._back, self.taken = iter(lines), [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if len(self.taken) == MAX_RECORD_LINES:
            raise _RecordTooLong()
        line = self._back.pop() if self._back else next(self._lines)
        self.taken.append(line)
        return line

    def give_back(self, lines: List[str]) -> None:
        self._back.extend(reversed(lines))


class CsvDataset(Dataset):
    """Rows of (image path, caption); relative paths are resolved against the file's folder.

    Row i is the i-th data row of the file (empty lines left out). A malformed row (wrong field count,
    unparsable quoting) keeps its index, so every other row keeps its own (token and teacher caches key
    on it); loading it raises BadSample naming its line, like a bad image. See table_records for how
    `quoting` ("auto", "csv", "none"; see uses_quotes) reads the file."""

    def __init__(self, path: str, transform: Callable, img_key: str = "filepath",
                 caption_key: str = "title", sep: str = "\t", allow_empty_captions: bool = False,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, quoting: str = "auto"):
        if not os.path.isfile(path):
            raise DataError(f"--train-data {path} does not exist")
        self.source = path
        self.paths: List[str] = []
        self.captions: List[str] = []
        self.malformed: Dict[int, Tuple[int, str]] = {}  # row -> (line number, what is wrong)
        root = os.path.dirname(os.path.abspath(path))
        try:
            # surrogateescape keeps invalid UTF-8 bytes visible (check_caption rejects them) instead of
            # failing the whole file or silently replacing characters; utf-8-sig drops a BOM
            with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
                records = table_records(f, sep, uses_quotes(sep, quoting))
                header = next(records, None)
                if header is None:
                    raise DataError(f"{path} is empty")
                if header[1] is None:
                    raise DataError(f"{path}: the header (line {header[0]}) {header[2]}")
                columns = header[1]
                missing = [k for k in (img_key, caption_key) if k not in columns]
                if missing:
                    raise DataError(
                        f"{path}: no column(s) {', '.join(repr(m) for m in missing)}; columns found: "
                        f"{', '.join(repr(c) for c in columns)} (set --csv-img-key/--csv-caption-key, "
                        f"and --csv-separator if there is only one column)"
                    )
                img_column, caption_column = columns.index(img_key), columns.index(caption_key)
                for number, fields, problem in records:
                    if fields is None:
                        # placeholders: the caption "" is what the token cache tokenizes for a bad row
                        self.malformed[len(self.paths)] = (number, problem)
                        self.paths.append("")
                        self.captions.append("")
                        continue
                    image = fields[img_column]
                    self.paths.append(image if os.path.isabs(image) else os.path.join(root, image))
                    self.captions.append(fields[caption_column])
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}")
        if not self.paths:
            raise DataError(f"{path} has no rows")
        if self.malformed:
            first_line, first_problem = next(iter(self.malformed.values()))
            if len(self.malformed) == len(self.paths):
                raise DataError(f"{path}: no row can be read (line {first_line}: {first_problem}); is "
                                f"--csv-separator {sep!r} right?")
            logging.warning("%s: %d malformed row(s) of %d are skipped as bad samples (first: line %d, %s)",
                            path, len(self.malformed), len(self.paths), first_line, first_problem)
        self.transform = transform
        self.allow_empty_captions = allow_empty_captions
        self.max_pixels = max_pixels
        self.token_cache_path: Optional[str] = None  # set by use_token_cache
        self._tokens: Optional[np.ndarray] = None

    def use_token_cache(self, path: str) -> None:
        """Read each row's token ids from this (rows, context) .npy instead of tokenizing in the batch."""
        self.token_cache_path, self._tokens = path, None

    def __getstate__(self):
        # a memmap pickles as a full in-memory copy: worker processes reopen the file instead
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def row_tokens(self, index: int) -> np.ndarray:
        """The row's int32 token ids (a numpy row: the collator stacks a batch into one tensor)."""
        if self._tokens is None:
            self._tokens = np.load(self.token_cache_path, mmap_mode="r")
        return self._tokens[index]

    def __len__(self) -> int:
        return len(self.paths)

    def load_row(self, index: int) -> Dict[str, Any]:
        if index in self.malformed:
            line, problem = self.malformed[index]
            raise BadSample(f"row {index} (line {line} of {self.source}): malformed row: {problem}")
        what = lambda: f"row {index} ({self.paths[index]})"  # noqa: E731 (built only for an error)
        caption = check_caption(self.captions[index], what, self.allow_empty_captions)
        image = load_image(self.paths[index], what, self.max_pixels)
        sample = {"index": index, "image": self.transform(image), "caption": caption}
        if self.token_cache_path is not None:
            sample["text"] = self.row_tokens(index)
        return sample

    def __getitem__(self, index: int) -> Dict[str, Any]:
        reasons = []
        for offset in range(MAX_CONSECUTIVE_BAD):
            row = (index + offset) % len(self)
            try:
                sample = self.load_row(row)
                sample["skipped_reasons"] = reasons
                return sample
            except BadSample as e:
                reasons.append(str(e))
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive bad rows from row {index}; last: {reasons[-1]}")


def episode_indices(dataset_size: int, episode_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The rows an episode visits: `episode_size` draws with replacement (ProtoCLIP), a pure function
    of (seed, epoch) — every rank computes the same mapping and a resume recomputes it exactly."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randint(dataset_size, (episode_size,), generator=generator)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way (a resume continues the same data order) and
    that can walk an episode (`episode_size` rows drawn with replacement) instead of the whole set."""

    def __init__(self, dataset, *args, episode_size: int = 0, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.start_index = 0
        self.episode_size = episode_size
        if episode_size:
            self.num_samples = episode_size // self.num_replicas  # drop_last: equal shares
            self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        if self.episode_size:
            indices = episode_indices(len(self.dataset), self.episode_size, self.seed, self.epoch).tolist()
            indices = indices[: self.total_size][self.rank: self.total_size: self.num_replicas]
        else:
            indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


# --- webdataset shards -------------------------------------------------------------------------------


def expand_urls(pattern: str) -> List[str]:
    """`a/{000..009}.tar::b/{0..3}.tar` → list of shard urls (brace expansion, `::` separated lists)."""
    import braceexpand

    urls = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def shard_sizes(urls: List[str]) -> Optional[int]:
    """Total samples from a `sizes.json` beside the shards (open_clip's format), if there is one."""
    sizes_file = os.path.join(os.path.dirname(urls[0]), "sizes.json")
    if not os.path.exists(sizes_file):
        return None
    sizes = json.load(open(sizes_file))
    try:
        return sum(int(sizes[os.path.basename(u)]) for u in urls)
    except KeyError:
        return None


def decode_shard_sample(sample: Dict[str, Any], transform: Callable, allow_empty_captions: bool = False,
                        max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Dict[str, Any]:
    what = lambda: f"shard sample {sample.get('__key__')} ({sample.get('__url__')})"  # noqa: E731
    try:
        image_bytes = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if image_bytes is None:
            raise BadSample(f"{what()}: no image member")
        if "txt" not in sample and not allow_empty_captions:
            raise BadSample(f"{what()}: no txt member")
        try:
            caption = sample.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample(f"{what()}: caption is not valid UTF-8")
        caption = check_caption(caption, what, allow_empty_captions)
        image = load_image(image_bytes, what, max_pixels)
        if "idx" in sample:
            index = int(sample["idx"].decode())
        else:
            index = int(sample["__key__"]) if str(sample["__key__"]).isdigit() else -1
        return {"index": index, "image": transform(image), "caption": caption, "skipped_reasons": []}
    except BadSample as e:
        return {"bad": str(e)}


# --- synthetic ---------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """Random images and captions, deterministic per index: for throughput tests and smoke runs."""

    def __init__(self, size: int, image_size: int, transform: Callable):
        self.size, self.image_size, self.transform = size, image_size, transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        caption = f"synthetic picture number {index}"
        return {"index": index, "image": self.transform(Image.fromarray(pixels)), "caption": caption,
                "skipped_reasons": []}


# --- batching ----------------------------------------------------------------------------------------


class BatchCollator:
    """Samples -> one batch. Token ids come from the samples when a token cache supplied them, else all
    the batch's captions are tokenized in one tokenizer call (in the loader worker): one (B, context)
    tensor instead of B small ones to build, pickle and stack (bench_loader TSV 0.68 -> 0.80 of plain
    decode+transform). Without a tokenizer the batch has no `text` (jobs whose teacher reads captions)."""

    def __init__(self, tokenizer: Optional[Callable] = None):
        self.tokenizer = tokenizer

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        bad = [s["bad"] for s in samples if "bad" in s]
        good = [s for s in samples if "bad" not in s]
        reasons = bad + [r for s in good for r in s.get("skipped_reasons", [])]
        captions = [s["caption"] for s in good]
        batch = {
            "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "image": torch.stack([s["image"] for s in good]) if good else torch.empty(0),
            "caption": captions,
            "skipped": len(reasons),
            "skipped_reasons": reasons,
        }
        if good and "text" in good[0]:
            batch["text"] = torch.from_numpy(np.stack([s["text"] for s in good]).astype(np.int64))
        elif self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long)
        return batch


@dataclass
class DataInfo:
    """A loader plus what the trainer needs to position itself in it."""

    loader: Any
    num_batches: int  # per rank, per epoch
    num_samples: int  # per epoch, all ranks
    sampler: Optional[ResumableDistributedSampler] = None
    start_batch: int = 0
    dataset: Any = None  # map-style sources: row access for jobs (captions of a teacher cache, episodes)
    seeded_stages: List[Any] = field(default_factory=list)  # shard-pipeline stages seeded per epoch
    seed: int = 0  # --seed: with the epoch and the rank, what the loader workers' seeds derive from
    rank: int = 0
    position: Optional["LoaderPosition"] = None  # shards: epoch and resume batch, shared with the workers

    def episode_indices(self, epoch: int) -> Optional[torch.Tensor]:
        """Rows of `epoch`'s episode (all ranks), or None when epochs are full passes."""
        if self.sampler is None or not self.sampler.episode_size:
            return None
        return episode_indices(len(self.dataset), self.sampler.episode_size, self.sampler.seed, epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the data at `start_batch` of `epoch` (resume continues mid-epoch)."""
        self.start_batch = start_batch
        if self.position is not None:  # before the stages' epoch: it sets which worker plays which part
            self.position.start_batch = start_batch
        for stage in self.seeded_stages:
            stage.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_index=start_batch * self.loader.batch_size)
        if hasattr(self.loader, "generator") and self.loader.generator is not None:
            # worker seeds come from this generator, not the global RNG: resuming must not shift it. The
            # DataLoader adds the worker id to the base seed it draws here, so (seed, epoch, rank) gives
            # every worker of every rank its own augmentation stream (the epoch alone gave all ranks one)
            self.loader.generator.manual_seed(stream_seed(self.seed, "loader-workers", epoch, self.rank, 0))

    def batches(self):
        """Yield exactly `num_batches - start_batch` batches (streams are cycled, so ranks never drift
        apart and leave a collective waiting)."""
        remaining = self.num_batches - self.start_batch
        while remaining > 0:
            produced = 0
            for batch in self.loader:
                yield batch
                produced += 1
                remaining -= 1
                if remaining == 0:
                    return
            if produced == 0:
                raise DataError("the training data yielded no batch (all shards empty or all samples bad?)")


def infer_dataset_type(train_data: str) -> str:
    if train_data == "synthetic":
        return "synthetic"
    if train_data.endswith((".csv", ".tsv")):
        return "csv"
    if ".tar" in train_data or "{" in train_data or "::" in train_data:
        return "webdataset"
    raise DataError(f"cannot tell the type of --train-data {train_data}; pass --dataset-type csv or webdataset")


def get_data(args, transform: Callable, tokenizer: Optional[Callable], rank: int, world_size: int,
             device: torch.device = torch.device("cpu"), local_rank: int = 0,
             default_cache_dir: Optional[str] = None) -> DataInfo:
    """The training loader. Collective for a TSV/CSV with a tokenizer (the token cache is built by all
    ranks together, in `args.token_cache_dir` or `default_cache_dir`), unless `args.no_token_cache`."""
    dataset_type = args.dataset_type if args.dataset_type != "auto" else infer_dataset_type(args.train_data)
    check_loader_shared_memory(args, transform)
    if dataset_type in ("csv", "synthetic"):
        data = _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size)
        cache_dir = args.token_cache_dir or default_cache_dir
        if dataset_type == "csv" and tokenizer is not None and not args.no_token_cache and cache_dir:
            attach_token_cache(data.dataset, tokenizer, args.train_data, cache_dir, device, local_rank,
                               show_progress=rank == 0 and args.log_level != "warning")
        return data
    return _webdataset_data(args, transform, tokenizer, rank, world_size)


def tokenizer_identity(tokenizer: Callable) -> Dict[str, Any]:
    """What determines a tokenizer's output, for the cache key: its class, context length, and a hash of
    what it makes of probe texts that exercise case, accents, HTML entities, digits, emoji and
    truncation (a different vocabulary or cleaning changes the hash)."""
    probe = ["A photo of a Cat.", "Ünïcödé &amp; <b>tags</b> 1234 'quotes' — 😀", "many words " * 60]
    tokens = tokenizer(probe)
    return {"tokenizer": type(tokenizer).__name__, "context_length": int(tokens.shape[1]),
            "probe_sha1": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()}


def attach_token_cache(dataset: "CsvDataset", tokenizer: Callable, data_path: str, cache_dir: str,
                       device: torch.device, local_rank: int, show_progress: bool) -> None:
    """Tokenize every caption once (ranks share the work) into an int32 memmap the workers read by row.

    A frozen tokenizer gives the same ids every epoch; tokenizing in the workers every time cost a
    fifth of the loader's throughput (open_clip's tokenizer runs ftfy and BPE in Python)."""
    from training.row_cache import cache_key, load_or_build_row_cache

    identity = tokenizer_identity(tokenizer)

    def tokenize_valid(captions: List[str]) -> torch.Tensor:
        # rows whose caption is bad are skipped by load_row before their tokens are read
        return tokenizer([c if _is_valid_caption(c) else "" for c in captions])

    # the reader is part of the key: before table_records, a TSV whose first row had an extra field was
    # read with every column shifted, and a cache built from that must not be served for the right rows
    key = cache_key({**identity, "reader": "table_records"}, data_path, len(dataset))
    tokens = load_or_build_row_cache(tokenize_valid, dataset.captions, identity["context_length"], cache_dir, key,
                                     batch_size=1024, device=device, show_progress=show_progress,
                                     local_rank=local_rank, kind="tokens", dtype=torch.int32)
    dataset.use_token_cache(tokens.filename)


def _is_valid_caption(caption: Any) -> bool:
    try:
        check_caption(caption, lambda: "caption", allow_empty=True)
        return True
    except BadSample:
        return False


# samples in the shard shuffle buffer (--shuffle-buffer): open_clip's 1000 mixes only the neighbours of a
# few shards; 5000 raw (still encoded) samples of ~50-100 KB cost 0.25-0.5 GB of RAM per worker
DEFAULT_SHUFFLE_BUFFER = 5000
# batches each loader worker holds ready (--prefetch-factor); the tensors sit in /dev/shm until collected
DEFAULT_PREFETCH_FACTOR = 2
SHARED_MEMORY = "/dev/shm"


def _prefetch_factor(args) -> int:
    return getattr(args, "prefetch_factor", DEFAULT_PREFETCH_FACTOR)


def shared_memory_needed(sample_bytes: int, batch_size: int, workers: int, prefetch_factor: int,
                         local_processes: int = 1) -> int:
    """Bytes of /dev/shm the loaders of one machine hold at once: each worker of each local process keeps
    `prefetch_factor` batches (its image tensors) in shared memory until the trainer collects them."""
    return sample_bytes * batch_size * workers * prefetch_factor * local_processes


def check_shared_memory(needed: int, free: int) -> None:
    """Refuse at start what would otherwise kill a worker mid-epoch with a bus error."""
    if needed > free:
        raise DataError(
            f"the loader workers need about {needed / 2**30:.2f} GiB of {SHARED_MEMORY} (batch x workers x "
            f"--prefetch-factor x processes on this machine, images as float32) but {free / 2**30:.2f} GiB is "
            f"free: lower --prefetch-factor or --workers, or give the container more (docker --shm-size)")


def check_loader_shared_memory(args, transform: Callable) -> None:
    """`check_shared_memory` for this run's loader, when it has workers and the machine a /dev/shm."""
    if args.workers <= 0 or not os.path.isdir(SHARED_MEMORY):
        return
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):  # a random crop here must not move the run's streams
        probe = transform(Image.new("RGB", (256, 256)))  # the real transform: its output size and dtype
    random.setstate(python_state)
    sample_bytes = probe.numel() * probe.element_size() if isinstance(probe, torch.Tensor) else 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = shared_memory_needed(sample_bytes, args.batch_size, args.workers, _prefetch_factor(args),
                                  local_processes)
    check_shared_memory(needed, shutil.disk_usage(SHARED_MEMORY).free)


def _max_pixels(args) -> Optional[int]:
    # callers that build their own namespace (tests, tools) may leave the flag out: PIL's default then
    return getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)


def _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size) -> DataInfo:
    if dataset_type == "csv":
        dataset = CsvDataset(args.train_data, transform, img_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, sep=args.csv_separator,
                             allow_empty_captions=args.allow_empty_captions, max_pixels=_max_pixels(args),
                             quoting=getattr(args, "csv_quoting", "auto"))
        if args.dataset_size:
            if args.dataset_size > len(dataset):
                raise DataError(f"--dataset-size {args.dataset_size} but {args.train_data} has {len(dataset)} rows")
            dataset.paths, dataset.captions = dataset.paths[: args.dataset_size], dataset.captions[: args.dataset_size]
    else:
        dataset = SyntheticDataset(args.train_num_samples or 1024, 64, transform)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=args.seed, drop_last=True, episode_size=args.episode_size)
    per_rank_batches = sampler.num_samples // args.batch_size
    if per_rank_batches == 0:
        raise DataError(f"{len(dataset)} samples give no full batch of {args.batch_size} on {world_size} process(es)")
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=BatchCollator(tokenizer), drop_last=True, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, generator=torch.Generator(), worker_init_fn=loader_worker_init,
                        prefetch_factor=_prefetch_factor(args) if args.workers > 0 else None)
    return DataInfo(loader, per_rank_batches, per_rank_batches * args.batch_size * world_size, sampler=sampler,
                    dataset=dataset, seed=args.seed, rank=rank)


def stream_seed(seed: int, stream: str, epoch: int, rank: int, worker: int) -> int:
    """The seed of one random stream of the shard pipeline: a pure function of --seed, the stream's name,
    the epoch, the rank and the loader worker, so the same command draws the same shards and sample order
    (webdataset's own stages otherwise mix in the process id, the clock and os.urandom)."""
    tag = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")
    return int(np.random.SeedSequence([seed, tag, epoch, rank, worker]).generate_state(1)[0])


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class LoaderPosition:
    """The epoch and the resume batch of a rank's shard stream, in shared memory: the loader workers are
    persistent (not forked again every epoch), so they read each epoch's position from here, where a copy
    of the stage would keep the first epoch's."""

    def __init__(self, workers: int):
        self._epoch = multiprocessing.Value("q", 0)
        self._start_batch = multiprocessing.Value("q", 0)
        self.workers = max(1, workers)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    @property
    def start_batch(self) -> int:
        return self._start_batch.value

    @start_batch.setter
    def start_batch(self, value: int) -> None:
        self._start_batch.value = value

    def worker(self) -> int:
        """The part this loader worker plays: batch b of the epoch is worker (b % workers)'s. The DataLoader's
        round robin always begins at worker 0, so after a resume at batch s worker p plays part
        (p + s) % workers: batch s comes first, then s + 1, ..., in the uninterrupted run's order."""
        return (_worker_id() + self.start_batch) % self.workers


class EpochSeeded:
    """A pipeline stage whose randomness is seeded by `stream_seed`; `DataInfo.set_epoch` sets `epoch`
    (in the `LoaderPosition` the stages of one pipeline share, which persistent workers read)."""

    def __init__(self, seed: int, rank: int, stream: str):
        self.seed, self.rank, self.stream = seed, rank, stream
        self.position = LoaderPosition(1)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.position.epoch = value

    def rng(self) -> random.Random:
        return random.Random(stream_seed(self.seed, self.stream, self.epoch, self.rank, self.position.worker()))


class EpochShards(EpochSeeded, torch.utils.data.IterableDataset):
    """The samples of this rank's and worker's shards, in a new shard order every epoch: the list is shuffled
    with a seed of (--seed, epoch, pass), the same on every rank, then dealt out rank by rank and worker by
    worker, so each pass reads every shard once. A worker goes round its shards (a new order each pass) for
    as long as `EpochQuota` downstream takes batches: every worker yields its whole share of the epoch, and
    no rank runs dry before another. Samples are shuffled (`shuffle`) within a pass, whose end empties the
    buffer: a pass delivers each of its samples once before the next pass begins."""

    def __init__(self, urls: List[str], seed: int, rank: int, world_size: int, shuffle: "SeededShuffle"):
        super().__init__(seed, rank, "shard-order")
        self.urls, self.world_size, self.shuffle = list(urls), world_size, shuffle

    def shards(self, epoch: int, pass_index: int) -> List[str]:
        order = list(self.urls)
        random.Random(stream_seed(self.seed, f"{self.stream}/{pass_index}", epoch, 0, 0)).shuffle(order)
        return order[self.rank:: self.world_size][self.position.worker():: self.position.workers]

    def __iter__(self):
        import webdataset as wds

        expand = wds.tarfile_to_samples(handler=wds.warn_and_continue)
        epoch = self.epoch
        for pass_index in itertools.count():
            mine, produced = self.shards(epoch, pass_index), 0
            rng = None if pass_index == 0 else random.Random(
                stream_seed(self.seed, f"{self.shuffle.stream}/{pass_index}", epoch, self.rank, self.position.worker()))
            for sample in self.shuffle(expand(iter([{"url": url} for url in mine])), rng):
                produced += 1
                yield sample
            if not produced:  # going round again would wait forever
                raise DataError(f"rank {self.rank}'s shards {', '.join(mine[:3])}{' ...' if len(mine) > 3 else ''} "
                                f"hold no readable sample")


class EpochQuota(EpochSeeded):
    """The last stage: this worker's share of the rank's `num_batches` (batch b is worker b % workers's), less
    the batches it gave before the resume batch, which are built again but dropped, so a resumed epoch trains
    on exactly the batches the interrupted one had not reached.

    The image augmentation draws from the process's torch/numpy/random streams. In a loader worker they are
    seeded here from (--seed, epoch, rank, worker part) before the first sample is read, so a resumed (or
    next) epoch draws what the uninterrupted run drew. Without workers they are the trainer's own, which a
    resume restores to where the checkpoint left them: the dropped batches' draws are given back."""

    def __init__(self, num_batches: int, seed: int, rank: int):
        super().__init__(seed, rank, "augment")
        self.num_batches = num_batches

    def __call__(self, batches):
        part, workers, start = self.position.worker(), self.position.workers, self.position.start_batch
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker:
            augment_seed = stream_seed(self.seed, self.stream, self.epoch, self.rank, part)
            torch.manual_seed(augment_seed)
            np.random.seed(augment_seed % 2**32)
            random.seed(augment_seed)
        quota, skip = len(range(part, self.num_batches, workers)), len(range(part, start, workers))
        saved = None if in_worker or not skip else (torch.get_rng_state(), np.random.get_state(), random.getstate())
        for produced, batch in enumerate(itertools.islice(batches, quota)):
            if produced < skip:  # trained on (and its bad samples counted) before the interruption
                continue
            if saved is not None:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])
                saved = None
            yield batch


class SeededResampledShards(EpochSeeded, torch.utils.data.IterableDataset):
    """Shards drawn with replacement, forever (`--dataset-resampled`): every rank and worker its own
    deterministic sequence, a new one each epoch."""

    def __init__(self, urls: List[str], seed: int, rank: int):
        super().__init__(seed, rank, "resampled-shards")
        self.urls = list(urls)

    def __iter__(self):
        rng = self.rng()
        while True:
            yield {"url": rng.choice(self.urls)}


class SeededShuffle(EpochSeeded):
    """Buffer shuffle of samples (webdataset's `shuffle(bufsize, initial)` semantics) with a seeded RNG."""

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int):
        super().__init__(seed, rank, "sample-shuffle")
        self.bufsize, self.initial = bufsize, initial

    def __call__(self, samples, rng: Optional[random.Random] = None):
        rng, buf, source = rng or self.rng(), [], iter(samples)

        def pick():
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            return buf.pop()

        for sample in source:
            buf.append(sample)
            if len(buf) < self.bufsize:  # two in, one out until the buffer is full
                extra = next(source, None)
                if extra is not None:
                    buf.append(extra)
            if len(buf) >= self.initial:
                yield pick()
        while buf:
            yield pick()


def _webdataset_data(args, transform, tokenizer, rank, world_size) -> DataInfo:
    import webdataset as wds

    max_pixels = _max_pixels(args)
    urls = expand_urls(args.train_data)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if local and len(missing) == len(local):
        raise DataError(f"--train-data {args.train_data}: no shard matches (first tried: {missing[0]})")
    if missing:
        logging.warning("%d of %d shards do not exist and are skipped (first: %s)", len(missing), len(urls), missing[0])
        urls = [u for u in urls if u not in missing]
    num_samples = args.train_num_samples or shard_sizes(urls)
    if not num_samples:
        raise DataError("webdataset shards need --train-num-samples (no sizes.json beside the shards)")

    workers = args.workers
    if not args.dataset_resampled and len(urls) < max(1, workers) * world_size:
        # dealt out rank by rank and worker by worker, a worker without a shard would end its rank's stream
        # (and that rank would leave the others waiting in a collective)
        raise DataError(f"{len(urls)} shard(s) for {max(1, workers)} loader worker(s) x {world_size} process(es): "
                        f"every worker of every rank needs at least one shard; lower --workers, split the data "
                        f"into more shards, or sample shards with replacement (--dataset-resampled)")
    global_batch = args.batch_size * world_size
    num_batches = max(1, num_samples // global_batch)
    buffer = getattr(args, "shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)
    shuffle = SeededShuffle(buffer, max(1, buffer // 10), args.seed, rank)
    quota = EpochQuota(num_batches, args.seed, rank)
    if args.dataset_resampled:
        shards = SeededResampledShards(urls, args.seed, rank)
        pipeline = [shards, wds.tarfile_to_samples(handler=wds.warn_and_continue), shuffle]
    else:
        shards = EpochShards(urls, args.seed, rank, world_size, shuffle)  # shuffles each pass itself
        pipeline = [shards]
    seeded: List[EpochSeeded] = [shards, shuffle, quota]
    position = LoaderPosition(workers)
    for stage in seeded:  # one position for the whole pipeline, shared with the workers
        stage.position = position
    pipeline += [
        wds.map(lambda s: decode_shard_sample(s, transform, args.allow_empty_captions, max_pixels)),
        drop_bad_samples,
        wds.batched(args.batch_size, collation_fn=BatchCollator(tokenizer), partial=False),
        quota,
    ]
    dataset = wds.DataPipeline(*pipeline)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                           worker_init_fn=loader_worker_init,
                           prefetch_factor=_prefetch_factor(args) if workers > 0 else None)
    return DataInfo(loader, num_batches, num_batches * global_batch, seeded_stages=seeded, seed=args.seed,
                    rank=rank, position=position)


def drop_bad_samples(samples):
    """Leave bad shard samples out before batching (so batches stay full) but carry their reasons on
    the next good sample, so they are still counted."""
    pending = []
    for sample in samples:
        if "bad" in sample:
            pending.append(sample["bad"])
            continue
        sample["skipped_reasons"] = pending
        pending = []
        yield sample
