"""Calibration gradients shared by the post-training tools (FWSVD, head sensitivity, Fisher pruning).

A calibration batch is a dict of preprocessed `image` and tokenized `text` tensors (the command lines read them
with `utils.posttrain.calibration_batches`). The loss whose gradients measure importance is CLIP's symmetric
contrastive loss on the batch (single process, no gather).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

Batch = Dict[str, Any]


def contrastive_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on one batch (the loss the model was trained with)."""
    device = next(model.parameters()).device
    image = F.normalize(model.encode_image(batch["image"].to(device)), dim=-1)
    text_input = batch["text"].to(device) if torch.is_tensor(batch["text"]) else batch["text"]
    text = F.normalize(model.encode_text(text_input), dim=-1)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else torch.tensor(100.0, device=device)
    logits = scale * image @ text.t()
    labels = torch.arange(len(logits), device=device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def squared_gradients(model: nn.Module, tensors: List[torch.Tensor], batches: Iterable[Batch],
                      loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> List[torch.Tensor]:
    """Σ over batches of (∂loss/∂t)² for each tensor t (empirical Fisher diagonal, batch-level gradients).

    The tensors must require grad; the model's own parameters keep whatever requires_grad they had.
    """
    totals = [torch.zeros_like(t) for t in tensors]
    was_training = model.training
    model.eval()  # dropout and token masking as at inference
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), tensors, allow_unused=True)
        for total, grad in zip(totals, grads):
            if grad is not None:
                total += grad.detach() ** 2
    model.train(was_training)
    return totals


def per_batch_gradients(model: nn.Module, tensors: List[torch.Tensor], batches: Iterable[Batch],
                        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> List[torch.Tensor]:
    """Gradients of each batch's loss, stacked: one (num_batches, *t.shape) tensor per t (for Fisher blocks)."""
    stacks: List[List[torch.Tensor]] = [[] for _ in tensors]
    was_training = model.training
    model.eval()
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), tensors, allow_unused=True)
        for stack, grad, tensor in zip(stacks, grads, tensors):
            stack.append(torch.zeros_like(tensor) if grad is None else grad.detach())
    model.train(was_training)
    return [torch.stack(stack) for stack in stacks]
