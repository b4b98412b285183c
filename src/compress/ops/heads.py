"""Attention-head pruning by sensitivity (Michel et al. 2019, as casCLIP applied it to CLIP).

Every head h of a chosen block gets a mask variable ξ_h = 1 that scales its output before out_proj. The
importance of a head is its Fisher score I_h = Σ_batches (∂L/∂ξ_h)² over calibration batches (L = CLIP's
contrastive loss), normalised per layer by its L2 norm (Michel et al.: scores of different layers live on
different scales). Pruning is iterative: remove the `heads_per_round` least important heads, physically
(q/k/v lose those heads' rows, out_proj their columns), recompute the scores on the smaller model, repeat
until `num_heads` heads are gone. The result is a `compact_clip` with per-layer head counts.

    python -m utils.heads --pretrained CKPT --out RUN_DIR --num-heads 2 --calib-data train.tsv
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from compress.models.compact_clip import CompactBlock, clone, compact_blocks, keep_heads, refresh_spec
from compress.ops.calibration import Batch, contrastive_loss, squared_gradients

# --- head-mask Fisher scores ------------------------------------------------------------------------


def head_importance(model: nn.Module, blocks: Dict[str, CompactBlock], batches: List[Batch],
                    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> Dict[str, torch.Tensor]:
    """Σ_batches (∂L/∂ξ_h)² for every head of every block (blocks with no head left are skipped)."""
    live = {name: block for name, block in blocks.items() if block.attn.num_heads > 0}
    device = next(model.parameters()).device
    masks = []
    for block in live.values():
        block.attn.head_mask = torch.ones(block.attn.num_heads, device=device, requires_grad=True)
        masks.append(block.attn.head_mask)
    try:
        scores = squared_gradients(model, masks, batches, loss_fn)
    finally:
        for block in live.values():
            block.attn.head_mask = None
    return dict(zip(live, scores))


def prune_heads_by_sensitivity(model: nn.Module, num_heads: int, batches: List[Batch],
                               towers: Sequence[str] = ("image",), layers: Optional[List[int]] = None,
                               heads_per_round: int = 1, normalize_per_layer: bool = True,
                               loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> nn.Module:
    """A copy of `model` with `num_heads` attention heads removed from the chosen towers/layers."""
    if num_heads < 0 or heads_per_round < 1:
        raise ValueError("--num-heads must be >= 0 and --heads-per-round >= 1")
    if not batches:
        raise ValueError("head pruning needs calibration batches (--calib-data)")
    model = clone(model)
    blocks = dict(compact_blocks(model, towers, layers))
    available = sum(block.attn.num_heads for block in blocks.values())
    if num_heads > available:
        raise ValueError(f"--num-heads {num_heads} exceeds the {available} heads of the chosen layers")
    removed = 0
    while removed < num_heads:
        scores = head_importance(model, blocks, batches, loss_fn)
        candidates = []
        for name, score in scores.items():
            if normalize_per_layer:
                score = score / score.norm().clamp_min(1e-30)
            candidates += [(float(s), name, h) for h, s in enumerate(score)]
        candidates.sort()
        doomed = candidates[:min(heads_per_round, num_heads - removed)]
        by_block: Dict[str, List[int]] = {}
        for _, name, head in doomed:
            by_block.setdefault(name, []).append(head)
        for name, heads in by_block.items():
            block = blocks[name]
            keep_heads(block, [h for h in range(block.attn.num_heads) if h not in heads])
            logging.info("pruned head(s) %s of %s (%d left)", heads, name, block.attn.num_heads)
        removed += len(doomed)
    return refresh_spec(model)
