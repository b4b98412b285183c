"""An open_clip CLIP from a config name and pretrained weights: the one builder the trainer's jobs, eval and
the post-training tools share (a checkpoint of ours is rebuilt from its spec instead: compress.load).

    model = create_clip("ViT-B-32", "weights/ViT-B-32-openai.pt")      # model.model_spec, its preprocessing
    transform = compress.get_preprocess(model.model_spec)              # the config's mean/std/resize
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn

from compress.models.hf_clip import is_hf_source, load_hf_clip
from compress.models.registry import open_clip_preprocess, open_clip_spec, to_preprocess_cfg
from foundation.errors import UserError
from foundation.model_configs import register_model_configs


class ModelSourceError(UserError, ValueError):
    """A model name or weights source `create_clip` cannot build from (one line; a ValueError too, as eval's
    callers handle a bad source)."""


QUICKGELU_SUFFIX = "-quickgelu"


def config_for_weights(model_name: str, pretrained: Optional[str]) -> str:
    """The config that open_clip tag `pretrained` must be built with when asked for as `model_name`: the
    activation is part of what the weights were trained with, and open_clip itself only warns ("QuickGELU
    mismatch") when the config has the other one. OpenAI's weights (and a few LAION ones) were trained with
    QuickGELU: `ViT-B-32` + `openai` gives `ViT-B-32-quickgelu`, open_clip's config for them (what
    open_clip_train's README has its users type, and what open_clip 2 built for `--pretrained openai`).

    Anything that is not a tag of `model_name` or its twin (a file, hf:DIR, no weights) is returned as is.
    Raises ModelSourceError (one line naming the config to pass) where no config with the tag's activation
    exists."""
    import open_clip

    if not model_name or not pretrained:
        return model_name
    register_model_configs()
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    base = model_name[:-len(QUICKGELU_SUFFIX)] if model_name.endswith(QUICKGELU_SUFFIX) else None
    if not tag:
        base_tag = open_clip.get_pretrained_cfg(base, pretrained) if base else {}
        if base_tag and not base_tag.get("quick_gelu", False):  # a GELU tag asked for in the QuickGELU twin
            raise ModelSourceError(f"--pretrained {pretrained} weights of {base} were trained with GELU, not "
                                   f"QuickGELU: pass --model {base}, not {model_name}")
        return model_name
    wants_quick = bool(tag.get("quick_gelu", False))
    if wants_quick == bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False)):
        return model_name
    twin = (model_name + QUICKGELU_SUFFIX) if wants_quick else base
    if twin and open_clip.get_pretrained_cfg(twin, pretrained):
        return twin
    activation = "QuickGELU" if wants_quick else "GELU"
    raise ModelSourceError(f"--pretrained {pretrained} weights of {model_name} were trained with {activation}, which "
                           f"the {model_name} config does not use, and open_clip has no {model_name}"
                           f"{QUICKGELU_SUFFIX if wants_quick else ''} config with this tag: pass a --model config "
                           f"with quick_gelu {'true' if wants_quick else 'false'} (e.g. a copy of {model_name}'s "
                           f"in src/foundation/configs/)")


def create_clip(model_name: Optional[str], pretrained: Optional[str] = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip CLIP by config name (any config, ours included), with weights, on `device`: the one
    builder of a model from a name, for training and eval alike.

    `pretrained` is a local file (ours, open_clip's, or OpenAI's), `hf:DIR` (a local transformers CLIPModel
    folder, converted: compress.models.hf_clip; then `model_name` may be None or must name its architecture)
    or, when online, an open_clip tag such as `laion2b_s34b_b79k` (a tag trained with QuickGELU builds the
    `-quickgelu` config: `config_for_weights`). The model carries its `model_spec`, and
    its image preprocessing is `open_clip_preprocess(model_name, pretrained)`: the spec records it where the
    architecture name alone implies other preprocessing (a tag's own), so `get_preprocess` of the spec, which
    the trainer and eval both use, is always this build's.
    """
    import open_clip

    if is_hf_source(pretrained):
        return load_hf_clip(pretrained, model_name).to(device)
    register_model_configs()
    chosen = config_for_weights(model_name, pretrained)
    if chosen != model_name:
        logging.info("--pretrained %s was trained with QuickGELU: building %s, not %s", pretrained, chosen,
                     model_name)
        model_name = chosen
    if model_name not in open_clip.list_models():
        raise ModelSourceError(f"unknown --model {model_name!r}: neither an open_clip model config nor one of ours "
                               "(see open_clip.list_models() or src/foundation/configs/)")
    if (pretrained and not os.path.exists(pretrained) and "://" not in pretrained
            and not pretrained.startswith("hf-hub:")):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ModelSourceError(f"--pretrained {pretrained!r} is neither a file nor a tag of {model_name} "
                                   f"({tags or 'none'})")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    except Exception as e:  # not a checkpoint (UnpicklingError), truncated, wrong shapes (RuntimeError)…
        reason = str(e).splitlines()[0][:300] if str(e) else ""
        raise ModelSourceError(f"cannot load --pretrained {pretrained} into {model_name} "
                               f"({type(e).__name__}: {reason})")
    if pretrained:
        logging.info("loaded %s weights from %s", model_name, pretrained)
    spec = open_clip_spec(model_name)
    preprocess = open_clip_preprocess(model_name, pretrained)
    if preprocess != open_clip_preprocess(model_name):
        spec["preprocess"] = preprocess
    open_clip.set_model_preprocess_cfg(model, to_preprocess_cfg(preprocess))
    model.model_spec = spec
    return model
