"""One entry point from "something that names a model" to an `Encoder` the benchmarks can score.

`load_encoder` accepts
- one of our checkpoints (path, or the dict already loaded): rebuilt through `compress.load`, which knows
  every model kind the project writes (dense CLIPs, pruned CLIPs, students…) from the stored `model_spec`;
- an open_clip_train checkpoint (no `model_spec`): the architecture comes from `model_name=` or from the
  `params.txt` that open_clip_train writes beside `checkpoints/`;
- an open_clip model name, with `pretrained` a local weights file, `hf:DIR` or a tag open_clip knows: built by
  `compress.models.pretrained.create_clip`, the trainer's builder too.

Nothing here branches on the model kind: the spec's tokenizer and image transform come from
`compress.models.registry` too, so a new kind needs no edit in eval.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress.models.pretrained import create_clip
from compress.models.registry import get_preprocess, get_tokenizer, open_clip_preprocess, open_clip_spec
from foundation.checkpoint import load_checkpoint
from foundation.errors import CheckpointRefused


@dataclass
class Encoder:
    """A model with its tokenizer and eval image transform, ready to embed images and captions."""

    model: nn.Module
    model_spec: Dict[str, Any]
    tokenizer: Optional[Callable[[List[str]], Any]]  # None: an image-only model (benchmarks skip text)
    preprocess: Callable  # PIL image -> tensor
    device: torch.device
    # run the towers under torch.autocast with this dtype (the trainer's amp / amp_bf16); None: as the weights
    autocast_dtype: Optional[torch.dtype] = None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _weight_dtype(self) -> torch.dtype:
        """The dtype of the model's floating weights: images go in as it (a pure-bf16 model takes bf16)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Float32 features of a batch of preprocessed images (unit length unless `normalize=False`)."""
        with self._autocast():
            features = self.model.encode_image(images.to(self.device, self._weight_dtype())).float()
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Float32 features of captions, tokenized here (unit length unless `normalize=False`)."""
        with self._autocast():
            features = self.model.encode_text(self.text_input(texts)).float()
        return F.normalize(features, dim=-1) if normalize else features

    def text_input(self, texts: Sequence[str]) -> Any:
        """What the model's own `encode_text` takes for these captions (tokens on device, or strings)."""
        tokens = self.tokenizer(list(texts))
        return tokens.to(self.device) if torch.is_tensor(tokens) else tokens

    @property
    def image_size(self) -> int:
        """Side of the square image the model sees (read from the eval transform's centre crop)."""
        return image_size_of_transform(self.preprocess)

    def to(self, device: str | torch.device) -> "Encoder":
        """Move the model to `device`; later inputs go there too. Returns this encoder."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


def encoder_from_model(
    model: nn.Module, model_spec: Optional[Dict[str, Any]] = None, device: str | torch.device | None = None
) -> Encoder:
    """Wrap a live model (e.g. the trainer's, unwrapped from DDP) whose spec is `model_spec` or `model.model_spec`."""
    spec = model_spec if model_spec is not None else getattr(model, "model_spec", None)
    if spec is None:
        raise ValueError("the model has no model_spec; pass model_spec= (e.g. {'kind': 'open_clip', 'model': name})")
    if device is None:
        device = next(model.parameters()).device
    return Encoder(model, spec, get_tokenizer(spec), get_preprocess(spec), torch.device(device))


def load_encoder(
    source: str | os.PathLike | Mapping[str, Any],
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    model_name: Optional[str] = None,
    allowed_text_encoders: Iterable[str] = (),
) -> Encoder:
    """An `Encoder` (eval mode, on `device`) for a checkpoint file, a loaded checkpoint dict, or a model name.

    `model_name` is needed only for open_clip_train checkpoints whose log dir has no params.txt.
    `allowed_text_encoders`: text-encoder names or files you trust a checkpoint to name (compress.models.spec).
    Raises FileNotFoundError for a path that names nothing, and for every checkpoint it refuses a
    `CheckpointRefused` (a ValueError and a UserError), one line naming the key: a path that is no regular file
    (a FIFO, a device), a file that fails foundation.checkpoint's checks, a spec its schema refuses, weights
    that do not fit the model the spec builds (checked before the model is built, see compress.load).
    """
    params: Dict[str, Any] = {}
    if isinstance(source, Mapping):
        checkpoint = source
    elif os.path.exists(source) and not os.path.isdir(source):  # load_checkpoint refuses all but a regular file
        checkpoint = load_checkpoint(os.fspath(source))
        params = read_params_beside_checkpoint(source)
    elif _looks_like_a_path(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    else:
        return _load_open_clip_model(str(source), pretrained, device)

    model = model_from_checkpoint(checkpoint, model_name=model_name, params=params,
                                  allowed_text_encoders=allowed_text_encoders)
    return encoder_from_model(model.to(device).eval(), device=device)


def model_from_checkpoint(
    checkpoint: Mapping[str, Any], model_name: Optional[str] = None, params: Optional[Dict[str, Any]] = None,
    allowed_text_encoders: Iterable[str] = (),
) -> nn.Module:
    """Rebuild and fill the model of our checkpoint (via its `model_spec`) or of an open_clip_train one."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointRefused("unknown checkpoint format: expected a dict with a 'state_dict' entry")
    if "model_spec" not in checkpoint:
        # An open_clip_train checkpoint: give it the spec its params.txt describes, then load it like ours.
        spec = open_clip_train_spec(params or {}, model_name)
        checkpoint = {"model_spec": spec, "state_dict": checkpoint["state_dict"]}
    # compress.load validates the spec and reports a state_dict that does not fit it in one line
    return compress.load(dict(checkpoint), allowed_text_encoders=allowed_text_encoders)


# --- open_clip_train log dirs --------------------------------------------------------------------------


def read_params_file(path: str | os.PathLike) -> Dict[str, Any]:
    """Parse an open_clip-style params.txt (`key: value` per line) into plain Python values.

    Values are parsed as text (None/True/False/int/float/string, and `[a, b]`/`(a, b)` lists of numbers);
    nothing is evaluated.
    """
    params: Dict[str, Any] = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            params[key.strip()] = parse_param_value(value.strip())
    return params


def parse_param_value(text: str) -> Any:
    if text in ("None", ""):
        return None
    if text in ("True", "False"):
        return text == "True"
    for number_type in (int, float):
        try:
            return number_type(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "()"):
        items = [item.strip().strip("'\"") for item in text[1:-1].split(",") if item.strip()]
        return [parse_param_value(item) for item in items]
    return text


def read_params_beside_checkpoint(checkpoint_path: str | os.PathLike) -> Dict[str, Any]:
    """params.txt of the log dir `<name>/checkpoints/epoch_N.pt` belongs to ({} when there is none)."""
    params_file = Path(checkpoint_path).resolve().parent.parent / "params.txt"
    return read_params_file(params_file) if params_file.is_file() else {}


# open_clip_train flags that change the architecture or eval transform, and the create_model kwarg each maps to.
_ARCHITECTURE_FLAGS = {
    "force_quick_gelu": "force_quick_gelu",
    "force_custom_text": "force_custom_text",
    "force_image_size": "force_image_size",
    "force_context_length": "force_context_length",
}
# open_clip_train flags that change the image transform, and the key of a spec's `preprocess` each sets
_PREPROCESS_FLAGS = {
    "force_image_size": "image_size",
    "image_mean": "mean",
    "image_std": "std",
    "image_interpolation": "interpolation",
    "image_resize_mode": "resize_mode",
}


def open_clip_train_spec(params: Mapping[str, Any], model_name: Optional[str] = None) -> Dict[str, Any]:
    """The model_spec of an open_clip_train run, from its params.txt values (model_name overrides `model`)."""
    model_name = model_name or params.get("model")
    if not model_name:
        raise CheckpointRefused(
            "checkpoint has no model_spec and no params.txt names its model: pass the open_clip model name "
            "(--model / model_name=)"
        )
    spec: Dict[str, Any] = open_clip_spec(str(model_name))
    model_kwargs = {kwarg: params[flag] for flag, kwarg in _ARCHITECTURE_FLAGS.items() if params.get(flag)}
    if model_kwargs:
        spec["model_kwargs"] = model_kwargs
    overrides = {key: params.get(flag) for flag, key in _PREPROCESS_FLAGS.items() if params.get(flag)}
    if overrides:
        preprocess = {**open_clip_preprocess(str(model_name)), **overrides}
        size = preprocess["image_size"]  # --force-image-size takes one number or two
        preprocess["image_size"] = size[0] if isinstance(size, list) and len(size) == 1 else size
        spec["preprocess"] = preprocess
    return spec


# --- open_clip model names -----------------------------------------------------------------------------


def _load_open_clip_model(model_name: str, pretrained: Optional[str], device: str | torch.device) -> Encoder:
    model = create_clip(model_name, pretrained, device=device)
    return encoder_from_model(model.eval(), device=device)


def _looks_like_a_path(text: Any) -> bool:
    text = os.fspath(text) if hasattr(text, "__fspath__") else str(text)
    return os.sep in text or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def image_size_of_transform(preprocess: Callable) -> int:
    """The output side of an eval transform: its CenterCrop size (or last Resize), 224 when unknown."""
    from torchvision import transforms as T

    size = None
    for transform in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(transform, (T.CenterCrop, T.Resize)) or type(transform).__name__ in ("ResizeKeepRatio",):
            size = getattr(transform, "size", size)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else 224
