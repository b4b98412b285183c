"""Training data: one function (`get_data`) turns flags into a loader.

Sources: a CSV/TSV of image paths and captions (CC3M style), webdataset shards, or synthetic data.
Every sample is a dict `{"index": row index, "image": tensor, "text": tokens, "caption": str}`; the row
index lets episodic jobs and teacher caches key their per-sample state.

Bad samples (missing/0-byte/truncated/non-image files, empty or non-UTF-8 captions) never crash a run:
 * TSV: the dataset substitutes the next good row and reports what it skipped, so every batch keeps its
   size — distributed feature gathering needs equal batches on every rank;
 * shards: bad samples are dropped before batching.
Each batch carries `skipped` (count) and `skipped_reasons`; the trainer logs them, writes
`data/skipped` to tensorboard, and stops past `--max-bad-fraction`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from foundation.errors import DataError

Image.MAX_IMAGE_PIXELS = None  # CC3M has a few huge images; decoding them is fine, a warning per image is not

# How many following rows a TSV sample may try before giving up: a run of more bad rows than this
# means the data is broken, not noisy.
MAX_CONSECUTIVE_BAD = 64


class BadSample(Exception):
    pass


def load_image(source: str | bytes, what: Callable[[], str]) -> Image.Image:
    """Decode fully (PIL is lazy; a truncated JPEG only fails on load) or raise BadSample.
    `what()` names the sample; it is only built for the error message."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise BadSample(f"{what()}: empty image bytes")
            img = Image.open(io.BytesIO(source))
        else:
            img = Image.open(source)
        img.load()
        # convert() copies even when the mode is already RGB
        return img if img.mode == "RGB" else img.convert("RGB")
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample(f"{what()}: missing file")
    except Exception as e:
        # the stat only on failure: a good sample should not pay a syscall for a clearer message
        if not isinstance(source, (bytes, bytearray)) and os.path.exists(source) and os.path.getsize(source) == 0:
            raise BadSample(f"{what()}: 0-byte file")
        raise BadSample(f"{what()}: unreadable image ({type(e).__name__}: {e})")


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


class CsvDataset(Dataset):
    """Rows of (image path, caption); relative paths are resolved against the file's folder."""

    def __init__(self, path: str, transform: Callable, img_key: str = "filepath",
                 caption_key: str = "title", sep: str = "\t", allow_empty_captions: bool = False):
        import pandas as pd

        if not os.path.isfile(path):
            raise DataError(f"--train-data {path} does not exist")
        try:
            # surrogateescape keeps invalid UTF-8 bytes visible (check_caption rejects them) instead of
            # failing the whole file or silently replacing characters
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                                encoding_errors="surrogateescape", quoting=3)
        except Exception as e:
            raise DataError(f"cannot read {path} as a table with separator {sep!r}: {e}")
        missing = [k for k in (img_key, caption_key) if k not in frame.columns]
        if missing:
            raise DataError(
                f"{path}: no column(s) {', '.join(repr(m) for m in missing)}; columns found: "
                f"{', '.join(repr(c) for c in frame.columns)} (set --csv-img-key/--csv-caption-key, "
                f"and --csv-separator if there is only one column)"
            )
        if len(frame) == 0:
            raise DataError(f"{path} has no rows")
        root = os.path.dirname(os.path.abspath(path))
        self.paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in frame[img_key].tolist()]
        self.captions = frame[caption_key].tolist()
        self.transform = transform
        self.allow_empty_captions = allow_empty_captions
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
        what = lambda: f"row {index} ({self.paths[index]})"  # noqa: E731 (built only for an error)
        caption = check_caption(self.captions[index], what, self.allow_empty_captions)
        image = load_image(self.paths[index], what)
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


def decode_shard_sample(sample: Dict[str, Any], transform: Callable, allow_empty_captions: bool = False) -> Dict[str, Any]:
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
        image = load_image(image_bytes, what)
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

    key = cache_key(identity, data_path, len(dataset))
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


def _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size) -> DataInfo:
    if dataset_type == "csv":
        dataset = CsvDataset(args.train_data, transform, img_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, sep=args.csv_separator,
                             allow_empty_captions=args.allow_empty_captions)
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
        wds.map(lambda s: decode_shard_sample(s, transform, args.allow_empty_captions)),
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
