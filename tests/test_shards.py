"""training.data.shards against hostile shards: a 1.5 GB caption member in a small gzip'd shard, a tar header
record that would be read whole, a FIFO named like a shard, and a fuzz of mutated tar members. Every probe
runs in a child process under a memory limit (RLIMIT_DATA) and a timeout; each bad sample is skipped and
counted, the shard's other samples still train, and nothing is read past its bound."""
import gzip
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from conftest import SRC, run_bounded, subprocess_env
from PIL import Image

from training.data.samples import MAX_CAPTION_BYTES
from training.data.shards import MAX_TAR_HEADER_BYTES, SeededShuffle

pytestmark = pytest.mark.slow  # every probe starts a process; the large ones write and read ~1.5 GB of gzip

HUGE_CAPTION_BYTES = 1_500_000_000  # as in the report: 6.6 GB resident and a MemoryError before the bound
PROBE_DATA_BYTES = 2 << 30  # what a probe's child may allocate: the huge member does not fit
TESTS = os.path.dirname(__file__)


def jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, "JPEG")
    return out.getvalue()


class Repeated(io.RawIOBase):
    """`size` bytes of one repeated line, made on demand (the test never holds them)."""

    def __init__(self, size: int, line: bytes = b"a caption that goes on and on "):
        self.left, self.line = size, line * 1000

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left, len(self.line))
        buffer[:n] = self.line[:n]
        self.left -= n
        return n


def add(tar: tarfile.TarFile, name: str, data=None, size: int = None, **info_fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    for key, value in info_fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if size is None else Repeated(size))


def write_shard(path, samples, compress=True) -> None:
    """A webdataset shard of `samples`: (key, {suffix: bytes or a size to stream})."""
    raw = gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")
    with raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for suffix, value in members.items():
                if isinstance(value, int):
                    add(tar, f"{key}.{suffix}", size=value)
                else:
                    add(tar, f"{key}.{suffix}", value)


def good(key: int):
    return str(key).zfill(4), {"jpg": jpeg((key * 40 % 256, 20, 200)), "txt": f"picture {key}".encode(),
                               "idx": str(key).encode()}


READ_SHARDS = """
import json, logging, resource, sys
from training.data.shards import MemberTooLarge, shard_samples, decode_shard_sample
logging.basicConfig(level=logging.WARNING, format="%(message)s")
rows = []
for sample in shard_samples({"url": url} for url in sys.argv[1:]):
    decoded = decode_shard_sample(sample, lambda image: image.size)
    rows.append(decoded.get("bad") or decoded["caption"])
print(json.dumps({"rows": rows, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def read_shards(*paths, timeout=300):
    result = run_bounded(["-c", READ_SHARDS, *paths], data_bytes=PROBE_DATA_BYTES, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def caption_bomb(tmp_path_factory):
    """A gzip'd shard of 1.5 MB or so: good samples around one whose caption member is 1.5 GB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    bomb = ("0002", {"jpg": jpeg((0, 0, 0)), "txt": HUGE_CAPTION_BYTES})
    write_shard(path, [good(0), good(1), bomb, good(3)])
    return path


def test_a_huge_member_is_skipped_unread_and_its_sample_counted(caption_bomb):
    assert os.path.getsize(caption_bomb) < 10_000_000
    report, _ = read_shards(caption_bomb)
    rows = report["rows"]
    assert rows[:2] == ["picture 0", "picture 1"] and rows[3] == "picture 3"
    assert f"member 0002.txt is {HUGE_CAPTION_BYTES:,} bytes, over the limit of {MAX_CAPTION_BYTES:,}" in rows[2]
    assert report["peak_rss_kb"] < 1_500_000  # torch imported (~0.8 GB) and one sample; never the member


