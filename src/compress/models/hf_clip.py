"""A local Hugging Face `CLIPModel` folder (config.json + weights) as the equivalent open_clip CLIP.

    model = load_hf_clip("checkpoints/clip-vit-base-patch32")          # `--pretrained hf:DIR` everywhere

The folder's config.json (read as JSON through transformers' CLIPConfig, which fills the defaults; no code is
run) becomes an open_clip config: embedding size; vision width, layers, head width, MLP ratio, patch and image
size; text context length, vocabulary, width, heads, layers, MLP ratio; `quick_gelu` for OpenAI's activation.
When a registered config (open_clip's or ours) is that same architecture, its name is used (ViT-B-32-quickgelu
for openai/clip-vit-base-patch32); otherwise the config is registered under a name derived from its content
(`hf-clip-<hash>`, foundation.model_configs) and the model's spec carries it (`model_cfg`), so checkpoints
written from it load anywhere.

The folder is untrusted input, and every refusal below is one line (a UserError):
 * config.json is read from a regular file of at most `MAX_JSON_BYTES`, as strict UTF-8 JSON that must be an
   object; every field the conversion uses must be a positive integer (`TOWER_FIELDS`: no zero heads, no
   string sizes), and the open_clip config they make must meet the bounds of a spec's `model_cfg`
   (compress.models.spec), all before anything is built;
 * weights are read from safetensors only (`model.safetensors`, or the shards its index names): a pickle
   (`pytorch_model.bin`) is refused, whatever torch's weights_only would let through. The index is JSON of at
   most `MAX_JSON_BYTES`, and each shard it names must be a bare file name inside the folder;
 * every safetensors header is checked (foundation.weights) and its tensors' shapes, renamed, are compared
   with the model the config builds, made on the `meta` device (no memory), before the model is built or a
   weight read: a config that would build terabytes cannot, unless the folder holds those terabytes.

The state dict is renamed and reshaped to open_clip's (separate q/k/v packed into `in_proj`, projection
matrices transposed) and loaded strictly: a key left over or missing is an error.

Text pooling: open_clip reads the text tower at the highest token id (CLIP's end-of-text is the highest id of its
vocabulary); Hugging Face reads it at the first `eos_token_id`. The two agree on any ids whose end-of-text token is
their largest, which is what both tokenizers produce.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from compress.models import spec as schema
from compress.models.registry import create_open_clip, open_clip_spec, sized_model
from foundation.errors import UserError
from foundation.files import read_json
from foundation.model_configs import register_inline_config, register_model_configs
from foundation.weights import load_safetensors, safetensors_header

PREFIX = "hf:"
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # HF act → open_clip quick_gelu (gelu: exact, as nn.GELU)


def is_hf_source(pretrained: Optional[str]) -> bool:
    return isinstance(pretrained, str) and pretrained.startswith(PREFIX)


def hf_folder(pretrained: str) -> Path:
    folder = Path(pretrained[len(PREFIX):] if is_hf_source(pretrained) else pretrained).expanduser()
    if not (folder / "config.json").exists():  # one that is no regular file is refused when read
        raise UserError(f"--pretrained {pretrained}: {folder} is no Hugging Face model folder (no config.json)")
    return folder


# config.json and model.safetensors.index.json: a few KB in any real folder
MAX_JSON_BYTES = 1 << 20
MAX_SHARDS = 1024
# The fields of each tower's transformers config the conversion reads: positive integers, checked before
# transformers reads them (it divides by the heads). Their bounds are the spec's own: the open_clip config they
# become is checked against the `model_cfg` schema (compress.models.spec), which a checkpoint's spec meets too.
POSITIVE = schema.integer(1)
TOWER_FIELDS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                      "image_size"),
    "text_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                    "max_position_embeddings", "vocab_size"),
}
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_hf_config(folder: Path):
    """transformers' CLIPConfig of the folder (defaults filled in), refusing anything but a CLIPModel."""
    from transformers import CLIPConfig

    path = folder / "config.json"
    raw = read_json(path, MAX_JSON_BYTES, "CLIPModel config")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a JSON {type(raw).__name__}, not an object (a CLIPModel config)")
    if raw.get("model_type") != "clip":
        raise UserError(f"{path}: model_type {str(raw.get('model_type'))[:80]!r}, expected 'clip' "
                        "(a transformers CLIPModel)")
    for tower, fields in TOWER_FIELDS.items():
        given = raw.get(tower, {})
        if not isinstance(given, dict):
            raise UserError(f"{path}: {tower} is a {type(given).__name__}, not an object")
        for name in sorted(set(fields) & given.keys()):
            schema.validate(POSITIVE, given[name], f"config.json: {tower}.{name}")
    try:
        return CLIPConfig.from_dict(raw)
    except Exception as e:  # noqa: BLE001 (transformers' checks of the fields it knows)
        raise UserError(f"{path}: not a CLIPModel config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _checked_fields(config) -> Dict[str, Dict[str, int]]:
    """The fields of TOWER_FIELDS, each a positive integer (a SpecError names it)."""
    checked = {}
    for tower, fields in TOWER_FIELDS.items():
        sub = getattr(config, tower)
        checked[tower] = {name: schema.validate(POSITIVE, getattr(sub, name, None), f"config.json: {tower}.{name}")
                          for name in fields}
    vision = checked["vision_config"]
    if vision["patch_size"] > vision["image_size"]:
        raise UserError(f"config.json: vision_config.patch_size {vision['patch_size']} is larger than its "
                        f"image_size {vision['image_size']}")
    schema.validate(POSITIVE, config.projection_dim, "config.json: projection_dim")
    for tower in (config.vision_config, config.text_config):
        schema.validate(schema.number(0.0, 1.0), tower.layer_norm_eps, "config.json: layer_norm_eps")
        schema.validate(schema.text(1, 40), tower.hidden_act, "config.json: hidden_act")
    return checked


def open_clip_config_from_hf(config) -> Dict[str, Any]:
    """The open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg) of a transformers CLIPConfig,
    its fields checked (`TOWER_FIELDS`) and the result checked against the spec's `model_cfg` schema."""
    fields = _checked_fields(config)
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
    v, t = fields["vision_config"], fields["text_config"]
    config = {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                       "head_width": v["hidden_size"] // v["num_attention_heads"],
                       "mlp_ratio": v["intermediate_size"] / v["hidden_size"], "patch_size": v["patch_size"]},
        "text_cfg": {"context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"],
                     "width": t["hidden_size"], "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                     "mlp_ratio": t["intermediate_size"] / t["hidden_size"]},
    }
    return schema.validate(schema.MODEL_CFG, config, "config.json (as an open_clip config)")


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


