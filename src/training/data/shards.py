"""The webdataset shard pipeline: shard lists and sizes, sample decoding, and the stages whose randomness
is seeded from (--seed, epoch, rank, worker), so the same command draws the same shards and sample order
and a resumed epoch trains on exactly the batches the interrupted one had not reached. get_data
(training.data) assembles these stages into the loader."""
from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import tarfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch

from foundation.errors import DataError, UserError
from foundation.files import open_regular, read_json
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from training.data.samples import MAX_CAPTION_BYTES, BadSample, check_caption, load_image

# samples in the shard shuffle buffer (--shuffle-buffer): open_clip's 1000 mixes only the neighbours of a
# few shards; 5000 raw (still encoded) samples of ~50-100 KB cost 0.25-0.5 GB of RAM per worker
DEFAULT_SHUFFLE_BUFFER = 5000
# ... and at most this many bytes of them: a shard of large members fills the buffer by size, not count
SHUFFLE_BUFFER_BYTES = 1 << 30

# The members a sample is made of (decode_shard_sample); a shard's other members are passed over unread.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
TEXT_MEMBERS = ("txt", "idx")
# A reinforced set's arrays (training.data.reinforced): each view's crop and the teacher's embeddings, at most
# 256 views of a 16384-wide float32 embedding plus the .npy header
ARRAY_MEMBERS = ("views.npy", "image_emb.npy", "text_emb.npy")
MAX_ARRAY_MEMBER_BYTES = (16 << 20) + 4096
# Largest member read into memory: an image file this big is far past any training resolution (a
# 9459x9459 JPEG, the default pixel limit, is ~10-40 MB); a caption's limit is samples.MAX_CAPTION_BYTES.
# A larger member is skipped, never read (its bytes are streamed past), and its sample counted as bad.
MAX_IMAGE_MEMBER_BYTES = 64 << 20
# Largest tar header record (a pax header or a GNU long name), which tarfile reads whole before the member
# it describes; real ones are a few hundred bytes.
MAX_TAR_HEADER_BYTES = 1 << 20
SIZES_FILE_BYTES = 64 << 20  # sizes.json: a few dozen bytes per shard


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
    try:
        sizes = read_json(sizes_file, SIZES_FILE_BYTES, "sizes.json")
        return sum(int(sizes[os.path.basename(u)]) for u in urls)
    except KeyError:
        return None
    except (UserError, ValueError, TypeError) as e:
        raise DataError(f"{e if isinstance(e, UserError) else f'{sizes_file}: {type(e).__name__}: {e}'}; fix or "
                        f"remove it, or pass --train-num-samples") from None


class MemberTooLarge:
    """Stands in a sample for a member that was not read because of its size."""

    def __init__(self, name: str, size: int, limit: int):
        self.name, self.size, self.limit = name, size, limit

    def __len__(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"member {self.name} is {self.size:,} bytes, over the limit of {self.limit:,}"


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extension records (pax headers, GNU long names) tarfile would read whole into
    memory, refused past MAX_TAR_HEADER_BYTES: the rest of that shard is then unreadable."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"a tar header record of {self.size:,} bytes (over "
                                                f"{MAX_TAR_HEADER_BYTES:,})")
        return super()._proc_member(tar)


def _member_limit(suffix: str) -> Optional[int]:
    if suffix in IMAGE_MEMBERS:
        return MAX_IMAGE_MEMBER_BYTES
    if suffix in TEXT_MEMBERS:
        return MAX_CAPTION_BYTES
    if suffix in ARRAY_MEMBERS:
        return MAX_ARRAY_MEMBER_BYTES
    return None  # not used: never read


def _open_shard(url: str):
    if "://" in url or url.startswith("pipe:"):
        from webdataset import gopen

        return gopen.gopen(url)
    return open_regular(url)  # a FIFO or a device named like a shard is refused, never waited on


def _split_name(name: str):
    """(sample key, member suffix) of a tar member name, webdataset's rule: the key is everything before
    the first dot of the last path component."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def shard_samples(sources: Iterable[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """The samples of each shard `{"url": ...}` in `sources`, webdataset's layout (members grouped by key,
    `__key__` and `__url__` added). Only regular members whose suffix a sample uses are read, each only if its
    size is within its bound; a larger one is a `MemberTooLarge` in its sample (decode_shard_sample makes
    that sample a counted bad one). Memory: one sample's members, each bounded. A shard that cannot be opened
    or read is logged and the next one read, as webdataset's warn_and_continue does."""
    for source in sources:
        url = source["url"]
        try:
            stream = _open_shard(url)
        except Exception as e:  # noqa: BLE001 (a shard that cannot be read is logged and left out)
            logging.warning("shard %s cannot be read, skipped: %s", url, e)
            continue
        try:
            yield from _tar_samples(url, stream)
        except Exception as e:  # noqa: BLE001 (tarfile, zlib, lzma, bz2 errors: as warn_and_continue)
            logging.warning("shard %s cannot be read further, the rest skipped: %s: %s", url, type(e).__name__, e)
        finally:
            stream.close()