def test_a_training_run_on_the_shard_skips_the_sample_and_ends_normally(caption_bomb, tiny_corpus, tmp_path):
    """The run the report saw die (MemoryError in the tokenizer, then no exit): it trains on, counts the
    sample, and exits 0, under a memory limit the member alone would break."""
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(caption_bomb, shards / "a.tar.gz")
    shutil.copy(sorted((tiny_corpus / "shards").glob("*.tar"))[0], shards / "b.tar")
    (shards / "sizes.json").write_text(json.dumps({"a.tar.gz": 4, "b.tar": 64}))
    args = ["-m", "training.main", "--train-data", f"{shards}/a.tar.gz::{shards}/b.tar", "--model",
            "clipc-vit-t2-32", "--logs-root", tmp_path, "--name", "bomb", "--batch-size", "16", "--workers", "1",
            "--epochs", "1", "--warmup", "1", "--shuffle-buffer", "8"]
    result = run_bounded(args, data_bytes=3 << 30, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "bomb" / "out.log").read_text()
    assert "member 0002.txt is 1,500,000,000 bytes" in log
    summary = json.loads(log.split("done: ", 1)[1].splitlines()[0])
    assert summary["samples_skipped"] >= 1


def test_a_huge_tar_header_record_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "header.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for key, members in [good(0)]:
            for suffix, value in members.items():
                add(tar, f"{key}.{suffix}", value)
        # a pax header record tarfile would read whole into memory
        add(tar, "././@PaxHeader", size=HUGE_CAPTION_BYTES, type=tarfile.XHDTYPE)
        for suffix, value in good(1)[1].items():
            add(tar, f"0001.{suffix}", value)
    report, log = read_shards(path)
    assert report["rows"] == ["picture 0"]  # the shard is unreadable past the record; what came before trains
    assert f"over {MAX_TAR_HEADER_BYTES:,}" in log and "the rest skipped" in log


def test_special_files_named_like_shards_are_skipped_without_blocking(tmp_path):
    write_shard(tmp_path / "a.tar", [good(0), good(1)], compress=False)
    os.mkfifo(tmp_path / "b.tar")
    (tmp_path / "c.tar").symlink_to("/dev/zero")
    report, log = read_shards(tmp_path / "b.tar", tmp_path / "c.tar", tmp_path / "a.tar", timeout=60)
    assert report["rows"] == ["picture 0", "picture 1"]
    assert "b.tar is a FIFO, not a regular file" in log and "c.tar is a character device" in log


def test_the_shuffle_buffer_is_bounded_by_bytes_too():
    samples = [{"__key__": str(i), "jpg": bytes(1000)} for i in range(50)]
    pulled, held = [0], []

    def source():
        for sample in samples:
            pulled[0] += 1
            yield sample

    out = []
    for sample in SeededShuffle(bufsize=40, initial=40, seed=0, rank=0, max_bytes=5000)(source()):
        held.append(pulled[0] - len(out))  # samples in the buffer when this one was given out
        out.append(sample["__key__"])
    assert sorted(out, key=int) == [str(i) for i in range(50)]
    assert max(held) <= 6  # 5000 bytes of 1000-byte samples, and the one that tipped it over
    # under the byte bound, the count bound alone decides, as before
    assert max(_held_counts(samples, max_bytes=10**9)) == 40


def _held_counts(samples, max_bytes):
    pulled, held, given = [0], [], [0]

    def source():
        for sample in samples:
            pulled[0] += 1
            yield sample

    for _ in SeededShuffle(bufsize=40, initial=40, seed=0, rank=0, max_bytes=max_bytes)(source()):
        held.append(pulled[0] - given[0])
        given[0] += 1
    return held


# --- fuzz ----------------------------------------------------------------------------------------------

