"""Loaders at scale: per-rank worker seeds, per-epoch shard order, shard resume without replay, start checks."""
from types import SimpleNamespace

import pytest
import torch
from torchvision import transforms as T

from foundation.errors import DataError
from training.data import get_data
from training.data.memory import check_shared_memory, shared_memory_needed
from training.data.shards import EpochShards, LoaderPosition

# random enough that two streams drawing the same crop of the same picture would be a coincidence
AUGMENT = T.Compose([T.RandomResizedCrop(24, scale=(0.2, 1.0)), T.ToTensor()])


def loader_args(train_data, **overrides):
    base = dict(train_data=str(train_data), dataset_type="auto", csv_separator="\t", csv_img_key="filepath",
                csv_caption_key="title", dataset_size=None, episode_size=0, train_num_samples=None,
                dataset_resampled=False, allow_empty_captions=False, token_cache_dir=None, no_token_cache=True,
                workers=1, batch_size=16, seed=5, log_level="warning", shuffle_buffer=64, prefetch_factor=2)
    base.update(overrides)
    return SimpleNamespace(**base)


def first_batch(args, rank, world_size, epoch=0):
    data = get_data(args, AUGMENT, None, rank=rank, world_size=world_size)
    data.set_epoch(epoch)
    return next(iter(data.batches()))


def test_each_rank_draws_its_own_augmentation(tiny_corpus, tmp_path):
    # every row is the same picture: only the augmentation tells two ranks' batches apart
    lines = (tiny_corpus / "train.tsv").read_text().splitlines()
    image, caption = lines[1].split("\t")[:2]
    table = tmp_path / "same.tsv"
    table.write_text("filepath\ttitle\n" + "".join(f"{tiny_corpus / image}\t{caption}\n" for _ in range(64)))
    args = loader_args(table)
    rank0, rank1 = first_batch(args, 0, 2)["image"], first_batch(args, 1, 2)["image"]
    assert not torch.equal(rank0, rank1)
    assert torch.equal(first_batch(args, 0, 2)["image"], rank0)  # still a pure function of (seed, epoch, rank)
    assert not torch.equal(first_batch(args, 0, 2, epoch=1)["image"], rank0)


def test_shard_order_is_new_each_epoch_and_the_same_for_the_same_seed():
    urls = [f"shard-{i:03d}.tar" for i in range(40)]

    def shards(seed, epoch, rank=0, world_size=1):
        stage = EpochShards(urls, seed, rank, world_size, shuffle=None)
        stage.position = LoaderPosition(1)
        return stage.shards(epoch, 0)

    assert shards(0, 0) != shards(0, 1)
    assert shards(0, 0) == shards(0, 0) and shards(0, 0) != shards(1, 0)
    assert sorted(shards(0, 3)) == sorted(urls)
    # dealt out by rank: two ranks read disjoint shards that together are the whole list
    rank0, rank1 = shards(0, 2, 0, 2), shards(0, 2, 1, 2)
    assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == sorted(urls)


def epoch_batches(data, epoch, start_batch=0):
    data.set_epoch(epoch, start_batch)
    return [(batch["index"].tolist(), batch["image"]) for batch in data.batches()]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_shard_epoch_trains_on_exactly_the_batches_not_yet_seen(tiny_corpus, workers):
    pattern = str(tiny_corpus / "shards" / "{000000..000003}.tar")
    args = loader_args(pattern, workers=workers, train_num_samples=256)
    data = get_data(args, AUGMENT, None, rank=0, world_size=1)
    straight = epoch_batches(data, 0)
    seen = [i for indices, _ in straight for i in indices]
    assert len(straight) == 256 // 16 and len(seen) == len(set(seen)) == 256  # the epoch is every sample once
    # the same (persistent) workers read the next epoch's position: new shard and sample order, same samples
    next_epoch = [i for indices, _ in epoch_batches(data, 1) for i in indices]
    assert next_epoch != seen and sorted(next_epoch) == sorted(seen)

    killed_at = 5
    resumed = epoch_batches(get_data(args, AUGMENT, None, rank=0, world_size=1), 0, killed_at)
    assert [indices for indices, _ in resumed] == [indices for indices, _ in straight[killed_at:]]
    before = [i for indices, _ in straight[:killed_at] for i in indices]
    after = [i for indices, _ in resumed for i in indices]
    assert sorted(before + after) == sorted(seen) and not set(before) & set(after)
    if workers:  # the workers' augmentation streams are seeded by (seed, epoch, rank, worker part)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, straight[killed_at:]))


def test_too_few_shards_for_the_workers_and_ranks_is_one_clear_error(tiny_corpus):
    pattern = str(tiny_corpus / "shards" / "{000000..000003}.tar")
    with pytest.raises(DataError, match=r"4 shard\(s\) for 2 loader worker\(s\) x 4 process\(es\)"):
        get_data(loader_args(pattern, workers=2, train_num_samples=256), AUGMENT, None, rank=0, world_size=4)
    # drawn with replacement, any worker can read any shard
    get_data(loader_args(pattern, workers=2, train_num_samples=256, dataset_resampled=True), AUGMENT, None,
             rank=0, world_size=4)


def test_shared_memory_check_refuses_what_dev_shm_cannot_hold():
    image = 3 * 224 * 224 * 4  # one float32 224 px image
    needed = shared_memory_needed(image, batch_size=128, workers=8, prefetch_factor=4, local_processes=1)
    assert needed == image * 128 * 8 * 4
    with pytest.raises(DataError, match="--prefetch-factor or --workers"):
        check_shared_memory(needed, free=64 * 2**20)
    check_shared_memory(needed, free=needed)
