"""Loader throughput: our TSV and webdataset loaders against plain PIL decode + the same transform.

All read the same files with the same transform, batch size and number of worker processes, measured
side by side in one run (alternated, best of `--repeats`). Each rate is an epoch's steady state, from its
first batch to its last; the time to the first batch (forking the workers included) is printed beside it.
Ours also validates every sample and delivers
token ids; the plain baseline only decodes and transforms (a second baseline adds the same tokenizer, to
show what that costs). Our TSV loader reads its tokens from the token cache (built once per corpus and
tokenizer; its build time is printed separately) and is also shown without it (`--no-token-cache`);
shards always tokenize in the workers. The shard loader is compared both with the plain decode of the
JPEG files and, like for like, with a plain read of the same tar shards (Python's tarfile, as webdataset
uses) + PIL decode + transform.

    python scripts/bench_loader.py --corpus DIR [--samples 4096] [--workers 2] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import atexit
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
TSV_TARGET, SHARDS_TARGET = 0.95, 0.90  # issue 26

from compress.models.registry import get_preprocess, get_tokenizer, open_clip_spec  # noqa: E402
from training.data import get_data  # noqa: E402


class PlainDataset(Dataset):
    def __init__(self, paths, captions, transform, tokenizer=None):
        self.paths, self.captions, self.transform, self.tokenizer = paths, captions, transform, tokenizer

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = self.transform(Image.open(self.paths[i]).convert("RGB"))
        if self.tokenizer is None:
            return image
        return image, self.tokenizer([self.captions[i]])[0]


class PlainTarImages(IterableDataset):
    """Each worker streams its share of the shards with tarfile and decodes every jpg member."""

    def __init__(self, shards, transform):
        self.shards, self.transform = shards, transform

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        for shard in mine:
            with tarfile.open(shard, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        data = tar.extractfile(member).read()
                        yield self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


def rate(loader, n_batches: int, batch_size: int):
    """(seconds to the first batch, samples/s from the first batch to the last): the start (forking the
    workers, their first batch) once per epoch, and the throughput of the epoch's steady state."""
    start = time.perf_counter()
    seen = 0
    for _ in loader:
        seen += 1
        if seen == 1:
            first = time.perf_counter()
        if seen == n_batches:
            break
    return first - start, (seen - 1) * batch_size / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--model", default="clipc-vit-t2-64")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    corpus = Path(args.corpus)
    spec = open_clip_spec(args.model)
    from foundation.model_configs import register_model_configs

    register_model_configs()
    transform, tokenizer = get_preprocess(spec), get_tokenizer(spec)
    lines = (corpus / "train.tsv").read_text().splitlines()[1: args.samples + 1]
    paths = [str(corpus / line.split("\t")[0]) for line in lines]
    captions = [line.split("\t")[1] for line in lines]
    n_batches = args.samples // args.batch_size

    def loader_args(**overrides):
        base = dict(train_data=str(corpus / "train.tsv"), dataset_type="auto", csv_separator="\t",
                    csv_img_key="filepath", csv_caption_key="title", dataset_size=args.samples,
                    episode_size=0, train_num_samples=args.samples, dataset_resampled=False,
                    allow_empty_captions=False, token_cache_dir=cache_dir, no_token_cache=False,
                    workers=args.workers, batch_size=args.batch_size, seed=0, log_level="warning")
        base.update(overrides)
        return SimpleNamespace(**base)

    def ours_tsv(**overrides):
        data = get_data(loader_args(**overrides), transform, tokenizer, rank=0, world_size=1)
        data.set_epoch(0)
        return data.loader

    shard_count = max(1, args.samples // 1000)

    def ours_shards():
        pattern = str(corpus / "shards" / f"{{000000..{shard_count - 1:06d}}}.tar")
        data = get_data(loader_args(train_data=pattern, train_num_samples=shard_count * 1000), transform,
                        tokenizer, rank=0, world_size=1)
        return data.loader

    def plain(tokenize):
        dataset = PlainDataset(paths, captions, transform, tokenizer if tokenize else None)
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                          drop_last=True)

    cache_dir = tempfile.mkdtemp(prefix="bench_loader_tokens_")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)  # the token cache is this run's only
    start = time.perf_counter()
    ours_tsv()  # builds the token cache; every later get_data reuses it
    cache_seconds = time.perf_counter() - start
    contenders = {
        "plain PIL decode + transform": lambda: plain(False),
        "plain + tokenizer": lambda: plain(True),
        "ours, TSV": ours_tsv,
        "ours, TSV, --no-token-cache": lambda: ours_tsv(no_token_cache=True),
        "plain tar read + decode + transform": lambda: DataLoader(
            PlainTarImages([str(corpus / "shards" / f"{i:06d}.tar") for i in range(shard_count)], transform),
            batch_size=args.batch_size, num_workers=args.workers, drop_last=True),
        "ours, webdataset shards": ours_shards,
    }
    load_before = os.getloadavg()[0]
    best = {name: 0.0 for name in contenders}
    startup = {name: float("inf") for name in contenders}
    for _ in range(args.repeats):
        for name, make in contenders.items():
            seconds, samples_per_second = rate(make(), n_batches, args.batch_size)
            best[name] = max(best[name], samples_per_second)
            startup[name] = min(startup[name], seconds)
    print(f"{args.samples} samples, batch {args.batch_size}, {args.workers} workers, best of {args.repeats}; "
          f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"token cache for {args.samples} captions built once in {cache_seconds:.2f} s (includes loader setup)")
    print(f"{'':36s} {'samples/s':>9s}   first batch (worker start)")
    for name, value in best.items():
        print(f"{name:36s} {value:9.1f}   {startup[name]:.3f} s")
    base = best["plain PIL decode + transform"]
    print(f"ratio TSV / plain:                  {best['ours, TSV'] / base:.2f}")
    print(f"ratio TSV no token cache / plain:   {best['ours, TSV, --no-token-cache'] / base:.2f}")
    print(f"ratio shards / plain:               {best['ours, webdataset shards'] / base:.2f}")
    print(f"ratio shards / plain tar read:      "
          f"{best['ours, webdataset shards'] / best['plain tar read + decode + transform']:.2f}")
    for what, ratio, target in [
            ("TSV / plain decode + transform", best["ours, TSV"] / base, TSV_TARGET),
            ("shards / plain tar read + decode + transform",
             best["ours, webdataset shards"] / best["plain tar read + decode + transform"], SHARDS_TARGET)]:
        print(f"{what}: {ratio:.2f}; target >= {target:.2f}: {'meets' if ratio >= target else 'misses'}")


if __name__ == "__main__":
    main()
