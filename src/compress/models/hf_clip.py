"""A local Hugging Face `CLIPModel` folder (config.json + weights) as the equivalent open_clip CLIP.

    model = load_hf_clip("checkpoints/clip-vit-base-patch32")          # `--pretrained hf:DIR` everywhere

The folder's config.json (read as JSON through transformers' CLIPConfig, which fills the defaults; no code is
run) becomes an open_clip config: embedding size; vision width, layers, head width, MLP ratio, patch and image
size; text context length, vocabulary, width, heads, layers, MLP ratio; `quick_gelu` for OpenAI's activation.
When a registered config (open_clip's or ours) is that same architecture, its name is used (ViT-B-32-quickgelu
for openai/clip-vit-base-patch32); otherwise the config is registered under a name derived from its content
(`hf-clip-<hash>`, foundation.model_configs) and the model's spec carries it (`model_cfg`), so checkpoints
written from it load anywhere.

Weights are read from `model.safetensors` (or its sharded index) or, failing that, `pytorch_model.bin` with
`weights_only=True`; the state dict is renamed and reshaped to open_clip's (separate q/k/v packed into
`in_proj`, projection matrices transposed) and loaded strictly: a key left over or missing is an error.

Text pooling: open_clip reads the text tower at the highest token id (CLIP's end-of-text is the highest id of its
vocabulary); Hugging Face reads it at the first `eos_token_id`. The two agree on any ids whose end-of-text token is
their largest, which is what both tokenizers produce.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from compress.models.registry import create_open_clip, open_clip_spec
from foundation.errors import UserError
from foundation.model_configs import register_inline_config, register_model_configs

PREFIX = "hf:"
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF act → open_clip quick_gelu (gelu: exact, as nn.GELU)


def is_hf_source(pretrained: Optional[str]) -> bool:
    return isinstance(pretrained, str) and pretrained.startswith(PREFIX)


def hf_folder(pretrained: str) -> Path:
    folder = Path(pretrained[len(PREFIX):] if is_hf_source(pretrained) else pretrained).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"--pretrained {pretrained}: {folder} is no Hugging Face model folder (no config.json)")
    return folder


def read_hf_config(folder: Path):
    """transformers' CLIPConfig of the folder (defaults filled in), refusing anything but a CLIPModel."""
    from transformers import CLIPConfig

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "clip":
        raise UserError(f"{folder}/config.json: model_type {raw.get('model_type')!r}, expected 'clip' "
                        "(a transformers CLIPModel)")
    return CLIPConfig.from_dict(raw)


