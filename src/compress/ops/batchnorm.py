"""Re-estimating a network's BatchNorm statistics on sample inputs ("precise BN").

In train mode a BatchNorm layer normalises with each batch's own statistics and keeps an exponential moving
average of them for eval mode. When the weights move fast — a student distilled for a few hundred steps at a
high learning rate — that average trails the network it describes, and in eval mode the layers normalise
with statistics that no longer fit: a MobileNetV3 student whose train-mode features matched its teacher
(cosine 0.98) gave constant eval-mode features (std 1e-6) and chance zero-shot accuracy. Recomputing the
statistics of the final weights as a plain average over sample batches makes eval mode see what train mode
saw.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def trained_batchnorms(model: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm layers whose statistics training updates: those in train mode once `model.train()` is
    set (a frozen backbone keeps its layers in eval mode, and its statistics) that track running statistics."""
    was_training = {module: module.training for module in model.modules()}
    model.train()
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for module, mode in was_training.items():
        module.training = mode
    return layers


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> int:
    """Replace the running statistics of `trained_batchnorms(model)` by their average over `batches`
    (`forward(batch)` runs the part of the model that holds them). Only those layers are in train mode
    meanwhile: dropout and every other layer act as at inference (and draw no random numbers). Every module's
    mode and each layer's momentum are restored afterwards. Returns the number of batches used; with none,
    nothing changes."""
    layers = trained_batchnorms(model)
    if not layers:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = [layer.momentum for layer in layers]
    used = 0
    try:
        for module in model.modules():
            module.training = False
        for batch in batches:
            if used == 0:
                for layer in layers:
                    layer.reset_running_stats()
                    layer.momentum = None  # a cumulative average: every batch weighs the same
                    layer.training = True
            forward(batch)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    return used