FUZZ_SHARDS = 150


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def mutated_shards(count: int, seed: int = 0):
    """`count` hostile variants of a real 4-sample shard: member sizes, types, names and header checksums
    rewritten (checksums made valid, so tarfile believes them), data bytes flipped, truncation, and gzip."""
    rng = np.random.default_rng(seed)
    base = io.BytesIO()
    with tarfile.open(fileobj=base, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in range(4):
            name, members = good(key)
            for suffix, value in members.items():
                add(tar, f"{name}.{suffix}", value)
    clean = base.getvalue()
    headers = [offset for offset in range(0, len(clean) - 512, 512) if clean[offset + 257:offset + 262] == b"ustar"]
    for _ in range(count):
        data = bytearray(clean)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.choice(headers))
            header = data[at:at + 512]
            how = rng.integers(5)
            if how == 0:  # another size, up to 8 GB
                header[124:136] = b"%011o\0" % int(rng.choice([0, 1, 511, 513, 10**6, 2**33 - 1]))
            elif how == 1:  # another member type: links, folders, FIFOs, pax and GNU records, sparse
                header[156:157] = bytes([int(rng.choice(list(b"0123456LKxgS")))])
            elif how == 2:  # another name: paths, dots, no suffix, meta names
                names = [b"../../etc/x.txt", b"0000", b"a/b/c.JPG", b"__key__.txt", b".txt", b"x." * 40]
                name = names[int(rng.integers(len(names)))]
                header[0:100] = name.ljust(100, b"\0")[:100]
            elif how == 3:  # flipped header bytes, checksum left as it was or made right
                for position in rng.integers(0, 512, 4):
                    header[position] ^= int(rng.integers(1, 256))
            else:  # flipped data bytes after the header
                end = min(len(data), at + 512 + 64)
                for position in rng.integers(at + 512, end, 4):
                    data[position] ^= int(rng.integers(1, 256))
            if how != 3 or rng.integers(2):
                _checksum(header)
            data[at:at + 512] = header
        if rng.integers(4) == 0:
            data = data[:int(rng.integers(0, len(data)))]
        yield gzip.compress(bytes(data), 1) if rng.integers(2) else bytes(data)


FUZZ_READ = """
import collections, json, logging, os, resource, sys
from test_shards import mutated_shards
from training.data.shards import shard_samples, decode_shard_sample, drop_bad_samples
logging.disable(logging.WARNING)  # each broken shard logs a line
outcomes, failures = collections.Counter(), []
folder = sys.argv[2]
for number, data in enumerate(mutated_shards(int(sys.argv[1]))):
    path = os.path.join(folder, f"{number}.tar")
    with open(path, "wb") as f:
        f.write(data)
    try:
        samples = [decode_shard_sample(s, lambda image: image.size) for s in shard_samples([{"url": path}])]
        good = list(drop_bad_samples(iter(samples)))
    except BaseException as e:
        failures.append(f"{number}: {type(e).__name__}: {e}")
        continue
    os.remove(path)
    for sample in samples:
        outcomes["bad" if "bad" in sample else "decoded"] += 1
    # every bad sample before the last good one rides on a good one, to be counted in its batch
    carried = samples[:max([i for i, s in enumerate(samples) if "bad" not in s], default=0)]
    if sum(len(s["skipped_reasons"]) for s in good) != sum("bad" in s for s in carried):
        failures.append(f"{number}: bad samples not carried to be counted")
print(json.dumps({"outcomes": outcomes, "failures": failures[:10],
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_fuzzed_shards_give_samples_or_counted_bad_ones(tmp_path):
    """Each mutated shard through the shard reader and the training decode: samples decoded, bad samples
    (each counted by drop_bad_samples), or a shard that stops with a logged line; never an exception out of
    the reader, a hang, or an allocation past the child's limit (a header claiming 8 GB is never read)."""
    env = subprocess_env(PYTHONPATH=os.pathsep.join([TESTS, str(SRC)]))
    result = run_bounded(["-c", FUZZ_READ, FUZZ_SHARDS, tmp_path], data_bytes=PROBE_DATA_BYTES, timeout=300,
                         env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failures"] == []
    assert report["outcomes"]["decoded"] > 0 and report["outcomes"]["bad"] > 0
    assert report["peak_rss_kb"] < 1_500_000


def test_a_sizes_json_that_is_no_regular_file_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "sizes.json")
    code = ("import sys\nfrom training.data.shards import shard_sizes\nfrom foundation.errors import DataError\n"
            "try:\n    shard_sizes([sys.argv[1]])\nexcept DataError as e:\n    print(e)\n")
    result = run_bounded(["-c", code, tmp_path / "a.tar"], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sizes.json is a FIFO, not a regular file" in result.stdout and "--train-num-samples" in result.stdout
    (tmp_path / "sizes.json").unlink()
    (tmp_path / "sizes.json").write_text("[1, 2]")
    result = run_bounded(["-c", code, tmp_path / "a.tar"], timeout=60)
    assert "TypeError" in result.stdout and "--train-num-samples" in result.stdout
