"""The webdataset shard pipeline: shard lists and sizes, sample decoding, and the stages whose randomness
is seeded from (--seed, epoch, rank, worker), so the same command draws the same shards and sample order
and a resumed epoch trains on exactly the batches the interrupted one had not reached. get_data
(training.data) assembles these stages into the loader."""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from foundation.errors import DataError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from training.data.samples import BadSample, check_caption, load_image

# samples in the shard shuffle buffer (--shuffle-buffer): open_clip's 1000 mixes only the neighbours of a
# few shards; 5000 raw (still encoded) samples of ~50-100 KB cost 0.25-0.5 GB of RAM per worker
DEFAULT_SHUFFLE_BUFFER = 5000


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
