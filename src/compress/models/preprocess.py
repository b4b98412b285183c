"""Image preprocessing split at its tensor steps, so that a loader converts and normalises a whole batch at once."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image


def split_preprocess(preprocess: Callable) -> Tuple[Callable, Optional[Callable[[List[torch.Tensor]], torch.Tensor]]]:
    """A torchvision Compose ending in ToTensor (open_clip's MaybeToTensor is one) and Normalize, as the eval
    transforms of open_clip and of our specs are, split in two: per image, the steps before them and the RGB
    pixels as a uint8 CHW tensor; per batch, the conversion to floats in [0, 1] and Normalize, once on the
    stacked batch. The numbers are the transform's own (the same elementwise operations in the same order),
    without two tensor operations per image, which cost a small image more than decoding it. Any other
    transform: (the transform, None), applied per image as it is."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if (not isinstance(preprocess, T.Compose) or len(steps) < 2 or not isinstance(steps[-2], T.ToTensor)
            or not isinstance(steps[-1], T.Normalize)):
        return preprocess, None
    return ImageSteps(T.Compose(steps[:-2]), steps[-2]), BatchSteps(steps[-1])


class ImageSteps:
    """The per-image half: the steps before ToTensor, then the RGB pixels as a uint8 CHW tensor (a class, not a
    closure, so that a loader can pickle it to spawned workers)."""

    def __init__(self, before: Callable, to_tensor: Callable):
        self.before, self.to_tensor = before, to_tensor

    def __call__(self, image) -> torch.Tensor:
        image = self.before(image)
        if isinstance(image, Image.Image) and image.mode == "RGB":
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return self.to_tensor(image)  # other modes (and tensors) exactly as ToTensor converts them


class BatchSteps:
    """The per-batch half: the images stacked, converted to floats in [0, 1] and normalised."""

    def __init__(self, normalize: Callable):
        self.normalize = normalize

    def __call__(self, images: List[torch.Tensor]) -> torch.Tensor:
        dtype = torch.get_default_dtype()
        if all(image.dtype == torch.uint8 for image in images):
            batch = torch.stack(images).to(dtype).div_(255)
        else:
            batch = torch.stack([image.to(dtype).div(255) if image.dtype == torch.uint8 else image
                                 for image in images])
        return self.normalize(batch)
