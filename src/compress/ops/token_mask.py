"""FLIP-style token masking at inference: the image tower sees only a fraction 1 − p of its patch tokens.

open_clip adds the positional embedding to every token *before* its `patch_dropout` hook, and timm's ViT (SigLIP's
image tower) before its `patch_drop` hook, so dropping tokens there keeps each kept patch with its own positional
embedding, and the prefix tokens (open_clip's class token, timm's `num_prefix_tokens`: none in SigLIP; never
dropped) with theirs — the off-by-one of casCLIP's implementation cannot happen. Unlike open_clip's and timm's
PatchDropout (training only, unseeded), `TokenMask` acts in eval mode and is seeded, and the tokens an image
keeps are a function of that image and the seed alone (a keyed hash of its pixels seeds its draw): embedded
alone or anywhere in any batch, an image gets the same feature. p = 0 is the identity.

    python -m utils.token_mask --model clipc-vit-t2-64 --pretrained CKPT --out RUN_DIR --drop 0.5
"""
from __future__ import annotations

from torch import nn

from compress.models.compact_clip import TokenMask, clone, install_token_mask, refresh_spec


def mask_tokens(model: nn.Module, drop: float, seed: int = 0) -> nn.Module:
    """A copy of `model` whose image tower keeps a fraction 1 − drop of each image's patch tokens at inference.
    ValueError for an image tower without a patch-dropout hook (compact_clip.token_mask_site: a ResNet, ConvNeXt
    or FastViT): the mask would change nothing there."""
    model = clone(model)
    install_token_mask(model.visual, TokenMask(drop, seed, per_image=True))  # refuses a tower it cannot mask
    return refresh_spec(model)
