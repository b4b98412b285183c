"""Scraped data is untrusted input: image bombs, 16-bit and transparent images, and TSV/CSV files that
quote, break lines or lose a separator. Every file here is crafted by the test itself, a few KB each.
A trust suite, cross-module by design: each bad input followed through training and eval, so not named by a module.
"""
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from foundation import images
from foundation.errors import DataError
from foundation.images import BACKGROUND_RGB, DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, open_rgb, to_rgb
from training.data import get_data
from training.data import samples as training_samples
from training.data.csv_dataset import CsvDataset
from training.data.shards import decode_shard_sample
from training.params import build_parser

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, written row by row into zlib: 20000x20000 is ~49 KB on
    disk and never held in memory here (PIL would take 400 MB to hold it and far more to convert it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes((width + 7) // 8)  # filter byte "none", then the row's bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image, **save_args) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save_args)
    return out.getvalue()


def pixels(image: Image.Image) -> torch.Tensor:
    """The transform of these tests: a 4x4 uint8 CHW tensor, so batches stack and values can be read."""
    return torch.from_numpy(np.array(image.resize((4, 4)))).permute(2, 0, 1)


def good_image(folder, name: str, colour=(200, 30, 30)) -> str:
    Image.new("RGB", (8, 8), colour).save(folder / name)
    return name


@pytest.fixture
def decoded_sizes(monkeypatch):
    """The size of every image whose pixels PIL decodes (ImageFile.load) while the test runs."""
    sizes = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


def parsed_args(train_data, *extra):
    """The trainer's own flags (so the new ones are wired as a user types them) for an in-process loader."""
    return build_parser().parse_args(["--train-data", str(train_data), "--workers", "0", "--batch-size", "2",
                                      "--no-token-cache", *extra])


def epoch(args):
    data = get_data(args, pixels, None, rank=0, world_size=1)
    data.set_epoch(0)
    return list(data.batches())


# --- images ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, max_pixels", [
    (20000, DEFAULT_MAX_IMAGE_PIXELS),  # past PIL's own hard limit: its DecompressionBombError
    (10000, DEFAULT_MAX_IMAGE_PIXELS),  # past PIL's warning only: our header check
    (3000, 1_000_000),  # a lower limit of ours
])
def test_huge_png_is_skipped_as_too_large_before_decoding(tmp_path, decoded_sizes, size, max_pixels):
    bomb = bilevel_png(size, size)
    assert len(bomb) < 100_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    good_image(tmp_path, "good.png")
    (tmp_path / "train.tsv").write_text("filepath\ttitle\nbomb.png\ta black square\ngood.png\ta red square\n")
    dataset = CsvDataset(str(tmp_path / "train.tsv"), pixels, max_pixels=max_pixels)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = dataset[0]
    assert sample["index"] == 1 and sample["caption"] == "a red square"  # the next good row stands in
    (reason,) = sample["skipped_reasons"]
    assert "row 0" in reason and "bomb.png" in reason and "image too large" in reason
    assert (size, size) not in decoded_sizes and (8, 8) in decoded_sizes
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]

    with pytest.raises(ImageTooLarge):
        open_rgb(bomb, max_pixels)
    shard = decode_shard_sample({"__key__": "7", "png": bomb, "txt": b"a black square"}, pixels,
                                max_pixels=max_pixels)
    assert "image too large" in shard["bad"]
    assert (size, size) not in decoded_sizes


