"""Annotation files as UPop, BLIP and LAVIS ship them: a JSON list of images with their captions.

    test/val:  [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a man ...", ...]}, ...]
    train:     [{"image": "train2014/COCO_train2014_000000057870.jpg", "caption": "a man ...",
                 "image_id": "coco_57870"}, ...]

`image` is relative to an image root given beside the file (UPop's `image_root`). The file is data from
elsewhere, so a path in it is never trusted: an absolute path, a `..` component, a drive or a NUL byte
would reach outside the root, and such an entry is skipped and counted, never opened (`confined_path`).
Entries of the wrong shape (no image, a caption that is not text) are skipped and counted the same way; the
caller reports the counts in one line.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, List, Optional, Tuple, Union

from foundation.errors import DataError
from foundation.files import open_regular

PathLike = Union[str, "os.PathLike[str]"]

# reasons an entry is skipped, as the counts name them
OUTSIDE_ROOT = "path outside the image root"
MALFORMED = "malformed entry"
NO_CAPTION = "no caption"


@dataclass
class ImageCaptions:
    image: Path  # under the image root
    captions: List[str]  # one for a training entry, all of the image's for a test entry
    image_id: Any = None  # the training file's `image_id` (UPop groups captions of one image by it)


def confined_path(root: PathLike, name: str) -> Optional[Path]:
    """`root / name` when `name` is a relative path that stays under `root` by its spelling: None for an
    empty name, an absolute path (POSIX or Windows, a drive included), any `..` component, a backslash
    (another system's separator, so `..\\x` cannot sneak through) or a NUL byte. Links inside the root are
    the root owner's and are followed; only the annotation file's text is distrusted."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return None
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts:
        return None
    return Path(root) / posix


def read_image_captions(path: PathLike, image_root: PathLike) -> Tuple[List[ImageCaptions], Counter]:
    """The entries of a UPop/BLIP annotation file (either form above) whose image lies under `image_root`,
    in file order, and a Counter of the skipped ones by reason. Raises DataError (one line) when the file
    cannot be read or is not a JSON list."""
    try:
        with open_regular(path) as handle:
            data = json.loads(handle.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: not a readable JSON annotation file ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{\"image\": ..., \"caption\": ...}} entries (UPop/BLIP "
                        f"annotation), got a {type(data).__name__}")
    entries: List[ImageCaptions] = []
    skipped: Counter = Counter()
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            skipped[MALFORMED] += 1
            continue
        image = confined_path(image_root, item["image"])
        if image is None:
            skipped[OUTSIDE_ROOT] += 1
            continue
        caption = item.get("caption")
        captions = caption if isinstance(caption, list) else [caption]
        if not all(isinstance(c, str) for c in captions):
            skipped[MALFORMED] += 1
            continue
        captions = [c.strip() for c in captions if c.strip()]
        if not captions:
            skipped[NO_CAPTION] += 1
            continue
        image_id = item.get("image_id")
        entries.append(ImageCaptions(image, captions, image_id if isinstance(image_id, (str, int)) else None))
    return entries, skipped


def skipped_note(skipped: Counter, total: int) -> str:
    """'3 of 5000 entries skipped (2 path outside the image root, 1 malformed entry)', or '' when none were."""
    if not skipped:
        return ""
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
    return f"{sum(skipped.values())} of {total} entries skipped ({reasons})"