def open_clip_config_from_hf(config) -> Dict[str, Any]:
    """The open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg) of a transformers CLIPConfig."""
    vision, text = config.vision_config, config.text_config
    acts = {vision.hidden_act, text.hidden_act}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise UserError(f"hidden_act {sorted(acts)}: open_clip has one activation for both towers, quick_gelu "
                        "or gelu")
    for tower in (vision, text):
        if abs(tower.layer_norm_eps - 1e-5) > 1e-12:
            raise UserError(f"layer_norm_eps {tower.layer_norm_eps}: open_clip's LayerNorm uses 1e-5")
        if tower.hidden_size % tower.num_attention_heads:
            raise UserError(f"hidden_size {tower.hidden_size} is not a multiple of {tower.num_attention_heads} heads")
    return {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "vision_cfg": {"image_size": int(vision.image_size), "layers": int(vision.num_hidden_layers),
                       "width": int(vision.hidden_size),
                       "head_width": int(vision.hidden_size // vision.num_attention_heads),
                       "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                       "patch_size": int(vision.patch_size)},
        "text_cfg": {"context_length": int(text.max_position_embeddings), "vocab_size": int(text.vocab_size),
                     "width": int(text.hidden_size), "heads": int(text.num_attention_heads),
                     "layers": int(text.num_hidden_layers), "mlp_ratio": text.intermediate_size / text.hidden_size},
    }


def _normalised(config: Dict[str, Any]) -> Optional[Tuple]:
    """A config with open_clip's defaults filled in, for comparing architectures (None: not a plain ViT CLIP)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    extra = {k: v for k, v in config.items() if k not in ("embed_dim", "quick_gelu", "vision_cfg", "text_cfg")}
    if any(extra.values()):  # custom_text, init_logit_bias, ...: not what a CLIPModel is
        return None
    try:
        vision = asdict(CLIPVisionCfg(**config["vision_cfg"]))
        text = asdict(CLIPTextCfg(**config["text_cfg"]))
    except (TypeError, KeyError):
        return None
    return (config["embed_dim"], bool(config.get("quick_gelu", False)), json.dumps(vision, sort_keys=True),
            json.dumps(text, sort_keys=True))


def architecture_name(config: Dict[str, Any], preferred: Optional[str] = None) -> str:
    """`preferred` if that registered config is this architecture, else the first registered one that is,
    else the content-derived name under which `config` is registered now."""
    import open_clip

    register_model_configs()
    wanted = _normalised(config)
    names = ([preferred] if preferred else []) + sorted(open_clip.list_models())
    for name in names:
        candidate = open_clip.get_model_config(name)
        if candidate is not None and _normalised(candidate) == wanted:
            return name
    return register_inline_config(config)


def read_hf_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """The folder's weights: safetensors (single file or sharded index), else pytorch_model.bin, weights_only."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json",
                                lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        index = folder / index_name
        if index.is_file():
            state: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(loader(str(folder / Path(shard).name)))  # a shard's bare name: never outside the folder
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin")


_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}
_TOP_NAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_TOWERS = {"vision_model.encoder.layers.": "visual.transformer.resblocks.",
           "text_model.encoder.layers.": "transformer.resblocks."}


def convert_state_dict(hf_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict under open_clip's names and shapes."""
    state: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    leftover = []
    for key, value in hf_state.items():
        if key.endswith("position_ids"):  # a buffer older transformers versions saved: arange, no weight
            continue
        if key in _TOP_NAMES:
            state[_TOP_NAMES[key]] = value
        elif key in _TRANSPOSED:
            state[_TRANSPOSED[key]] = value.t().contiguous()
        elif any(key.startswith(prefix) for prefix in _TOWERS):
            prefix = next(p for p in _TOWERS if key.startswith(p))
            index, rest = key[len(prefix):].split(".", 1)
            block = f"{_TOWERS[prefix]}{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, kind = rest.split(".")
                qkv.setdefault((block, kind), {})[projection] = value
                continue
            for hf_name, ours in _LAYER_NAMES.items():
                if rest.startswith(hf_name + "."):
                    state[block + ours + rest[len(hf_name):]] = value
                    break
            else:
                leftover.append(key)
        else:
            leftover.append(key)
    if leftover:
        raise UserError(f"Hugging Face weights with no open_clip counterpart: {leftover[:4]}")
    for (block, kind), parts in qkv.items():  # q, k, v rows stacked: nn.MultiheadAttention's packed in_proj
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise UserError(f"{block}: q/k/v {kind} incomplete ({sorted(parts)})")
        state[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return state


def load_hf_clip(pretrained: str, model_name: Optional[str] = None) -> nn.Module:
    """The open_clip CLIP equivalent to a local transformers CLIPModel folder (`hf:DIR` or DIR), weights loaded,
    with its `model_spec`. `model_name`, when given, must name the folder's architecture."""
    folder = hf_folder(pretrained)
    config = open_clip_config_from_hf(read_hf_config(folder))
    name = architecture_name(config, model_name)
    if model_name and name != model_name:
        raise UserError(f"--pretrained {pretrained} is architecture {name}, not {model_name}: pass --model {name}")
    model = create_open_clip(name)
    try:
        model.load_state_dict(convert_state_dict(read_hf_weights(folder)), strict=True)
    except RuntimeError as error:
        raise UserError(f"{folder}: weights do not fit their config ({str(error).splitlines()[0][:300]})") from None
    model.model_spec = open_clip_spec(name)
    logging.info("converted Hugging Face CLIPModel %s to open_clip %s", folder, name)
    return model.eval()