def hf_weight_files(folder: Path) -> List[Path]:
    """The folder's safetensors files: the shards its index names (bare names inside the folder), else
    model.safetensors. Anything else (a pickle's pytorch_model.bin) is refused."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path, MAX_JSON_BYTES, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path}: expected an object whose weight_map maps tensor names to file names")
        names = sorted(set(weight_map.values()))
        if len(names) > MAX_SHARDS:
            raise UserError(f"{index_path}: {len(names):,} shard files, over the limit of {MAX_SHARDS:,}")
        for name in names:
            if Path(name).name != name or name in ("", ".", "..") or "\\" in name or not name.endswith(".safetensors"):
                raise UserError(f"{index_path}: shard {name[:200]!r} is not a .safetensors file name inside the "
                                "folder (no folders, no '..')")
            if not (folder / name).is_file():
                raise UserError(f"{index_path}: shard {name!r} is not a file in {folder}")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
                                "flax_model.msgpack") if (folder / name).exists()]
    if others:
        raise UserError(f"{folder}: only safetensors weights are read, and it has {others[0]} (a pickle or another "
                        "framework's format); convert it where you trust the file: CLIPModel.from_pretrained(DIR)"
                        ".save_pretrained(DIR, safe_serialization=True)")
    raise UserError(f"{folder}: no model.safetensors")


def weight_shapes(files: List[Path]) -> Dict[str, torch.Tensor]:
    """The folder's tensors as `meta` tensors (shape and dtype, no memory), from the checked headers."""
    shapes: Dict[str, torch.Tensor] = {}
    for path in files:
        for name, (dtype, shape) in safetensors_header(path).items():
            if dtype not in _FLOAT_DTYPES:
                raise UserError(f"{path}: tensor {name[:200]!r} is {dtype}, not a floating-point weight")
            if name in shapes:
                raise UserError(f"{path}: tensor {name[:200]!r} is also in another shard")
            shapes[name] = torch.empty(shape, dtype=_FLOAT_DTYPES[dtype], device="meta")
    return shapes


