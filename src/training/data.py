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
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from foundation.errors import DataError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, open_rgb

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

    def episode_indices(self, epoch: int) -> Optional[torch.Tensor]:
        """Rows of `epoch`'s episode (all ranks), or None when epochs are full passes."""
        if self.sampler is None or not self.sampler.episode_size:
            return None
        return episode_indices(len(self.dataset), self.sampler.episode_size, self.sampler.seed, epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the data at `start_batch` of `epoch` (resume continues mid-epoch)."""
        self.start_batch = start_batch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_index=start_batch * self.loader.batch_size)
        if hasattr(self.loader, "generator") and self.loader.generator is not None:
            # worker seeds come from this generator, not the global RNG: resuming must not shift it
            self.loader.generator.manual_seed(epoch)

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
    if dataset_type in ("csv", "synthetic"):
        data = _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size)
        cache_dir = args.token_cache_dir or default_cache_dir
        if dataset_type == "csv" and tokenizer is not None and not args.no_token_cache and cache_dir:
            attach_token_cache(data.dataset, tokenizer, args.train_data, cache_dir, device, local_rank,
                               show_progress=rank == 0 and args.log_level != "warning")
        return data
    return _webdataset_data(args, transform, tokenizer, world_size)


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
                        persistent_workers=False, generator=torch.Generator(),
                        prefetch_factor=4 if args.workers > 0 else None)
    return DataInfo(loader, per_rank_batches, per_rank_batches * args.batch_size * world_size, sampler=sampler,
                    dataset=dataset)


def _webdataset_data(args, transform, tokenizer, world_size) -> DataInfo:
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

    if args.dataset_resampled:
        pipeline = [wds.ResampledShards(urls, seed=args.seed)]
    else:
        pipeline = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    pipeline += [
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000, initial=100),
        wds.map(lambda s: decode_shard_sample(s, transform, args.allow_empty_captions, max_pixels)),
        drop_bad_samples,
        wds.batched(args.batch_size, collation_fn=BatchCollator(tokenizer), partial=False),
    ]
    dataset = wds.DataPipeline(*pipeline)
    global_batch = args.batch_size * world_size
    num_batches = max(1, num_samples // global_batch)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                           persistent_workers=False)
    return DataInfo(loader, num_batches, num_batches * global_batch)


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
