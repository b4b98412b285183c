"""Map-style sources, read by row index: a CSV/TSV of image paths and captions (CsvDataset), synthetic
data, and the sampler that resumes part-way through an epoch and walks episodes (ResumableDistributedSampler,
episode_indices). The webdataset shards stream instead (training.data.shards)."""
from __future__ import annotations

import io
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from foundation.errors import DataError
from foundation.files import open_regular
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from foundation.tables import table_records, uses_quotes
from training.data.samples import MAX_CONSECUTIVE_BAD, BadSample, check_caption, load_image


class CsvDataset(Dataset):
    """Rows of (image path, caption); relative paths are resolved against the file's folder.

    Row i is the i-th data row of the file (empty lines left out). A malformed row (wrong field count,
    unparsable quoting) keeps its index, so every other row keeps its own (token and teacher caches key
    on it); loading it raises BadSample naming its line, like a bad image. See table_records for how
    `quoting` ("auto", "csv", "none"; see uses_quotes) reads the file."""

    def __init__(self, path: str, transform: Callable, img_key: str = "filepath",
                 caption_key: str = "title", sep: str = "\t", allow_empty_captions: bool = False,
                 max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, quoting: str = "auto"):
        self.source = path
        self.paths: List[str] = []
        self.captions: List[str] = []
        self.malformed: Dict[int, Tuple[int, str]] = {}  # row -> (line number, what is wrong)
        root = os.path.dirname(os.path.abspath(path))
        try:
            # surrogateescape keeps invalid UTF-8 bytes visible (check_caption rejects them) instead of
            # failing the whole file or silently replacing characters; utf-8-sig drops a BOM
            # a regular file only: a FIFO would block the run here for ever
            with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", errors="surrogateescape",
                                  newline="") as f:
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
        except FileNotFoundError:
            raise DataError(f"--train-data {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read --train-data {path}: {e}") from None
        if not self.paths:
            raise DataError(f"{path} has no rows")
        if self.malformed:
            first_line, first_problem = next(iter(self.malformed.values()))
            if len(self.malformed) == len(self.paths):
                raise DataError(f"{path}: no row can be read (line {first_line}: {first_problem}); is "
                                f"--csv-separator {sep!r} right?")
            logging.warning("%s: %d malformed row(s) of %d are skipped as bad samples (first: line %d, %s)",
                            path, len(self.malformed), len(self.paths), first_line, first_problem)
        self._init_loading(transform, allow_empty_captions, max_pixels)

    def _init_loading(self, transform: Callable, allow_empty_captions: bool, max_pixels: Optional[int]) -> None:
        """How rows are loaded, once `source`, `paths`, `captions` and `malformed` are read (a subclass reads
        another file format into the same rows)."""
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
            # a plain ndarray over the mapped file: indexing an np.memmap builds a memmap object per row, which
            # made stacking a batch's rows cost ~90 us
            self._tokens = np.load(self.token_cache_path, mmap_mode="r").view(np.ndarray)
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
        """Row `index`, or when it is bad the next good row in its place, with the reason `index` is bad. Only
        the row asked for is reported: the sampler asks for each row once an epoch, so each bad row is counted
        once an epoch, not again whenever a bad row before it searches past it."""
        reasons = []
        for offset in range(MAX_CONSECUTIVE_BAD):
            row = (index + offset) % len(self)
            try:
                sample = self.load_row(row)
                sample["skipped_reasons"] = reasons
                return sample
            except BadSample as e:
                if offset == 0:
                    reasons.append(str(e))
                last = str(e)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive bad rows from row {index}; last: {last}")


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