def test_max_image_pixels_flag_reaches_the_loader_and_counts_as_bad(tmp_path, decoded_sizes):
    for i, colour in enumerate(COLOURS[:3]):
        good_image(tmp_path, f"{i}.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 pixels: over the limit below
    rows = ["0.png\tred", "big.png\tbig", "1.png\tgreen", "2.png\tblue"]
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    assert build_parser().get_default("max_image_pixels") == DEFAULT_MAX_IMAGE_PIXELS
    batches = epoch(parsed_args(tmp_path / "train.tsv", "--max-image-pixels", "1000"))
    reasons = [r for b in batches for r in b["skipped_reasons"]]
    assert sum(b["skipped"] for b in batches) == 1 and len(reasons) == 1
    assert "image too large" in reasons[0] and "1,600 pixels" in reasons[0] and "--max-image-pixels" in reasons[0]
    assert (40, 40) not in decoded_sizes
    # the default lets the same picture through
    assert sum(b["skipped"] for b in epoch(parsed_args(tmp_path / "train.tsv"))) == 0


def test_training_data_leaves_pils_own_bomb_limit_in_place():
    # importing the loader used to set MAX_IMAGE_PIXELS = None for the whole process (eval, tools too)
    assert training_samples.Image.MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


def test_16_bit_png_decodes_to_its_grey_not_white():
    grey = png_bytes(Image.fromarray(np.full((6, 6), 32768, np.uint16)))
    assert Image.open(io.BytesIO(grey)).mode.startswith("I")  # what PIL makes of it: 0..65535 integers
    assert Image.open(io.BytesIO(grey)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # the old bug
    assert open_rgb(grey).getpixel((0, 0)) == (128, 128, 128)
    ramp = np.array([[0, 257, 65535]], np.uint16)
    assert [open_rgb(png_bytes(Image.fromarray(ramp))).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]
    # mode I (32-bit integers, how older Pillow opened 16-bit PNGs and how TIFFs can come)
    as_int32 = Image.fromarray(np.full((2, 2), 16384, np.int32))
    assert as_int32.mode == "I" and to_rgb(as_int32).getpixel((0, 0)) == (64, 64, 64)


def _palette_with_transparent_index() -> bytes:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([255, 255, 255, 10, 200, 30])
    return png_bytes(image, transparency=1)


@pytest.mark.parametrize("make", [
    lambda: png_bytes(Image.new("RGBA", (6, 6), (10, 200, 30, 0))),
    lambda: png_bytes(Image.new("LA", (6, 6), (40, 0))),
    _palette_with_transparent_index,
    lambda: png_bytes(Image.new("RGB", (6, 6), (10, 200, 30)), transparency=(10, 200, 30)),
    lambda: png_bytes(Image.fromarray(np.full((6, 6), 1000, np.uint16)), transparency=1000),
], ids=["RGBA", "LA", "P+tRNS", "RGB+tRNS", "I;16+tRNS"])
def test_fully_transparent_pixels_become_the_background(make):
    assert open_rgb(make()).getpixel((0, 0)) == BACKGROUND_RGB


def test_half_transparent_pixels_are_composited_over_the_background():
    half_black = png_bytes(Image.new("RGBA", (6, 6), (0, 0, 0, 128)))
    assert open_rgb(half_black).getpixel((0, 0)) == tuple(round(c * 127 / 255) for c in BACKGROUND_RGB)
    opaque = png_bytes(Image.new("RGBA", (6, 6), (10, 200, 30, 255)))
    assert open_rgb(opaque).getpixel((0, 0)) == (10, 200, 30)


def test_unreadable_images_keep_their_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"not an image\n")
    (tmp_path / "cut.png").write_bytes(png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    for name, reason in [("missing.png", "missing file"), ("empty.png", "0-byte file"),
                         ("text.png", "unreadable image"), ("cut.png", "unreadable image")]:
        with pytest.raises(images.UnreadableImage) as error:
            open_rgb(tmp_path / name)
        assert error.value.reason == reason and str(error.value).startswith(str(tmp_path / name))
        assert isinstance(error.value, OSError)  # as PIL's own errors: callers catching those catch these


def test_eval_sets_decode_by_the_same_rules(tmp_path):
    from eval.data import RetrievalSet, discover_datasets

    grey = png_bytes(Image.fromarray(np.full((6, 6), 32768, np.uint16)))
    clear = png_bytes(Image.new("RGBA", (6, 6), (10, 200, 30, 0)))
    for split in ("test", "train"):
        for label, image in (("grey", grey), ("clear", clear)):
            (tmp_path / "hostile" / split / label).mkdir(parents=True)
            (tmp_path / "hostile" / split / label / "0.png").write_bytes(image)
    found, _notes = discover_datasets(tmp_path)
    classification = found["hostile"].build(pixels)
    by_class = {classification.test.classes[label]: image for image, label in classification.test}
    assert by_class["grey"][:, 0, 0].tolist() == [128, 128, 128]
    assert by_class["clear"][:, 0, 0].tolist() == list(BACKGROUND_RGB)
    assert classification.train is not None and classification.train[0][0][:, 0, 0].tolist() == list(BACKGROUND_RGB)

    paths = [tmp_path / "hostile" / "test" / label / "0.png" for label in ("grey", "clear")]
    retrieval = RetrievalSet("hostile", paths, ["grey", "clear"], [0, 1]).images(pixels)
    assert retrieval[0][0][:, 0, 0].tolist() == [128, 128, 128]
    assert retrieval[1][0][:, 0, 0].tolist() == list(BACKGROUND_RGB)


# --- TSV / CSV ---------------------------------------------------------------------------------------


def write_images(folder, count: int):
    return [good_image(folder, f"{i}.png", (i * 30, 100, 200 - i * 20)) for i in range(count)]


def test_tsv_quoted_tab_in_the_first_row_is_skipped_without_shifting_columns(tmp_path, caplog):
    names = write_images(tmp_path, 8)
    rows = [f'{names[0]}\t"red\tcircle"'] + [f"{n}\ta {c} circle" for n, c in zip(names[1:], COLOURS[1:])]
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    dataset = CsvDataset(str(tmp_path / "train.tsv"), pixels)

    assert len(dataset) == 8  # the bad row keeps its index: every other row keeps its own
    assert dataset.captions[1:] == [f"a {c} circle" for c in COLOURS[1:]]
    assert dataset.paths[1:] == [str(tmp_path / n) for n in names[1:]]
    assert "line 2" in caplog.text and "1 malformed row(s)" in caplog.text

    batches = epoch(parsed_args(tmp_path / "train.tsv"))
    reasons = [r for b in batches for r in b["skipped_reasons"]]
    assert len(reasons) == 1 and "malformed row" in reasons[0] and "line 2 " in reasons[0]
    assert "empty caption" not in reasons[0]
    for batch in batches:  # trained on the right columns: each image with its own caption
        for index, caption in zip(batch["index"].tolist(), batch["caption"]):
            assert index > 0 and caption == f"a {COLOURS[index]} circle"


def test_tsv_quotes_are_plain_text(tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "train.tsv").write_text(f'filepath\ttitle\n{names[0]}\tthe "best" cat\n{names[1]}\t"a dog\n')
    dataset = CsvDataset(str(tmp_path / "train.tsv"), pixels)
    assert dataset.captions == ['the "best" cat', '"a dog'] and not dataset.malformed


def test_csv_with_standard_quoting_reads(tmp_path):
    names = write_images(tmp_path, 4)
    text = ("filepath,title\n"
            f'{names[0]},"red, green, and blue circles"\n'
            f'{names[1]},"a ""quoted"" word"\n'
            f"{names[2]},plain words\r\n"
            f'"{names[3]}","quoted, path"\n')
    (tmp_path / "train.csv").write_text(text)
    batches = epoch(parsed_args(tmp_path / "train.csv", "--csv-separator", ","))
    captions = {i: c for b in batches for i, c in zip(b["index"].tolist(), b["caption"])}
    assert captions == {0: "red, green, and blue circles", 1: 'a "quoted" word', 2: "plain words", 3: "quoted, path"}
    assert sum(b["skipped"] for b in batches) == 0


def test_csv_quoted_newline_is_one_row_and_later_line_numbers_stay_right(tmp_path):
    names = write_images(tmp_path, 4)
    text = ("filepath,title\n"
            f'{names[0]},"a red circle\non two lines"\n'  # lines 2-3
            f"{names[1]},a green circle\n"  # line 4
            f"{names[2]},a blue, circle\n"  # line 5: an unquoted comma
            f"{names[3]},a yellow circle\n")
    (tmp_path / "train.csv").write_text(text)
    dataset = CsvDataset(str(tmp_path / "train.csv"), pixels, sep=",")
    assert len(dataset) == 4
    assert dataset.captions[0] == "a red circle\non two lines"
    assert dataset.captions[1] == "a green circle" and dataset.captions[3] == "a yellow circle"
    assert dataset.malformed == {2: (5, dataset.malformed[2][1])}
    assert dataset[2]["skipped_reasons"][0].startswith(f"row 2 (line 5 of {tmp_path / 'train.csv'}): malformed row")


@pytest.mark.parametrize("separator, bad_row", [
    ("\t", "{name}\ta red circle\textra field"),
    ("\t", "{name}"),  # a lost separator
    (",", '{name},"an unterminated quote'),
    (",", '{name},"text" after the quote'),
])
def test_malformed_row_mid_file_is_skipped_and_counted_with_its_line(tmp_path, caplog, separator, bad_row):
    names = write_images(tmp_path, 8)
    rows = [f"{n}{separator}a {c} circle" for n, c in zip(names, COLOURS)]
    rows[4] = bad_row.format(name=names[4])  # line 6 of the file
    suffix = "tsv" if separator == "\t" else "csv"
    (tmp_path / f"train.{suffix}").write_text(f"filepath{separator}title\n" + "\n".join(rows) + "\n")

    batches = epoch(parsed_args(tmp_path / f"train.{suffix}", "--csv-separator", separator))
    reasons = [r for b in batches for r in b["skipped_reasons"]]
    assert sum(b["skipped"] for b in batches) == 1
    assert len(reasons) == 1 and "row 4 (line 6 " in reasons[0] and "malformed row" in reasons[0]
    assert "line 6" in caplog.text
    seen = {i: c for b in batches for i, c in zip(b["index"].tolist(), b["caption"])}
    assert seen == {i: f"a {c} circle" for i, c in enumerate(COLOURS) if i != 4}  # every good row, right


def test_a_file_of_only_malformed_rows_is_one_clear_error(tmp_path):
    (tmp_path / "train.tsv").write_text("filepath\ttitle\na.png\tx\ty\nb.png\tx\ty\n")
    with pytest.raises(DataError, match="no row can be read.*line 2.*--csv-separator"):
        CsvDataset(str(tmp_path / "train.tsv"), pixels)


def test_a_bad_row_is_counted_once_an_epoch(tmp_path):
    """15 bad rows of 16: each is counted when the sampler asks for it, not again each time another bad row
    searches past it for a good one to stand in (that gave samples_skipped 120)."""
    good_image(tmp_path, "good.png")
    rows = ["good.png\tthe only good row"] + [f"missing{i}.png\ta missing picture" for i in range(15)]
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    for _ in range(2):  # every epoch the same
        batches = epoch(parsed_args(tmp_path / "train.tsv"))
        reasons = [r for b in batches for r in b["skipped_reasons"]]
        assert sum(b["skipped"] for b in batches) == 15 == len(set(reasons))
        assert sorted(int(r.split()[1]) for r in reasons) == list(range(1, 16))


def test_a_nul_byte_in_a_path_is_a_counted_bad_row(tmp_path):
    names = write_images(tmp_path, 3)
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + f"{names[0]}\tred\nbad\0name.png\tnul\n"
                                        f"{names[1]}\tgreen\n{names[2]}\tblue\n")
    batches = epoch(parsed_args(tmp_path / "train.tsv"))
    (reason,) = [r for b in batches for r in b["skipped_reasons"]]
    assert reason.startswith("row 1 ") and "unreadable image (bad path" in reason


FIFO_ROW = """
import sys
from training.data.csv_dataset import CsvDataset
dataset = CsvDataset(sys.argv[1], lambda image: image.size)
sample = dataset[0]
print(sample["index"], sample["skipped_reasons"])
"""


@pytest.mark.slow
def test_a_fifo_named_jpg_in_a_tsv_is_skipped_and_counted_without_blocking(tmp_path):
    """The report's trainer blocked in open() on it for ever (SIGTERM could not end it either)."""
    from conftest import run_bounded

    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "dev.jpg").symlink_to("/dev/zero")
    good_image(tmp_path, "good.png")
    (tmp_path / "train.tsv").write_text("filepath\ttitle\nfifo.jpg\ta fifo\ndev.jpg\tzeros\ngood.png\ta square\n")
    result = run_bounded(["-c", FIFO_ROW, tmp_path / "train.tsv"], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("2 ['row 0 (") and "not a regular file (a FIFO" in result.stdout
    # the TSV itself must be a regular file too
    os.mkfifo(tmp_path / "fifo.tsv")
    result = run_bounded(["-c", FIFO_ROW, tmp_path / "fifo.tsv"], timeout=60)
    assert result.returncode == 1 and "DataError: cannot read --train-data" in result.stderr
    assert "a FIFO, not a regular file" in result.stderr


GALLERY = """
import sys
import numpy as np
from compress.models.registry import get_preprocess
from compress.ops.cascade import ImageFiles
preprocess = get_preprocess({"kind": "open_clip", "model": "clipc-vit-t2-32", "preprocess": {
    "image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
images, readable, unreadable = ImageFiles(sys.argv[1:], preprocess).load(np.arange(len(sys.argv) - 1))
print(tuple(images.shape), readable.tolist(), unreadable.tolist())
"""


@pytest.mark.slow
def test_a_gallery_image_that_would_explode_on_resize_is_unreadable_not_fatal(tmp_path):
    """`compress.cascade index` over a gallery holding the 1 x 3,000,000 strip could never finish."""
    from conftest import run_bounded

    (tmp_path / "strip.png").write_bytes(bilevel_png(1, 3_000_000))
    good_image(tmp_path, "good.png")
    result = run_bounded(["-c", GALLERY, tmp_path / "strip.png", tmp_path / "good.png"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[0] == "(1, 3, 224, 224) [1] [0]"
    assert "extreme aspect ratio" in result.stderr  # the warning line naming it


@pytest.mark.slow
def test_a_fifo_given_as_a_cascade_gallery_is_refused_without_blocking(tmp_path):
    from conftest import run_bounded

    os.mkfifo(tmp_path / "gallery.tsv")
    code = ("import sys\nfrom utils.cascade.gallery import read_gallery\nfrom foundation.errors import UserError\n"
            "try:\n    read_gallery(sys.argv[1])\nexcept UserError as e:\n    print(e)\n")
    result = run_bounded(["-c", code, tmp_path / "gallery.tsv"], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("cannot read it (" + str(tmp_path / "gallery.tsv")
                                          + " is a FIFO, not a regular file)")
