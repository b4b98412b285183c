"""Training data: one function (`get_data`) turns flags into a loader.

Sources: a CSV/TSV of image paths and captions (CC3M style), a UPop/BLIP annotation JSON with its image root
(`coco_karpathy_train.json`, training.data.annotation_dataset), webdataset shards, or synthetic data.
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

get_data assembles the parts below into a DataInfo: samples (checks and collation), csv_dataset (map-style
sources and their sampler), shards (the webdataset stages), memory (the /dev/shm check) and token_cache; the
CSV/TSV reader is foundation.tables.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

from compress.models.preprocess import split_preprocess
from foundation.errors import DataError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from training.data.annotation_dataset import AnnotationDataset
from training.data.csv_dataset import CsvDataset, ResumableDistributedSampler, SyntheticDataset, episode_indices
from training.data.loaders import run_loader
from training.data.memory import check_loader_shared_memory, loader_prefetch_factor
from training.data.reinforced import StoredViews
from training.data.samples import BatchCollator, image_collator, split_images
from training.data.shards import (
    DEFAULT_SHUFFLE_BUFFER,
    EpochQuota,
    EpochSeeded,
    EpochShards,
    LoaderPosition,
    SeededResampledShards,
    SeededShuffle,
    decode_shard_sample,
    drop_bad_samples,
    expand_urls,
    shard_samples,
    shard_sizes,
    stream_seed,
)
from training.data.token_cache import attach_token_cache


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
    if train_data.endswith(".json"):
        return "json"
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
    if dataset_type in ("csv", "json", "synthetic"):
        data = _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size)
        cache_dir = args.token_cache_dir or default_cache_dir
        if dataset_type in ("csv", "json") and tokenizer is not None and not args.no_token_cache and cache_dir:
            attach_token_cache(data.dataset, tokenizer, args.train_data, cache_dir, device, local_rank,
                               show_progress=rank == 0 and args.log_level != "warning")
        return data
    return _webdataset_data(args, transform, tokenizer, rank, world_size)


def _max_pixels(args) -> Optional[int]:
    # callers that build their own namespace (tests, tools) may leave the flag out: PIL's default then
    return getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)


def _map_style_data(args, dataset_type, transform, tokenizer, rank, world_size) -> DataInfo:
    if dataset_type in ("csv", "json"):
        if dataset_type == "json":
            dataset = AnnotationDataset(args.train_data, transform, getattr(args, "train_image_root", None),
                                        allow_empty_captions=args.allow_empty_captions, max_pixels=_max_pixels(args))
        else:
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
    split_images(dataset)
    loader = run_loader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=image_collator(dataset, tokenizer), drop_last=True,
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, generator=torch.Generator(),
                        prefetch_factor=loader_prefetch_factor(args) if args.workers > 0 else None)
    return DataInfo(loader, per_rank_batches, per_rank_batches * args.batch_size * world_size, sampler=sampler,
                    dataset=dataset, seed=args.seed, rank=rank)


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
        pipeline = [shards, shard_samples, shuffle]
    else:
        shards = EpochShards(urls, args.seed, rank, world_size, shuffle)  # shuffles each pass itself
        pipeline = [shards]
    seeded: List[EpochSeeded] = [shards, shuffle, quota]
    if isinstance(transform, StoredViews):  # a reinforced set: the stored view of the epoch, and its embeddings
        decode = transform.decoder(args.seed, rank, args.allow_empty_captions, max_pixels)
        seeded.append(decode)
        finish_images = None
    else:
        per_image, finish_images = split_preprocess(transform)
        decode = wds.map(lambda s: decode_shard_sample(s, per_image, args.allow_empty_captions, max_pixels))
    position = LoaderPosition(workers)
    for stage in seeded:  # one position for the whole pipeline, shared with the workers
        stage.position = position
    pipeline += [
        decode,
        drop_bad_samples,
        wds.batched(args.batch_size, collation_fn=BatchCollator(tokenizer, finish_images), partial=False),
        quota,
    ]
    dataset = wds.DataPipeline(*pipeline)
    loader = run_loader(dataset, wds.WebLoader, batch_size=None, shuffle=False, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=loader_prefetch_factor(args) if workers > 0 else None)
    return DataInfo(loader, num_batches, num_batches * global_batch, seeded_stages=seeded, seed=args.seed,
                    rank=rank, position=position)
