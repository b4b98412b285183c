"""UPop/BLIP's training annotation as a map-style source, read as it is (no conversion to TSV):

    --train-data annotation/coco_karpathy_train.json --train-image-root coco/

a JSON list of {"image": path under the image root, "caption": str, "image_id": ...} (foundation.annotations
reads and checks it). Each entry is one row; an entry whose caption is a list (a test/val file) gives one row
per caption. Entries whose path would leave the image root, or of the wrong shape, are skipped and counted
in one warning. Rows load, substitute bad images and cache their tokens exactly as CsvDataset's do.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from foundation.annotations import read_image_captions, skipped_note
from foundation.errors import DataError
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from training.data.csv_dataset import CsvDataset


class AnnotationDataset(CsvDataset):
    """Rows of (image path, caption) from a UPop/BLIP annotation file; `image_root` defaults to the file's
    folder."""

    def __init__(self, path: str, transform: Callable, image_root: Optional[str] = None,
                 allow_empty_captions: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(root):
            raise DataError(f"--train-image-root {root}: folder not found (the images of {path} lie under it)")
        try:
            entries, skipped = read_image_captions(path, root)
        except DataError as error:
            raise DataError(f"--train-data {error}") from None
        total = len(entries) + sum(skipped.values())
        if not entries:
            raise DataError(f"--train-data {path}: no usable entry of {total}"
                            + (f" ({skipped_note(skipped, total)})" if skipped else ""))
        if skipped:
            logging.warning("%s: %s", path, skipped_note(skipped, total))
        self.source = path
        self.paths = [str(entry.image) for entry in entries for _ in entry.captions]
        self.captions = [caption for entry in entries for caption in entry.captions]
        self.malformed = {}
        self._init_loading(transform, allow_empty_captions, max_pixels)
