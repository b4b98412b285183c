"""int8 quantisation of a model's Linears (any kind the project writes), stored as the `quantized` kind.

    quantized = quantize(model, scheme="int8_dynamic", towers=("image", "text"))

What is quantised: every plain nn.Linear that the chosen towers' forward calls. Which tower a Linear belongs to
is read from one dummy forward per tower (forward hooks), so the rule needs no attribute layout of any kind; a
convolutional or timm image tower has its Linears quantised like any other (ConvNeXt's MLPs, a timm ViT's blocks).
An open_clip CLIP (dense, UPop-pruned or compact) first has the open_clip transformer blocks of the chosen towers
converted to compact blocks
(exact: compress.models.compact_clip), so attention's q/k/v/out projections become separate Linears that can
be quantised; a dense block's nn.MultiheadAttention would otherwise keep them in float. A student's open_clip
ViT keeps its attention in float for the same reason (its MLPs and projection are quantised), and a ProtoRKD
student's frozen text encoder, which is not part of its weights, is never touched.

A re-parameterisable image tower (MobileCLIP's FastViT/MCi) being quantised is fused into its inference form first
(compress.models.reparameterize): its Linears are then those the deployed model calls, and the spec's
`reparameterized` makes the quantized checkpoint rebuild in that form.

Quantisation is the last step of a chain (prune, factorise, mask tokens, then quantize): the tools that
reshape blocks refuse a quantized model.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from compress.models.compact_clip import TOWERS, clone, compact_blocks, refresh_spec, transformer_towers
from compress.models.quantized import KIND, SCHEMES, quantizable_linears, quantized_spec, replace_linears
from compress.models.registry import get_tokenizer, preprocess_config
from compress.models.reparameterize import reparameterizable, reparameterized
from compress.ops.profile import default_text_input

# kinds whose transformer blocks are open_clip's and convert exactly to compact blocks
_COMPACTABLE = ("open_clip", "pruned_clip", "compact_clip")


def spec_image_size(spec: Dict) -> int:
    """Side of the square image the model takes (its preprocessing's image size; the height of a (height,
    width) one)."""
    size = preprocess_config(spec)["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def linears_by_tower(model: nn.Module) -> Dict[str, List[str]]:
    """Per tower ("image", "text"): module paths of the quantisable Linears its forward calls."""
    candidates = quantizable_linears(model)
    called: Dict[str, List[str]] = {}
    current: List[str] = []
    handles = [module.register_forward_hook(lambda module, args, out, name=name: current.append(name))
               for name, module in candidates.items()]
    param = next(model.parameters())
    size = spec_image_size(model.model_spec)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.encode_image(torch.zeros(2, 3, size, size, device=param.device))
            called["image"], current = list(dict.fromkeys(current)), []
            called["text"] = []
            if get_tokenizer(model.model_spec) is not None:  # None: an image-only model
                text = default_text_input(model, 2)
                model.encode_text(text.to(param.device) if torch.is_tensor(text) else text)
                called["text"] = list(dict.fromkeys(current))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return called


def quantize(model: nn.Module, scheme: str = "int8_dynamic", towers: Sequence[str] = TOWERS) -> nn.Module:
    """A copy of `model` whose Linears in `towers` hold int8 weights (compress.models.quantized), with a
    `quantized` spec wrapping the float model's spec. The input is left as it was."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    unknown = sorted(set(towers) - set(TOWERS))
    if unknown or not towers:
        raise ValueError(f"--towers {','.join(towers)}: choose from {', '.join(TOWERS)}")
    spec = getattr(model, "model_spec", None) or {}
    if spec.get("kind") == KIND:
        raise ValueError("this model is already quantized")
    model = clone(model)
    # the inference form of an image tower being quantised, equal in eval mode (BatchNorm's running statistics fold
    # into the convolutions, to float rounding); --towers text leaves the image tower exactly as it was
    fused = "image" in towers and reparameterizable(model)
    if fused:
        reparameterized(model)
    if spec.get("kind") in _COMPACTABLE:  # the same function, with q/k/v/out as separate Linears
        for _ in compact_blocks(model, [tower for tower in towers if tower in transformer_towers(model)]):
            pass
        refresh_spec(model)
    by_tower = linears_by_tower(model)
    chosen = list(dict.fromkeys(name for tower in towers for name in by_tower[tower]))
    if not chosen:
        raise ValueError(f"the {' and '.join(towers)} tower(s) of this {spec.get('kind')} model call no "
                         "quantisable nn.Linear")
    base = model.model_spec
    replace_linears(model, chosen, scheme, convert=True)
    model.model_spec = quantized_spec(base, scheme, chosen, reparameterized=fused)
    return model
