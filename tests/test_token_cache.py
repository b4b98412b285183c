"""The TSV loader's token cache: the ids it serves are exactly the tokenizer's, bad rows stay skipped and
counted, the cache is reused only for the same data and tokenizer, and an unfinished build is redone."""
import json

import numpy as np
import pytest
import torch
from conftest import loader_args
from test_trainer import _write_bad_tsv

from compress.models.registry import get_preprocess, get_tokenizer, open_clip_spec
from foundation.model_configs import register_model_configs
from training.data import get_data


@pytest.fixture(scope="module")
def spec():
    register_model_configs()
    return open_clip_spec("clipc-vit-t2-32")


def epoch_batches(args, spec, tokenizer=None):
    data = get_data(args, get_preprocess(spec), tokenizer or get_tokenizer(spec), rank=0, world_size=1)
    data.set_epoch(0)
    return list(data.loader)


def test_cached_tokens_are_the_tokenizers_and_bad_rows_are_still_skipped(tiny_corpus, tmp_path, spec):
    n_bad = _write_bad_tsv(tiny_corpus, tmp_path / "data")
    tsv, tokenizer = tmp_path / "data" / "bad.tsv", get_tokenizer(spec)
    cached = epoch_batches(loader_args(tsv, tmp_path / "cache"), spec)  # 2 workers read the memmap
    fresh = epoch_batches(loader_args(tsv, tmp_path / "cache", no_token_cache=True), spec)

    assert len(list((tmp_path / "cache").glob("tokens_*.npy"))) == 1
    for batch, reference in zip(cached, fresh):
        assert batch["text"].dtype == torch.long
        torch.testing.assert_close(batch["text"], tokenizer(batch["caption"]), rtol=0, atol=0)
        torch.testing.assert_close(batch["text"], reference["text"], rtol=0, atol=0)
        assert batch["caption"] == reference["caption"]
    assert sum(b["skipped"] for b in cached) == sum(b["skipped"] for b in fresh) == n_bad


def test_cache_is_reused_only_for_the_same_data_and_tokenizer(tiny_corpus, tmp_path, spec):
    cache = tmp_path / "cache"
    tsv = tmp_path / "train.tsv"
    tsv.write_text((tiny_corpus / "train.tsv").read_text().replace("images/", str(tiny_corpus / "images") + "/"))
    epoch_batches(loader_args(tsv, cache, workers=0), spec)
    (first,) = cache.glob("tokens_*.npy")
    built_at = first.stat().st_mtime_ns

    epoch_batches(loader_args(tsv, cache, workers=0), spec)  # same data, same tokenizer: reused as is
    assert list(cache.glob("tokens_*.npy")) == [first] and first.stat().st_mtime_ns == built_at

    base = get_tokenizer(spec)

    def tokenizer_64(texts):  # another context length: another cache
        return base(texts, context_length=64)

    batches = epoch_batches(loader_args(tsv, cache, workers=0), spec, tokenizer=tokenizer_64)
    assert batches[0]["text"].shape[1] == 64
    assert len(list(cache.glob("tokens_*.npy"))) == 2

    with open(tsv, "a") as f:  # changed data: another cache
        f.write(tsv.read_text().splitlines()[1] + "\n")
    epoch_batches(loader_args(tsv, cache, workers=0), spec)
    assert len(list(cache.glob("tokens_*.npy"))) == 3


def test_an_unfinished_build_is_redone_not_read(tiny_corpus, tmp_path, spec):
    cache = tmp_path / "cache"
    tsv = tiny_corpus / "train.tsv"
    epoch_batches(loader_args(tsv, cache, workers=0), spec)
    (array,) = cache.glob("tokens_*.npy")
    marker = array.with_suffix(".json")
    assert json.loads(marker.read_text())["rows"] == 256
    # a build killed before its marker: the array may hold anything
    marker.unlink()
    garbage = np.lib.format.open_memmap(array, mode="r+")
    garbage[:] = 7
    garbage.flush()
    del garbage
    tokenizer = get_tokenizer(spec)
    for batch in epoch_batches(loader_args(tsv, cache, workers=0), spec):
        torch.testing.assert_close(batch["text"], tokenizer(batch["caption"]), rtol=0, atol=0)
    assert marker.exists()


@pytest.mark.slow
def test_a_full_disk_during_the_build_is_one_line_and_leaves_nothing(tiny_corpus, tmp_path, small_disk):
    """The cache (256 rows x 16 tokens x 4 bytes) does not fit in the 8 KiB left. Writing through a memory map,
    the trainer died of SIGBUS (exit 135, no message) and left the partial file; now its size is reserved
    first: exit 2, one line, nothing left, the run's lock free."""
    from conftest import run_bounded

    from foundation.locks import RunLock

    args = ["-m", "training.main", "--train-data", tiny_corpus / "train.tsv", "--model", "clipc-vit-t2-32",
            "--logs-root", tmp_path / "logs", "--name", "full", "--batch-size", "16", "--workers", "0",
            "--epochs", "1", "--token-cache-dir", small_disk]
    (small_disk / "filler").write_bytes(bytes(56 << 10))
    result = run_bounded(args, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "cannot write the caption tokens cache" in errors[0] and "No space left on device" in errors[0]
    assert [p.name for p in small_disk.iterdir()] == ["filler"]  # no partial file, no completion mark
    RunLock(tmp_path / "logs" / "full" / "trainer.lock", "trainer").acquire().release()  # the lock is free