def check_weights_fit(name: str, files: List[Path], folder: Path) -> None:
    """Refuse, before anything is allocated, weights whose converted shapes differ from the model `name`
    builds (the model made on the meta device)."""
    converted = convert_state_dict(weight_shapes(files))
    expected = sized_model(open_clip_spec(name)).state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            raise UserError(f"{folder}: the weights lack {key} of the model its config.json builds")
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise UserError(f"{folder}: weights do not fit their config ({key} has shape "
                            f"{list(converted[key].shape)}, the config builds {list(tensor.shape)})")
    extra = sorted(set(converted) - set(expected))
    if extra:
        raise UserError(f"{folder}: weights the model its config.json builds does not have: {extra[:4]}")


def read_hf_weights(files: List[Path]) -> Dict[str, torch.Tensor]:
    """The weights of a folder's safetensors `files` (`hf_weight_files`), each file's header checked first."""
    state: Dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_safetensors(path))
    return state


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
            if value.dim() != 2:
                raise UserError(f"{key}: shape {list(value.shape)}, expected a matrix")
            state[_TRANSPOSED[key]] = value.t().contiguous()
        elif any(key.startswith(prefix) for prefix in _TOWERS):
            prefix = next(p for p in _TOWERS if key.startswith(p))
            index, _, rest = key[len(prefix):].partition(".")
            if not (index.isdigit() and index.isascii() and len(index) <= 4):
                leftover.append(key)
                continue
            block = f"{_TOWERS[prefix]}{int(index)}."
            parts = rest.split(".")
            if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, kind = parts
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
        try:
            state[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
        except RuntimeError as error:
            raise UserError(f"{block}: q/k/v {kind} of different shapes ({str(error).splitlines()[0][:200]})") from None
    return state


def load_hf_clip(pretrained: str, model_name: Optional[str] = None) -> nn.Module:
    """The open_clip CLIP equivalent to a local transformers CLIPModel folder (`hf:DIR` or DIR), weights loaded,
    with its `model_spec`. `model_name`, when given, must name the folder's architecture."""
    folder = hf_folder(pretrained)
    config = open_clip_config_from_hf(read_hf_config(folder))
    name = architecture_name(config, model_name)
    if model_name and name != model_name:
        raise UserError(f"--pretrained {pretrained} is architecture {name}, not {model_name}: pass --model {name}")
    files = hf_weight_files(folder)
    check_weights_fit(name, files, folder)  # before anything is allocated
    model = create_open_clip(name)
    try:
        model.load_state_dict(convert_state_dict(read_hf_weights(files)), strict=True)
    except RuntimeError as error:
        raise UserError(f"{folder}: weights do not fit their config ({str(error).splitlines()[0][:300]})") from None
    model.model_spec = open_clip_spec(name)
    logging.info("converted Hugging Face CLIPModel %s to open_clip %s", folder, name)
    return model.eval()
