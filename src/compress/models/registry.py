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
import threading
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.utils._device import DeviceContext  # what `with torch.device(...)` enters

from compress.models import folder
from compress.models.spec import SpecError, validate_spec
from foundation.checkpoint import check_tensors_fit, load_checkpoint
from foundation.errors import CheckpointRefused
from foundation.logs import open_clip_chatter
from foundation.model_configs import config_preprocess_cfg, inline_config, register_model_configs

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


class _SizingDevice(DeviceContext):
    """`torch.device("meta")` for the tensors a module allocates by their shape (empty, zeros, ones, full,
    rand...): every parameter and buffer, with no memory behind it. Tensors made from values (arange, tensor,
    linspace...) stay on the CPU, so an architecture's own arithmetic on a few numbers (torchvision's RegNet
    widths, a window's relative-position index) still runs: on the meta device it has no data to read.
    Builders ask `sizing()` whether they run within it."""

    BY_SHAPE = frozenset({torch.empty, torch.empty_strided, torch.empty_permuted, torch.zeros, torch.ones, torch.full,
                          torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye})
    active = threading.local()

    def __init__(self):
        super().__init__("meta")

    def __enter__(self):
        super().__enter__()
        self.active.on = True

    def __exit__(self, *exc_info):
        self.active.on = False
        super().__exit__(*exc_info)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BY_SHAPE:
            return super().__torch_function__(func, types, args, kwargs)
        return func(*args, **(kwargs or {}))


def sizing() -> bool:
    """Whether a model is being built only to be sized (`sized_model`): a builder then puts open_clip's model
    on the meta device, and leaves out what no checkpoint holds (a frozen teacher it would read from files)."""
    return getattr(_SizingDevice.active, "on", False)


