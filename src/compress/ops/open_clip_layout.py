"""A model in open_clip's own `local-dir` layout, which open_clip loads with nothing of this project:

    write_open_clip_dir(model, "deploy/openclip")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:deploy/openclip")
    tokenizer = open_clip.get_tokenizer("local-dir:deploy/openclip")

The folder holds what open_clip's factory reads there: `open_clip_config.json` (`model_cfg`, the architecture,
and `preprocess_cfg`, written by open_clip's own `save_config_for_hf`), the weights as
`open_clip_model.safetensors` (the file name it looks for first), and the tokenizer's files when the tokenizer
is a Hugging Face one (open_clip's CLIP BPE tokenizer needs none: local-dir builds it from the config's context
length). open_clip's `save_for_hf` would write the same files, but it always calls the tokenizer's
`save_pretrained`, which the CLIP BPE tokenizer has not.

open_clip's config describes one architecture per tower: one width, one head count and head width, one MLP
ratio, plain Linears. So the layout holds the `open_clip` kind, and compact_clip/pruned_clip models that still
have that form (text layers dropped; MLPs cut to one width across a tower): every block keeps every head at
the tower's head width, no factorised Linear, no token mask. Anything else is refused with one line.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from compress.models.compact_clip import (
    QKV_LINEARS,
    CompactBlock,
    timm_block_shape,
    timm_compact_names,
    tower_blocks,
    tower_prefix,
    transformer_towers,
)
from compress.models.registry import get_tokenizer, open_clip_preprocess, sized_model, to_preprocess_cfg
from foundation.checkpoint import atomic_write
from foundation.errors import UserError
from foundation.model_configs import register_model_configs

EXPRESSIBLE = ("open_clip", "compact_clip", "pruned_clip")
WHICH = ("open_clip's layout holds the open_clip kind, and compact_clip/pruned_clip models whose blocks keep every "
         "head at full width, one MLP width per tower, no factorised Linear and no token mask")


class LayoutError(UserError, ValueError):
    """A model open_clip's config cannot describe, or a preprocessing its config cannot carry."""


def _apply_model_kwargs(cfg: Dict[str, Any], kwargs: Dict[str, Any]) -> None:
    """In place: the spec's open_clip.create_model overrides (spec.MODEL_KWARGS), written into the config as
    open_clip's factory applies them."""
    if kwargs.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    if kwargs.get("force_custom_text"):
        cfg["custom_text"] = True
    for key, tower, field in (("force_patch_dropout", "vision_cfg", "patch_dropout"),
                              ("force_image_size", "vision_cfg", "image_size"),
                              ("force_context_length", "text_cfg", "context_length")):
        if kwargs.get(key) is not None:
            cfg[tower][field] = kwargs[key]


