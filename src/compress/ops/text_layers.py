"""Text-encoder layer dropping: keep a subset of the text transformer's blocks (no retraining).

Fewer text layers trade zero-shot accuracy for text latency; `utils.sweep text_layers --keep-first ...` draws
that curve. The spec records the *original* indices of the kept layers, so dropping twice composes correctly.

    python -m utils.text_layers --pretrained CKPT --out RUN_DIR --keep-first 6
    python -m utils.text_layers --pretrained CKPT --out RUN_DIR --drop 3,5
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from compress.models.compact_clip import clone, keep_text_layers, tower_blocks


def drop_text_layers(model: nn.Module, drop: Optional[Sequence[int]] = None,
                     keep_first: Optional[int] = None) -> nn.Module:
    """A copy of `model` without text blocks `drop` (indices), or keeping only the first `keep_first`."""
    if (drop is None) == (keep_first is None):
        raise ValueError("give exactly one of --drop or --keep-first")
    model = clone(model)
    count = len(tower_blocks(model, "text"))
    if keep_first is not None:
        if not 1 <= keep_first <= count:
            raise ValueError(f"--keep-first must be in [1, {count}]")
        kept: List[int] = list(range(keep_first))
    else:
        bad = [i for i in drop if not 0 <= i < count]
        if bad:
            raise ValueError(f"--drop {bad} out of range: the text tower has {count} layers")
        kept = [i for i in range(count) if i not in set(drop)]
    return keep_text_layers(model, kept)
