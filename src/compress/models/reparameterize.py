"""A re-parameterisable image tower in its inference form: MobileCLIP's FastViT/MCi trains with parallel branches
(MobileOne's conv + scale + identity BatchNorm branches, RepMixer's mixing and layer scale) that fuse into one
convolution each, the same function with fewer, plainer layers. timm's `reparameterize_model` does the fusing; this
module says which models it changes, and is the one place the project calls it: int8 quantisation fuses before it
quantises (compress.ops.quantize, and a quantized checkpoint rebuilds fused: compress.models.quantized), and every
export fuses the graph it writes (compress.ops.export)."""
from __future__ import annotations

from torch import nn


def reparameterizable(model: nn.Module) -> bool:
    """Whether `model` has an image tower with re-parameterisable blocks (timm's `reparameterize` or `fuse`
    methods: MobileCLIP's FastViT/MCi)."""
    visual = getattr(model, "visual", None)
    return visual is not None and any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in visual.modules())


def reparameterized(model: nn.Module) -> nn.Module:
    """In place: the re-parameterisable blocks of `model`'s image tower fused into their inference form (timm's
    `reparameterize_model`; computed from BatchNorm running statistics, so equal to the unfused tower in eval
    mode); any other model is left as it is. Fusing a fused tower changes nothing."""
    if reparameterizable(model):
        from timm.utils import reparameterize_model

        model.visual = reparameterize_model(model.visual, inplace=True)
    return model