def _timm_tower_form(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """In place: `state`'s timm ViT or EVA image tower entries under timm's names again (q/k/v packed into a fused
    `qkv` where the architecture has one); LayoutError if a block differs from the architecture: open_clip's config
    names a timm model, which has one shape, so only an unresized timm tower has an open_clip form."""
    spec = model.model_spec
    dense = sized_model({"kind": "open_clip", "model": spec["model"], "model_kwargs": spec.get("model_kwargs", {})})
    reference, prefix = tower_blocks(dense, "image"), tower_prefix(model, "image")
    for index, (block, original) in enumerate(zip(tower_blocks(model, "image"), reference)):
        name = f"{prefix}.{index}"
        if not isinstance(block, CompactBlock):
            continue
        shape, architecture = block.describe(), {**timm_block_shape(original), "ranks": {}}
        if shape != architecture:
            raise LayoutError(f"{name} has {shape['heads']} heads of width {shape['head_dim']}, MLP width "
                              f"{shape['mlp_width']}{', factorised Linears' if shape['ranks'] else ''}, where the "
                              f"timm architecture {type(model.visual.trunk).__name__} of its config has "
                              f"{architecture['heads']} of width {architecture['head_dim']}, MLP width "
                              f"{architecture['mlp_width']}: {WHICH}")
        compact = {key[len(name) + 1:]: state.pop(key) for key in [k for k in state if k.startswith(f"{name}.")]}
        for dense_key, compact_key in timm_compact_names(original).items():
            if compact_key.startswith("attn.in_proj_"):
                part = compact_key.rsplit("_", 1)[1]
                compact_value = torch.cat([compact.pop(f"attn.{q}.{part}") for q in QKV_LINEARS])
            else:
                compact_value = compact.pop(compact_key)
            state[f"{name}.{dense_key}"] = compact_value


def _tower_form(model: nn.Module, tower: str, tower_cfg: Dict[str, Any], state: Dict[str, torch.Tensor]) -> None:
    """In place: `tower_cfg` given the tower's layer count and MLP width, `state` its blocks' entries under
    open_clip's names (q/k/v packed into `in_proj_*`); LayoutError if a block has no open_clip form. A tower
    without transformer blocks (a ResNet, ConvNeXt, FastViT, EVA) is as the config builds it."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if tower not in transformer_towers(model):
        return
    prefix = tower_prefix(model, tower)
    if prefix.startswith("visual.trunk."):
        _timm_tower_form(model, state)
        return
    blocks = tower_blocks(model, tower)
    width = tower_cfg["width"]
    if tower == "image":
        heads = width // CLIPVisionCfg(**tower_cfg).head_width
    else:
        heads = CLIPTextCfg(**tower_cfg).heads
    mlp_widths = set()
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        if not isinstance(block, CompactBlock):
            mlp_widths.add(block.mlp.c_fc.out_features)
            continue
        shape = block.describe()
        if shape["ranks"]:
            raise LayoutError(f"{name} has factorised Linears ({', '.join(sorted(shape['ranks']))}): {WHICH}")
        if "scale" in shape or shape["heads"] != heads or shape["heads"] * shape["head_dim"] != width:
            raise LayoutError(f"{name} has {shape['heads']} heads of width {shape['head_dim']} where open_clip's "
                              f"config has {heads} of width {width // heads}: {WHICH}")
        mlp_widths.add(shape["mlp_width"])
        attn = f"{name}.attn."
        for part in ("weight", "bias"):
            state[f"{attn}in_proj_{part}"] = torch.cat([state.pop(f"{attn}{q}.{part}") for q in QKV_LINEARS])
    if len(mlp_widths) > 1:
        raise LayoutError(f"the {tower} tower's MLPs have widths {sorted(mlp_widths)}: {WHICH}")
    (mlp_width,) = mlp_widths
    ratio = mlp_width / width
    if int(width * ratio) != mlp_width:
        raise LayoutError(f"the {tower} tower's MLP width {mlp_width} is no ratio of its width {width} that open_clip "
                          "rounds back to it")
    tower_cfg["layers"] = len(blocks)
    if int(width * (CLIPVisionCfg if tower == "image" else CLIPTextCfg)(**tower_cfg).mlp_ratio) != mlp_width:
        tower_cfg["mlp_ratio"] = ratio


def open_clip_form(model: nn.Module) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(open_clip model_cfg, state dict under open_clip's names) of `model`; LayoutError where its config has
    no form for the model."""
    import open_clip

    spec = model.model_spec
    kind = spec["kind"]
    if kind not in EXPRESSIBLE:
        raise LayoutError(f"a {kind} model has no open_clip config: {WHICH} (export it as safetensors, "
                          "torch_export or onnx)")
    register_model_configs()
    cfg = copy.deepcopy(spec.get("model_cfg") or open_clip.get_model_config(spec["model"]))
    _apply_model_kwargs(cfg, spec.get("model_kwargs", {}))
    state = {name: tensor.detach().float().contiguous() if tensor.is_floating_point() else tensor.detach()
             for name, tensor in model.state_dict().items()}
    if kind != "open_clip":
        if spec.get("token_mask"):
            raise LayoutError(f"this model masks image tokens (FLIP), which open_clip's config cannot say: {WHICH}")
        _tower_form(model, "image", cfg["vision_cfg"], state)
        _tower_form(model, "text", cfg["text_cfg"], state)
    return cfg, state


def spec_preprocess_cfg(spec: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip's PreprocessCfg dict of the image transform `get_preprocess(spec)` builds."""
    recorded = spec.get("preprocess") or open_clip_preprocess(spec.get("preprocess_model", spec.get("model")),
                                                              model_kwargs=spec.get("model_kwargs"))
    return to_preprocess_cfg(recorded)


def write_open_clip_dir(model: nn.Module, out_dir: str | Path) -> Dict[str, Any]:
    """Write `model` in open_clip's local-dir layout into `out_dir`; returns the config written."""
    import safetensors.torch
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg, state = open_clip_form(model)
    preprocess = spec_preprocess_cfg(model.model_spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_config_for_hf reads the preprocessing off the model's image tower, where open_clip's factory puts it
    # (open_clip.model.set_model_preprocess_cfg): handed over that way, the model itself stays untouched
    tower = nn.Module()
    tower.image_mean, tower.image_std, tower.preprocess_cfg = preprocess["mean"], preprocess["std"], preprocess
    holder = nn.Module()
    holder.visual = tower
    save_config_for_hf(holder, out_dir / HF_CONFIG_NAME, model_config=cfg)
    written = json.loads((out_dir / HF_CONFIG_NAME).read_text())
    # what local-dir rebuilds: open_clip's defaults, the written preprocess_cfg, the architecture's image size
    rebuilt = merge_preprocess_dict(PreprocessCfg(), written["preprocess_cfg"])
    rebuilt["size"] = cfg["vision_cfg"]["image_size"]
    for key, value in preprocess.items():
        if _plain(rebuilt.get(key)) != _plain(value):
            (out_dir / HF_CONFIG_NAME).unlink()
            raise LayoutError(f"the model's preprocessing has {key} {_plain(value)!r}; open_clip's local-dir would "
                              f"use {_plain(rebuilt.get(key))!r}")
    atomic_write(out_dir / HF_SAFE_WEIGHTS_NAME,
                 lambda f: f.write(safetensors.torch.save(state, metadata={"format": "pt"})))
    tokenizer = get_tokenizer(model.model_spec)
    if hasattr(tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: local-dir reads its files from here
        tokenizer.save_pretrained(str(out_dir))
    return written


def _plain(value: Any) -> Any:
    """Tuples as lists, numbers as floats: a config value as it reads back from JSON, for comparing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def check_open_clip_dir(model: nn.Module, out_dir: str | Path, batch: int = 3) -> Dict[str, float]:
    """What open_clip makes of `out_dir` (`create_model_and_transforms` and `get_tokenizer` of local-dir) against
    `model`: max |difference| of the normalised features, of the preprocessed pixels of one image, and of the
    token ids of the same captions."""
    import open_clip
    from PIL import Image

    from compress.models.registry import get_preprocess
    from compress.ops.export import compare_features

    source = f"local-dir:{out_dir}"
    loaded, _, preprocess = open_clip.create_model_and_transforms(source)
    diffs = compare_features(model, loaded.eval(), batch)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8, generator=generator).numpy()
    image = Image.fromarray(pixels)
    diffs["preprocess"] = float((preprocess(image) - get_preprocess(model.model_spec)(image)).abs().max())
    captions = ["a photo of a cat", "two green triangles on white"]
    ours, theirs = get_tokenizer(model.model_spec)(captions), open_clip.get_tokenizer(source)(captions)
    diffs["tokens"] = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
    return diffs
