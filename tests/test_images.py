"""foundation.images.open_rgb against hostile files: an image within the pixel limit that a model transform
would blow up (1 x 3,000,000), a FIFO or a device where an image file should be, a NUL byte in a path, EXIF
orientation, and a fuzz of mutated PNG and JPEG bytes through the training decode path. Every probe that
decodes runs in a child process under a memory limit (RLIMIT_DATA) and a timeout."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from conftest import run_bounded
from PIL import Image
from test_hostile_data import bilevel_png

from foundation.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    ExtremeAspectRatio,
    MissingImage,
    NotAFile,
    UnreadableImage,
    open_rgb,
)

# what a probe's child may allocate beyond the ~0.9 GB of torch and friends once imported
PROBE_DATA_BYTES = 2 << 30
STRIP = (1, 3_000_000)  # 11.7 KB as a PNG, 3 M pixels: far under the pixel limit


def jpeg_with_orientation(orientation: int, exif_bytes: bytes = None) -> bytes:
    """A 6x2 JPEG (left half red, right half blue) carrying EXIF orientation `orientation`."""
    pixels = np.zeros((2, 6, 3), dtype=np.uint8)
    pixels[:, :3] = (255, 0, 0)
    pixels[:, 3:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=100, subsampling=0, exif=exif_bytes if exif_bytes is not None else exif.tobytes())
    return out.getvalue()


def test_a_strip_within_the_pixel_limit_is_refused_from_its_header():
    strip = bilevel_png(*STRIP)
    assert len(strip) < 20_000
    with pytest.raises(ExtremeAspectRatio, match="1x3000000"):
        open_rgb(strip)
    with pytest.raises(ExtremeAspectRatio):
        open_rgb(bilevel_png(STRIP[1], STRIP[0]))
    # a panorama within the bound decodes; the bound can be lifted
    assert open_rgb(bilevel_png(DEFAULT_MAX_ASPECT_RATIO * 10, 10)).size == (DEFAULT_MAX_ASPECT_RATIO * 10, 10)
    assert open_rgb(bilevel_png(400, 2), max_aspect_ratio=None).size == (400, 2)


STRIP_THROUGH_THE_TRAINING_TRANSFORM = """
import sys
from compress.models.registry import get_preprocess
from training.data.csv_dataset import CsvDataset
from training.data.shards import decode_shard_sample
transform = get_preprocess({"kind": "open_clip", "model": "clipc-vit-t2-32", "preprocess": {
    "image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
sample = CsvDataset(sys.argv[1], transform)[0]
print(sample["index"], tuple(sample["image"].shape), "|".join(sample["skipped_reasons"]))
strip = open(sys.argv[2], "rb").read()
print(decode_shard_sample({"__key__": "0", "png": strip, "txt": b"a strip"}, transform)["bad"])
"""


@pytest.mark.slow
def test_a_strip_is_skipped_and_counted_by_the_training_loaders(tmp_path):
    """Before the bound, Resize(224) made the strip 224 x 672,000,000 (a MemoryError that killed the run)."""
    (tmp_path / "strip.png").write_bytes(bilevel_png(*STRIP))
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "good.png")
    (tmp_path / "train.tsv").write_text("filepath\ttitle\nstrip.png\ta strip\ngood.png\ta red square\n")
    result = run_bounded(["-c", STRIP_THROUGH_THE_TRAINING_TRANSFORM, tmp_path / "train.tsv", tmp_path / "strip.png"],
                         data_bytes=PROBE_DATA_BYTES, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    tsv_line, shard_line = result.stdout.splitlines()
    assert tsv_line.startswith("1 (3, 224, 224) row 0") and "extreme aspect ratio" in tsv_line
    assert "extreme aspect ratio" in shard_line and "1x3000000" in shard_line


@pytest.mark.parametrize("orientation, size, left_top", [
    (1, (6, 2), (255, 0, 0)),
    (3, (6, 2), (0, 0, 255)),  # rotated 180: blue comes first
    (6, (2, 6), (255, 0, 0)),  # rotated 90 clockwise to be upright: 2 wide, 6 high, red on top
    (8, (2, 6), (0, 0, 255)),  # rotated 90 counter-clockwise: blue on top
])
def test_exif_orientation_is_applied(orientation, size, left_top):
    image = open_rgb(jpeg_with_orientation(orientation))
    assert image.size == size
    assert np.abs(np.asarray(image)[0, 0].astype(int) - left_top).max() < 40


def test_a_malformed_exif_block_leaves_the_pixels_as_stored():
    image = open_rgb(jpeg_with_orientation(1, exif_bytes=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff garbage"))
    assert image.size == (6, 2)


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    code = ("import sys\nfrom foundation.images import open_rgb, ImageError\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        open_rgb(path)\n    except ImageError as e:\n        print(type(e).__name__, e.why)\n")
    # a regression blocks in open() on the FIFO (or reads /dev/zero for ever): the timeout ends it
    result = run_bounded(["-c", code, fifo, tmp_path / "zero.jpg"], data_bytes=PROBE_DATA_BYTES, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["NotAFile not a regular file (a FIFO, not a regular file)",
                                          "NotAFile not a regular file (a character device, not a regular file)"]
    with pytest.raises(NotAFile):
        open_rgb(tmp_path)  # a folder
    with pytest.raises(UnreadableImage, match="bad path"):
        open_rgb(str(tmp_path / "a\0b.jpg"))
    with pytest.raises(MissingImage):
        open_rgb(tmp_path / "absent.jpg")


# --- fuzz ------------------------------------------------------------------------------------------------

FUZZ_CASES = 400
FUZZ_TIMEOUT_S = 300


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_header(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _seeds():
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    seeds = []
    sixteen_bit = Image.fromarray(rng.integers(0, 65536, (24, 40), dtype=np.uint16))
    for image in [picture.convert(mode) for mode in ("RGB", "RGBA", "L", "P")] + [sixteen_bit]:
        out = io.BytesIO()
        image.save(out, "PNG")
        seeds.append(out.getvalue())
    for quality in (30, 95):
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality, exif=Image.Exif().tobytes())
        seeds.append(out.getvalue())
    seeds.append(jpeg_with_orientation(6))
    return seeds


def mutated_images(count: int, seed: int = 0):
    """`count` hostile variants of real PNG and JPEG files: bytes flipped, runs overwritten or repeated,
    truncations, and PNG headers declaring other sizes, depths and colour types with a valid CRC (so the
    decoder trusts them), JPEG frame headers declaring other sizes."""
    rng = np.random.default_rng(seed)
    seeds = _seeds()
    for _ in range(count):
        data = bytearray(seeds[rng.integers(len(seeds))])
        how = rng.integers(6)
        if how == 0:  # flip bytes
            for position in rng.integers(0, len(data), rng.integers(1, 16)):
                data[position] ^= int(rng.integers(1, 256))
        elif how == 1:  # truncate
            data = data[:rng.integers(8, len(data))]
        elif how == 2:  # a run of one byte value
            start = int(rng.integers(0, len(data)))
            data[start:start + int(rng.integers(1, 64))] = bytes([int(rng.integers(256))]) * int(rng.integers(1, 64))
        elif how == 3:  # a repeated slice
            start = int(rng.integers(0, len(data)))
            data[start:start] = data[start:start + int(rng.integers(1, 512))] * int(rng.integers(2, 64))
        elif how == 4:  # a PNG declaring another geometry, its CRC valid
            sizes = [1, 2, 7, 40, 1000, 9000, 65535, 3_000_000, 2**31 - 1]
            depth, colour = int(rng.choice([1, 2, 4, 8, 16, 3, 0])), int(rng.choice([0, 2, 3, 4, 6, 5]))
            pixels = zlib.compress(bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8)))
            data = bytearray(_png_with_header(int(rng.choice(sizes)), int(rng.choice(sizes)), depth, colour, pixels))
        else:  # a JPEG frame header (SOF0) declaring another size
            jpeg = seeds[-2]
            at = jpeg.find(b"\xff\xc0")
            if at < 0:
                continue
            data = bytearray(jpeg)
            data[at + 5:at + 9] = struct.pack(">HH", int(rng.integers(0, 65536)), int(rng.integers(0, 65536)))
        yield bytes(data)


FUZZ_DECODE = """
import collections, json, resource, sys, traceback
import torch
from test_images import mutated_images
from compress.models.registry import get_preprocess
from training.data.shards import decode_shard_sample
transform = get_preprocess({"kind": "open_clip", "model": "clipc-vit-t2-32", "preprocess": {
    "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
outcomes, failures = collections.Counter(), []
for number, data in enumerate(mutated_images(int(sys.argv[1]))):
    for key in ("png", "jpg"):
        try:
            sample = decode_shard_sample({"__key__": str(number), "txt": b"a caption", key: data}, transform)
        except BaseException as e:
            failures.append(f"{number}/{key}: {type(e).__name__}: {e}")
            continue
        if "bad" in sample:
            outcomes[sample["bad"].split(": ", 1)[1].split(" (")[0]] += 1
        else:
            assert tuple(sample["image"].shape) == (3, 32, 32) and torch.isfinite(sample["image"]).all()
            outcomes["decoded"] += 1
print(json.dumps({"outcomes": outcomes, "failures": failures[:10],
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_fuzzed_images_decode_or_are_counted_bad():
    """Each mutated file, as a shard's png and jpg member, through the training decode path (decode_shard_sample:
    open_rgb, the model transform): a decoded image or a counted bad sample, never an exception, a hang or an
    allocation past the child's limit."""
    tests = os.path.dirname(__file__)
    result = run_bounded(["-c", FUZZ_DECODE, FUZZ_CASES], data_bytes=PROBE_DATA_BYTES, timeout=FUZZ_TIMEOUT_S,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.path.join(tests, "..", "src")]),
                              "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failures"] == []
    outcomes = report["outcomes"]
    assert sum(outcomes.values()) == 2 * FUZZ_CASES
    # the fuzz reaches every kind of outcome: decoded images, and each refusal the rules name
    assert outcomes["decoded"] > 0 and outcomes["unreadable image"] > 0
    assert outcomes["image too large"] > 0 and outcomes["extreme aspect ratio"] > 0
