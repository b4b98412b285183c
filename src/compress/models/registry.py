"""Rebuild any model this project writes from the `model_spec` stored in its checkpoint.

Every checkpoint we write carries `model_spec`, a small JSON-able dict with a `kind` plus whatever that
kind needs to rebuild the architecture (a pruned model's per-layer widths, a student's backbone name…).
A kind registers a builder here; `load(path)` then rebuilds and fills any model in one call, and the eval
entry point scores it. Every model we build offers the open_clip interface:
`encode_image(images, normalize=False)` and `encode_text(tokens, normalize=False)`.

Builders live beside the code that creates the model (compress/models/*.py); importing any module of
`compress.models` runs the package's __init__, which imports every kind module, so every kind is registered
before `build_model` is first called.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable

import torch
from torch import nn

from compress.models.spec import SpecError, validate_spec
from foundation.checkpoint import load_checkpoint
from foundation.logs import open_clip_chatter
from foundation.model_configs import inline_config, register_model_configs

ModelBuilder = Callable[[Dict[str, Any]], nn.Module]
MODEL_KINDS: Dict[str, ModelBuilder] = {}
# kinds that wrap another kind's spec under "base" and keep its inputs (tokenizer, image transform): the
# quantized kind (compress.models.quantized) adds itself
WRAPPER_KINDS: set = set()


def input_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The spec that says what the model takes (tokenizer, preprocessing): a wrapper kind's base spec."""
    while spec.get("kind") in WRAPPER_KINDS:
        spec = spec["base"]
    return spec


def register_model_kind(kind: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: `@register_model_kind("pruned_clip") def build(spec): ...`."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        MODEL_KINDS[kind] = builder
        return builder

    return decorate


def build_model(spec: Dict[str, Any], allowed_text_encoders: Iterable[str] = ()) -> nn.Module:
    """The architecture described by `spec`, randomly initialised, with `model.model_spec` set.

    The spec is validated first (`compress.models.spec`: a spec is untrusted data), and the model is built
    from, and carries, the validated copy: no key a schema does not know reaches a builder or a file we write.
    `allowed_text_encoders`: text-encoder names or weights files the caller itself chose (a flag), which a
    spec may then name besides the bundled default.
    """
    spec = validate_spec(spec, allowed_text_encoders)
    model = MODEL_KINDS[spec["kind"]](spec)
    model.model_spec = spec
    return model


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """DDP prefixes every key with `module.`; our files never carry it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load(path_or_checkpoint: str | Dict[str, Any], device: str | torch.device = "cpu",
         allowed_text_encoders: Iterable[str] = ()) -> nn.Module:
    """Rebuild and fill the model of one of our checkpoints, in eval mode (its spec validated, see build_model)."""
    checkpoint = (
        load_checkpoint(path_or_checkpoint)
        if isinstance(path_or_checkpoint, (str, bytes)) or hasattr(path_or_checkpoint, "__fspath__")
        else path_or_checkpoint
    )
    if not isinstance(checkpoint, dict) or "model_spec" not in checkpoint:
        raise SpecError("not a clipcompress checkpoint: it has no 'model_spec' entry")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise SpecError("checkpoint's state_dict is not a mapping of tensors")
    model = build_model(checkpoint["model_spec"], allowed_text_encoders)
    try:
        model.load_state_dict(strip_module_prefix(state_dict))
    except RuntimeError as e:  # shapes that do not match the spec: one line, not torch's page of keys
        raise SpecError(f"checkpoint's state_dict does not fit its model_spec ({str(e).splitlines()[0][:300]})")
    return model.to(device).eval()


# --- the dense open_clip kind --------------------------------------------------------------------


def open_clip_spec(model_name: str) -> Dict[str, Any]:
    """Spec of a stock open_clip model (any config name, ours included). A config that no file describes (a
    Hugging Face folder's architecture, compress.models.hf_clip) travels in the spec as `model_cfg`."""
    spec = {"kind": "open_clip", "model": model_name}
    config = inline_config(model_name)
    if config is not None:
        spec["model_cfg"] = config
    return spec


def create_open_clip(model_name: str, **model_kwargs: Any) -> nn.Module:
    """open_clip's `model_name` architecture, randomly initialised, for a builder whose weights come next.

    open_clip logs on the root logger that such a model "initialized randomly"; the weights `load` puts in
    right after make that false news, so its build chatter is filtered while this one build runs (a
    root-logger filter: open_clip's records are created there, so no handler, pytest's included, sees them).
    """
    import open_clip

    register_model_configs()
    root = logging.getLogger()
    root.addFilter(open_clip_chatter)
    try:
        return open_clip.create_model(model_name, pretrained=None, **model_kwargs)
    finally:
        root.removeFilter(open_clip_chatter)


@register_model_kind("open_clip")
def _build_open_clip(spec: Dict[str, Any]) -> nn.Module:
    return create_open_clip(spec["model"], **spec.get("model_kwargs", {}))


# --- tokenizer and image transform of a spec ----------------------------------------------------


def get_tokenizer(spec: Dict[str, Any]) -> Callable[[list], Any]:
    """Callable turning a list of captions into what the model's `encode_text` takes.

    Default: the open_clip tokenizer of `spec["tokenizer_model"]` or `spec["model"]`. A spec whose
    text side is a sentence-transformers model says `"text_input": "strings"`: its encode_text
    tokenises by itself, so captions pass through unchanged. `"text_input": "none"`: the model has no text
    side; None.
    """
    spec = input_spec(spec)
    if spec.get("text_input") == "strings":
        return lambda texts: list(texts)
    if spec.get("text_input") == "none":  # an image-only model (a student of an image teacher)
        return None
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(spec.get("tokenizer_model", spec.get("model")))


def get_preprocess(spec: Dict[str, Any]) -> Callable:
    """Eval-time image transform (resize, centre crop, normalise) of a spec."""
    import open_clip
    from open_clip.transform import image_transform

    register_model_configs()
    spec = input_spec(spec)
    cfg = spec.get("preprocess")
    if cfg is None:
        model_name = spec.get("preprocess_model", spec.get("model"))
        model_cfg = open_clip.get_model_config(model_name) or {}
        vision = model_cfg.get("vision_cfg", {})
        cfg = {
            "image_size": vision.get("image_size", 224),
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
        }
    return image_transform(cfg["image_size"], is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
