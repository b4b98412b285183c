"""Galleries for the cascaded search: which images, in which order, and (for retrieval sets) their captions.

    COCO        an eval root holding coco2017/ (or the coco2017 folder itself): val2017 images with captions
    Flickr30k   an eval root holding flickr30k/ or casCLIP's flickr30/ (or that folder itself), with captions
    ImageFolder a folder of class folders (<root>/<class>/*.jpg, the label is the folder) or of images
    TSV/CSV     a table of image paths (column --csv-img-key, relative to the table's folder or absolute;
                a caption column --csv-caption-key is read when there is one), or a plain list of paths

Only the paths are read here; images are decoded when they are embedded (compress.ops.cascade.ImageFiles).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from eval.data import find_coco_root, find_flickr_root, load_coco_captions, load_flickr30k
from foundation.errors import DataError, UserError
from foundation.files import open_regular
from foundation.tables import table_records, uses_quotes

FORMATS = ("auto", "coco", "flickr30k", "imagefolder", "tsv")
# what an ImageFolder gallery lists (torchvision's own list of image suffixes)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class Gallery:
    name: str
    kind: str  # one of FORMATS but "auto"
    paths: List[Path]
    captions: List[str] = field(default_factory=list)  # retrieval sets: every caption …
    text_to_image: List[int] = field(default_factory=list)  # … and the gallery index of its image
    labels: List[str] = field(default_factory=list)  # ImageFolder: the class folder of each image

    def truncate(self, max_images: int) -> "Gallery":
        """The first `max_images` images (0: all), with only their captions."""
        if not max_images or max_images >= len(self.paths):
            return self
        keep = [j for j, i in enumerate(self.text_to_image) if i < max_images]
        return Gallery(self.name, self.kind, self.paths[:max_images], [self.captions[j] for j in keep],
                       [self.text_to_image[j] for j in keep], self.labels[:max_images])

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "images": len(self.paths), "captions": len(self.captions)}


def detect_format(source: Path) -> str:
    if source.exists() and not source.is_dir():  # a table; one that is no regular file is refused when read
        return "tsv"
    if not source.is_dir():
        raise UserError(f"--gallery {source}: no such file or folder")
    if find_coco_root(source) is not None:
        return "coco"
    if find_flickr_root(source) is not None:
        return "flickr30k"
    return "imagefolder"


def read_gallery(source: str | Path, kind: str = "auto", max_images: int = 0, img_key: str = "filepath",
                 caption_key: str = "title", sep: str = "\t", quoting: str = "auto") -> Gallery:
    """The gallery at `source` (see the module docstring); `kind` forces a format."""
    source = Path(source)
    if kind not in FORMATS:
        raise UserError(f"gallery format {kind!r}: choose from {', '.join(FORMATS)}")
    kind = detect_format(source) if kind == "auto" else kind
    if kind == "coco":
        root = find_coco_root(source)
        if root is None:
            raise UserError(f"--gallery {source}: no coco2017/annotations/captions_val2017.json there")
        data = load_coco_captions(root)
        gallery = Gallery("coco2017", kind, data.image_paths, data.captions, data.text_to_image)
    elif kind == "flickr30k":
        root = find_flickr_root(source)
        if root is None:
            raise UserError(f"--gallery {source}: no flickr30k/ or flickr30/ folder with flickr30k_images/ and "
                            "results.csv (or a Karpathy JSON) there")
        data = load_flickr30k(root)
        gallery = Gallery("flickr30k", kind, data.image_paths, data.captions, data.text_to_image)
    elif kind == "imagefolder":
        gallery = _image_folder(source)
    else:
        gallery = _table(source, img_key, caption_key, sep, quoting)
    if not gallery.paths:
        raise UserError(f"--gallery {source}: no images found ({kind})")
    return gallery.truncate(max_images)


def _image_folder(root: Path) -> Gallery:
    if not root.is_dir():
        raise UserError(f"--gallery {root}: not a folder")

    def images_in(folder: Path) -> List[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    classes = sorted(p for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for folder in classes:
        found = images_in(folder)
        paths += found
        labels += [folder.name] * len(found)
    flat = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if flat and not paths:  # a plain folder of images
        return Gallery(root.name, "imagefolder", flat)
    return Gallery(root.name, "imagefolder", paths, labels=labels)


def _table(path: Path, img_key: str, caption_key: str, sep: str, quoting: str) -> Gallery:
    try:
        quoted = uses_quotes(sep, quoting)
        # a regular file only: a FIFO would block the index build for ever
        with io.TextIOWrapper(open_regular(path), encoding="utf-8", newline="") as handle:
            records = [(number, fields) for number, fields, _ in table_records(handle, sep, quoted)
                       if fields is not None]
    except (OSError, ValueError, DataError) as error:  # ValueError: UnicodeDecodeError, a NUL in the path
        raise UserError(f"--gallery {path}: cannot read it ({error})") from None
    if not records:
        return Gallery(path.stem, "tsv", [])
    header = records[0][1]
    folder = path.parent
    if img_key in header:
        column = header.index(img_key)
        caption_column: Optional[int] = header.index(caption_key) if caption_key in header else None
        rows = [fields for _, fields in records[1:]]
    elif len(header) == 1:  # a plain list of paths, no header
        column, caption_column, rows = 0, None, [fields for _, fields in records]
    else:
        raise UserError(f"--gallery {path}: no column {img_key!r} in its header {header[:6]} (--csv-img-key)")
    paths, captions, text_to_image = [], [], []
    index_of = {}
    for fields in rows:
        image = Path(fields[column])
        image = image if image.is_absolute() else folder / image
        # a table of (image, caption) pairs lists an image once per caption: one gallery entry per image
        if image not in index_of:
            index_of[image] = len(paths)
            paths.append(image)
        if caption_column is not None and fields[caption_column].strip():
            captions.append(fields[caption_column].strip())
            text_to_image.append(index_of[image])
    return Gallery(path.stem, "tsv", paths, captions, text_to_image)
