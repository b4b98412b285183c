"""Building the models a job trains: open_clip CLIPs by name, with a tag or a local weights file."""
from __future__ import annotations

import logging
import os
from typing import Optional

from torch import nn

from compress.models.hf_clip import is_hf_source, load_hf_clip
from compress.models.registry import open_clip_spec
from foundation.errors import UserError
from foundation.model_configs import register_model_configs


def create_clip(model_name: str, pretrained: Optional[str] = None) -> nn.Module:
    """An open_clip model (any config, ours included). `pretrained` is a local file (ours, open_clip's,
    or OpenAI's), `hf:DIR` (a local transformers CLIPModel folder, converted: compress.models.hf_clip; then
    `model_name` must name its architecture) or, when online, an open_clip tag such as `laion2b_s34b_b79k`."""
    import open_clip

    if is_hf_source(pretrained):
        return load_hf_clip(pretrained, model_name)
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown --model {model_name!r}; see open_clip.list_models() or src/foundation/configs/")
    if (pretrained and not os.path.exists(pretrained) and "://" not in pretrained
            and not pretrained.startswith("hf-hub:")):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise UserError(f"--pretrained {pretrained!r} is neither a file nor a tag of {model_name} "
                            f"({tags or 'none'})")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None)
    except Exception as e:  # not a checkpoint (UnpicklingError), truncated, wrong shapes (RuntimeError)…
        reason = str(e).splitlines()[0][:300] if str(e) else ""
        raise UserError(f"cannot load --pretrained {pretrained} into {model_name} ({type(e).__name__}: {reason})")
    if pretrained:
        logging.info("loaded %s weights from %s", model_name, pretrained)
    model.model_spec = open_clip_spec(model_name)
    return model


def lock_towers(model: nn.Module, args) -> None:
    """`--lock-image` / `--lock-text` freeze a tower (LiT). Works on a standard CLIP without extra flags:
    open_clip_train asserts there unless --lock-text-freeze-layer-norm is also given."""
    if getattr(args, "lock_image", False):
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if getattr(args, "lock_text", False):
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers, freeze_layer_norm=True)
