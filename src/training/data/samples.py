"""One sample's checks and one batch's assembly, the same for every source: BadSample, the image and
caption rules (`load_image`, `check_caption`) and BatchCollator. A module of its own because the training
jobs and the post-training tools load images and build batches the trainer's way without its loader."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from compress.models.preprocess import split_preprocess
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, open_rgb

# How many following rows a TSV sample may try before giving up: a run of more bad rows than this
# means the data is broken, not noisy.
MAX_CONSECUTIVE_BAD = 64
# Longest caption (UTF-8 bytes) a sample may have: CLIP reads 77 tokens, a few hundred characters; a caption
# past this is no caption (a page's text, a file pasted in) and its tokenizing alone would take seconds
# and gigabytes, so the sample is skipped as bad. Shards refuse a longer `txt` member before reading it.
MAX_CAPTION_BYTES = 64 << 10


# Per-sample tensors a source may add, stacked into the batch under the same name: a reinforced set's stored
# teacher embeddings (training.data.reinforced)
STACKED_FIELDS = ("teacher_image", "teacher_text")


class BadSample(Exception):
    pass


def load_image(source: str | bytes, what: Callable[[], str],
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The decoded RGB image (`open_rgb`'s rules: too large is refused before decoding) or BadSample.
    `what()` names the sample; it is only built for the error message."""
    try:
        return open_rgb(source, max_pixels)
    except ImageError as e:
        hint = "; --max-image-pixels sets the limit" if isinstance(e, ImageTooLarge) else ""
        raise BadSample(f"{what()}: {e.why}{hint}") from None


def check_caption(caption: Any, what: Callable[[], str], allow_empty: bool = False) -> str:
    if not isinstance(caption, str):
        raise BadSample(f"{what()}: caption is not text")
    if len(caption) > MAX_CAPTION_BYTES:  # characters: at least as many UTF-8 bytes, checked before encoding
        raise BadSample(f"{what()}: caption of {len(caption):,} characters, over the limit of "
                        f"{MAX_CAPTION_BYTES:,} bytes")
    try:
        size = len(caption.encode("utf-8"))  # surrogate escapes from invalid UTF-8 bytes fail here
    except UnicodeEncodeError:
        raise BadSample(f"{what()}: caption is not valid UTF-8")
    if size > MAX_CAPTION_BYTES:
        raise BadSample(f"{what()}: caption of {size:,} bytes, over the limit of {MAX_CAPTION_BYTES:,}")
    if not caption.strip() and not allow_empty:
        raise BadSample(f"{what()}: empty caption")
    return caption


class BatchCollator:
    """Samples -> one batch. Token ids come from the samples when a token cache supplied them, else all
    the batch's captions are tokenized in one tokenizer call (in the loader worker): one (B, context)
    tensor instead of B small ones to build, pickle and stack (bench_loader TSV 0.68 -> 0.80 of plain
    decode+transform). Without a tokenizer the batch has no `text` (jobs whose teacher reads captions).

    `finish_images`: the per-batch half of a split transform (`split_images`): the samples then hold uint8
    pixels, converted and normalised here once for the whole batch."""

    def __init__(self, tokenizer: Optional[Callable] = None,
                 finish_images: Optional[Callable[[List[torch.Tensor]], torch.Tensor]] = None):
        self.tokenizer = tokenizer
        self.finish_images = finish_images

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        bad = [s["bad"] for s in samples if "bad" in s]
        good = [s for s in samples if "bad" not in s]
        reasons = bad + [r for s in good for r in s.get("skipped_reasons", [])]
        captions = [s["caption"] for s in good]
        batch = {
            "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "image": self._images([s["image"] for s in good]) if good else torch.empty(0),
            "caption": captions,
            "skipped": len(reasons),
            "skipped_reasons": reasons,
        }
        for name in STACKED_FIELDS:
            if good and name in good[0]:
                batch[name] = torch.stack([s[name] for s in good])
        if good and "text" in good[0]:
            batch["text"] = torch.from_numpy(np.stack([s["text"] for s in good]).astype(np.int64))
        elif self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions) if captions else torch.empty(0, dtype=torch.long)
        if get_worker_info() is not None:
            for name in SMALL_FIELDS:
                if isinstance(batch.get(name), torch.Tensor):
                    batch[name] = batch[name].numpy()
        return batch

    def _images(self, images: List[torch.Tensor]) -> torch.Tensor:
        return self.finish_images(images) if self.finish_images is not None else torch.stack(images)


def split_images(dataset: Any) -> Optional[Callable[[List[torch.Tensor]], torch.Tensor]]:
    """Give a map-style dataset (one with a `transform`) the per-image half of its transform and return the
    per-batch half (compress.models.preprocess.split_preprocess: ToTensor and Normalize once per batch, the
    same numbers; ~120 us an image less for a 64-px image, a third of its loading), or None when the transform
    does not split. Every loader over the dataset then collates with `image_collator`."""
    per_image, per_batch = split_preprocess(dataset.transform)
    if per_batch is not None:
        dataset.transform, dataset.finish_images = per_image, per_batch
    return per_batch


def image_collator(dataset: Any, tokenizer: Optional[Callable] = None) -> BatchCollator:
    """The collator for a loader over `dataset` (or a Subset of it): it finishes the images the way the dataset
    leaves them (`split_images`)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return BatchCollator(tokenizer, getattr(dataset, "finish_images", None))


# A loader worker hands each tensor of a batch to the main process in a shared-memory segment of its own, which
# costs about 0.5 ms to create and map: for the batch's small fields (64 indices, 64 x 77 token ids) that is more
# than the data, and was 5-8 % of the loader's time (scripts/bench_loader.py). A worker's collator sends them as
# numpy arrays, pickled by value, and `batch_from_worker` makes them tensors again in the main process.
SMALL_FIELDS = ("index", "text")


def batch_from_worker(batch: Any) -> Any:
    """A batch as the collator built it: the small fields a worker sent as numpy arrays are tensors again
    (sharing the arrays' memory). Anything that is not a collated batch passes through."""
    if isinstance(batch, dict):
        for name in SMALL_FIELDS:
            if isinstance(batch.get(name), np.ndarray):
                batch[name] = torch.from_numpy(batch[name])
    return batch