def sized_model(spec: Dict[str, Any], allowed_text_encoders: Iterable[str] = ()) -> nn.Module:
    """The architecture `spec` describes (validated as by build_model), built with every parameter and buffer
    on the meta device (`_SizingDevice`): their names, shapes and dtypes, and no memory behind them. A frozen
    teacher that a model reads from its own files (an image student's text encoder) is left out: no checkpoint
    holds it. A spec its schema accepts but no builder can build is refused here too (a SpecError naming the
    failure)."""
    spec = validate_spec(spec, allowed_text_encoders)
    try:
        with _SizingDevice():
            model = MODEL_KINDS[spec["kind"]](spec)
    except SpecError:
        raise
    except Exception as e:  # a layer index past the tower, ranks the block cannot take...: the spec's fault
        raise SpecError(f"model_spec describes no model that can be built ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    model.model_spec = spec
    return model


def check_weights(spec: Dict[str, Any], state_dict: Any, allowed_text_encoders: Iterable[str] = (),
                  where: str = "state_dict") -> Dict[str, Any]:
    """The validated `spec`, after its model's size is computed (`sized_model`, on the meta device) and checked
    against the weights `state_dict` actually holds (foundation.checkpoint.check_tensors_fit: every tensor of
    the model present with its shape and dtype, in storage of its own), before anything is built: a small file
    cannot make the build allocate what it does not hold. A CheckpointRefused (one line naming the key)
    otherwise."""
    model = sized_model(spec, allowed_text_encoders)
    check_tensors_fit(state_dict, _with_packed_attention(model.state_dict(keep_vars=True), state_dict), where)
    return model.model_spec


_QKV = ("q_proj", "k_proj", "v_proj")


def _with_packed_attention(expected: Dict[str, torch.Tensor], found: Any) -> Dict[str, torch.Tensor]:
    """`expected` as a state dict in nn.MultiheadAttention's packed names holds it, where `found` has them: a
    compact block's separate q/k/v Linears load a packed `in_proj_weight`/`in_proj_bias` ([q; k; v] rows;
    compact_clip's load pre-hook splits them), so the packed entries are checked as one tensor of three times
    the rows, on the meta device, instead of being refused as unknown keys."""
    if not isinstance(found, Mapping):
        return expected
    expected = dict(expected)
    for key in [k for k in found if isinstance(k, str) and k.endswith("in_proj_weight")]:
        prefix = key[: -len("in_proj_weight")]
        parts = [expected.get(f"{prefix}{name}.{kind}") for name in _QKV for kind in ("weight", "bias")]
        if any(part is None for part in parts) or key in expected:
            continue
        weights, biases = parts[0::2], parts[1::2]
        if len({tuple(w.shape) for w in weights}) != 1 or len({b.dtype for b in biases}) != 1:
            continue
        rows, cols = weights[0].shape
        expected[key] = torch.empty(3 * rows, cols, dtype=weights[0].dtype, device="meta")
        expected[prefix + "in_proj_bias"] = torch.empty(3 * rows, dtype=biases[0].dtype, device="meta")
        for name in _QKV:
            del expected[f"{prefix}{name}.weight"], expected[f"{prefix}{name}.bias"]
    return expected


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """DDP prefixes every key with `module.`; our files never carry it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load(path_or_checkpoint: str | Dict[str, Any], device: str | torch.device = "cpu",
         allowed_text_encoders: Iterable[str] = ()) -> nn.Module:
    """Rebuild and fill the model of one of our checkpoints, in eval mode (its spec validated, see build_model).
    A folder is a model folder (`compress.models.folder`: model.safetensors and model_spec.json)."""
    if folder.is_model_folder(path_or_checkpoint):
        path_or_checkpoint = folder.read(path_or_checkpoint)  # checked below as a checkpoint's contents are
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
    state_dict = strip_module_prefix(state_dict)
    # sized on the meta device and checked against the weights first: the build below allocates only what
    # the file holds (twice that at most, for half-precision weights), plus the causal mask the spec bounds
    spec = check_weights(checkpoint["model_spec"], state_dict, allowed_text_encoders,
                         "checkpoint's state_dict")
    model = build_model(spec, allowed_text_encoders)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:  # checked above; a builder that made another model than on the meta device
        raise CheckpointRefused(f"checkpoint's state_dict does not fit its model_spec "
                                f"({str(e).splitlines()[0][:300]})") from None
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
        # on the meta device where a loader sizes the model before building it (open_clip moves it to `device`)
        return open_clip.create_model(model_name, pretrained=None, device="meta" if sizing() else "cpu",
                                      **model_kwargs)
    finally:
        root.removeFilter(open_clip_chatter)


@register_model_kind("open_clip")
def _build_open_clip(spec: Dict[str, Any]) -> nn.Module:
    return create_open_clip(spec["model"], **spec.get("model_kwargs", {}))


# --- image preprocessing of an open_clip architecture ---------------------------------------------


def open_clip_preprocess(model_name: str, pretrained: Optional[str] = None,
                         model_kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The image preprocessing of open_clip's `model_name`, as a spec's `preprocess` holds it (image_size,
    mean, std, interpolation, resize_mode, fill_color).

    Each source overrides the ones before it: open_clip's defaults (PreprocessCfg: OpenAI's mean and std,
    bicubic, shortest-side resize and centre crop); the preprocessing that every published weights tag of the
    architecture shares (open_clip keeps it per tag, e.g. SigLIP's mean = std = 0.5 with a squash resize), so a
    local copy of those weights gets it too; the config's own `preprocess_cfg` (foundation.model_configs);
    the tag `pretrained` names, when it is one. The size is the architecture's image size
    (`force_image_size` of `model_kwargs` included).
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_model_configs()
    cfg = merge_preprocess_dict(PreprocessCfg(), _published_preprocess(model_name))
    cfg = merge_preprocess_dict(cfg, config_preprocess_cfg(model_name))
    if pretrained:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model_name, pretrained))
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    size = (model_kwargs or {}).get("force_image_size") or vision.get("image_size") or cfg["size"]
    return {
        "image_size": list(size) if isinstance(size, (list, tuple)) else size,
        "mean": _per_channel(cfg["mean"]),
        "std": _per_channel(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "resize_mode": cfg["resize_mode"],
        "fill_color": cfg["fill_color"],
    }


def _published_preprocess(model_name: str) -> Dict[str, Any]:
    """The preprocessing (PreprocessCfg keys but size) all open_clip weights tags of `model_name` share; {}
    when it has no tags or they differ."""
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    configs = []
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = merge_preprocess_dict({}, open_clip.get_pretrained_cfg(model_name, tag))
        cfg.pop("size", None)
        configs.append({key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()})
    return configs[0] if configs and all(cfg == configs[0] for cfg in configs) else {}


def _per_channel(value: Any) -> list:
    """A mean or std per RGB channel (open_clip also takes one number for all three)."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3


def to_preprocess_cfg(preprocess: Mapping[str, Any]) -> Dict[str, Any]:
    """A spec's `preprocess` as open_clip's PreprocessCfg dict (`size` for `image_size`; an absent key gets
    open_clip's default), what open_clip's transforms and `set_model_preprocess_cfg` take."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    size = preprocess["image_size"]
    return merge_preprocess_dict(asdict(PreprocessCfg()), {
        **preprocess, "size": tuple(size) if isinstance(size, list) else size,
        "mean": tuple(preprocess["mean"]), "std": tuple(preprocess["std"])})


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


def preprocess_config(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The image preprocessing of a spec, as its `preprocess` holds it: the recorded one, else its
    architecture's (open_clip_preprocess)."""
    spec = input_spec(spec)
    return spec.get("preprocess") or open_clip_preprocess(spec.get("preprocess_model", spec.get("model")),
                                                          model_kwargs=spec.get("model_kwargs"))


def get_preprocess(spec: Dict[str, Any]) -> Callable:
    """The image transform (resize, centre crop or squash, normalise) of a spec's `preprocess_config`, for eval
    and for the trainer's images alike."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**to_preprocess_cfg(preprocess_config(spec))), is_train=False)
