"""The same command with the same --seed writes the same weights, shards and --dataset-resampled included."""
from __future__ import annotations

import types

import pytest
import torch
from conftest import run_trainer

from training.data import get_data


def shard_args(corpus, **extra):
    args = dict(train_data=str(corpus / "shards" / "{000000..000003}.tar"), dataset_type="auto",
                dataset_resampled=True, train_num_samples=128, batch_size=16, workers=0, seed=7,
                allow_empty_captions=False, max_image_pixels=None)
    args.update(extra)
    return types.SimpleNamespace(**args)


def sample_order(corpus, epoch, **extra):
    data = get_data(shard_args(corpus, **extra), transform=lambda image: torch.zeros(1), tokenizer=None,
                    rank=0, world_size=1)
    data.set_epoch(epoch)
    return [caption for batch in data.batches() for caption in batch["caption"]]


def test_resampled_shard_order_is_a_function_of_seed_and_epoch(tiny_corpus):
    first = sample_order(tiny_corpus, epoch=0)
    assert len(first) == 128
    assert sample_order(tiny_corpus, epoch=0) == first  # a second process-independent draw: identical
    assert sample_order(tiny_corpus, epoch=1) != first  # each epoch draws anew
    assert sample_order(tiny_corpus, epoch=0, seed=8) != first
    # without resampling the shard list is fixed, but the sample shuffle is seeded the same way
    plain = sample_order(tiny_corpus, epoch=0, dataset_resampled=False)
    assert sample_order(tiny_corpus, epoch=0, dataset_resampled=False) == plain


@pytest.mark.slow
def test_demo_prune_command_twice_writes_identical_weights(tiny_corpus, tmp_path):
    """The demo's prune command (shards, --dataset-resampled, a loader worker, --KD) on tiny sizes, run twice."""
    def run(name):
        run_trainer(["--job", "prune", "--KD", "--p", "0.5", "--model", "clipc-vit-t2-32",
                     "--train-data", str(tiny_corpus / "shards" / "{000000..000003}.tar"), "--dataset-resampled",
                     "--train-num-samples", "96", "--batch-size", "16", "--workers", "1", "--epochs", "2",
                     "--search-epochs", "1", "--search-interval", "2", "--lr", "2e-4", "--warmup", "2",
                     "--seed", "3", "--logs", str(tmp_path), "--name", name, "--log-level", "warning",
                     "--report-to", "none"], timeout=300)
        return torch.load(tmp_path / name / "checkpoints" / "epoch_2.pt", weights_only=True)

    first, second = run("a"), run("b")
    assert first["model_spec"] == second["model_spec"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key