def _tar_samples(url: str, stream) -> Iterator[Dict[str, Any]]:
    sample: Optional[Dict[str, Any]] = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo)
        for info in tar:
            tar.members = []  # a stream's headers are not kept
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                continue
            key, suffix = _split_name(info.name)
            if key is None or os.path.basename(key).startswith("__"):  # webdataset's meta members
                continue
            suffix = suffix.lower()
            limit = _member_limit(suffix)
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if limit is None or suffix in sample:  # unused, or a duplicate: the first one stays
                continue
            if info.size > limit:
                sample[suffix] = MemberTooLarge(info.name, info.size, limit)
            else:
                sample[suffix] = tar.extractfile(info).read()
    except GeneratorExit:  # closed by its reader: nothing more is yielded (yielding now would be an error)
        raise
    except Exception:  # the shard breaks off: the sample read so far first, as webdataset's grouping yields it
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample


def decode_shard_sample(sample: Dict[str, Any], transform: Callable, allow_empty_captions: bool = False,
                        max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Dict[str, Any]:
    what = lambda: f"shard sample {sample.get('__key__')} ({sample.get('__url__')})"  # noqa: E731
    try:
        refused = next((v for v in sample.values() if isinstance(v, MemberTooLarge)), None)
        if refused is not None:
            raise BadSample(f"{what()}: {refused}")
        image_bytes = next((sample[k] for k in IMAGE_MEMBERS if k in sample), None)
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
        return {"index": _sample_index(sample, what), "image": transform(image), "caption": caption,
                "skipped_reasons": []}
    except BadSample as e:
        return {"bad": str(e)}


# digits of a sample index: far more rows than any corpus, far fewer than Python's int() limit
_INDEX_DIGITS = 18


def _sample_index(sample: Dict[str, Any], what: Callable[[], str]) -> int:
    """The sample's row index: its `idx` member, else a key of digits, else -1."""
    if "idx" in sample:
        text = sample["idx"].decode("ascii", errors="replace").strip()
        if not (text.isdigit() and text.isascii() and len(text) <= _INDEX_DIGITS):
            raise BadSample(f"{what()}: idx member is not a row number")
        return int(text)
    key = str(sample["__key__"])
    return int(key) if key.isdigit() and key.isascii() and len(key) <= _INDEX_DIGITS else -1


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
        epoch = self.epoch
        for pass_index in itertools.count():
            mine, produced = self.shards(epoch, pass_index), 0
            rng = None if pass_index == 0 else random.Random(
                stream_seed(self.seed, f"{self.shuffle.stream}/{pass_index}", epoch, self.rank, self.position.worker()))
            for sample in self.shuffle(shard_samples({"url": url} for url in mine), rng):
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
    """Buffer shuffle of samples (webdataset's `shuffle(bufsize, initial)` semantics) with a seeded RNG. The
    buffer also holds at most `max_bytes` of sample bytes: past that it gives out a sample before taking the
    next, so a shard of large members fills it by size (the same data always shuffles the same way)."""

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int, max_bytes: int = SHUFFLE_BUFFER_BYTES):
        super().__init__(seed, rank, "sample-shuffle")
        self.bufsize, self.initial, self.max_bytes = bufsize, initial, max_bytes

    def __call__(self, samples, rng: Optional[random.Random] = None):
        rng, buf, source = rng or self.rng(), [], iter(samples)
        held = 0

        def pick():
            nonlocal held
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            sample = buf.pop()
            held -= _sample_bytes(sample)
            return sample

        for sample in source:
            buf.append(sample)
            held += _sample_bytes(sample)
            if len(buf) < self.bufsize and held < self.max_bytes:  # two in, one out until the buffer is full
                extra = next(source, None)
                if extra is not None:
                    buf.append(extra)
                    held += _sample_bytes(extra)
            if len(buf) >= self.initial or held >= self.max_bytes:
                yield pick()
            while held > self.max_bytes and len(buf) > 1:
                yield pick()
        while buf:
            yield pick()


def _sample_bytes(sample: Dict[str, Any]) -> int:
    return sum(len(value) for value in sample.values() if isinstance(value, (bytes, bytearray)))


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
