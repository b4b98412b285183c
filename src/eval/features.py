"""Embedding a dataset or a caption list with an encoder, batch by batch, with progress shown (a bar on a
terminal, else a log line every $CLIPCOMPRESS_PROGRESS_SECONDS: foundation.progress).

Features come back L2-normalised, float32, on the CPU: a benchmark moves them where its maths runs, and
large sets (ImageNet train) don't sit in accelerator memory between steps.
"""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from foundation.progress import Progress

log = logging.getLogger(__name__)


def extract_image_features(
    encoder, dataset: Dataset, batch_size: int = 64, workers: int = 0, desc: str = "images"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], second item of each sample [N]: class labels, or indices for retrieval images)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
        persistent_workers=False,
    )
    features: List[torch.Tensor] = []
    targets: List[torch.Tensor] = []
    with Progress(total=len(dataset), desc=f"embedding {desc}", unit="img", logger=log) as progress:
        for images, batch_targets in loader:
            features.append(encoder.encode_image(images).cpu())
            targets.append(torch.as_tensor(batch_targets))
            progress.update(len(images))
    if not features:
        raise ValueError(f"{desc}: the dataset is empty")
    return torch.cat(features), torch.cat(targets).long()


def extract_text_features(encoder, texts: Sequence[str], batch_size: int = 256, desc: str = "captions") -> torch.Tensor:
    """Features [len(texts), D] of the captions, in order."""
    features = []
    with Progress(total=len(texts), desc=f"embedding {desc}", unit="text", logger=log) as progress:
        for start in range(0, len(texts), batch_size):
            features.append(encoder.encode_text(texts[start : start + batch_size]).cpu())
            progress.update(len(features[-1]))
    if not features:
        raise ValueError(f"{desc}: no captions")
    return torch.cat(features)
