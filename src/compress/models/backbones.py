"""Image backbones of the student kinds: a torchvision classifier or an open_clip image tower, whose output
layer is a projection of our choosing (or nothing, to expose the pooled features).

Both student kinds build their image side here: `student_clip` (compress.models.students) projects into a
teacher's embedding space, `image_student` (compress.models.text_students) takes the features and adds its own
head. Networks are randomly initialised: weights come from a checkpoint, a torchvision file or training.
A weights file is read by `read_weights_file` (weights_only) and matched to a backbone by
`fit_backbone_weights`, which strips the prefixes self-supervised checkpoints (MoCo, SimCLR, SwAV) and our own
checkpoints put before the backbone's names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from foundation.model_configs import register_model_configs

# torchvision architectures whose constructor needs arguments to build a plain single-output classifier
# (no auxiliary heads, which would make the training forward return a tuple) or to take other image sizes
_TORCHVISION_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": True},
                       "googlenet": {"aux_logits": False, "init_weights": True}}


def open_clip_model_config(model_name: str) -> Dict[str, Any]:
    """The open_clip config dict of a model name (ours included); ValueError if unknown."""
    import open_clip

    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    return config


def is_open_clip_config(name: str) -> bool:
    import open_clip

    register_model_configs()
    return name in open_clip.list_models()


def is_torchvision_arch(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def open_clip_image_size(name: str) -> int:
    size = (open_clip_model_config(name).get("vision_cfg") or {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _output_layer(net: nn.Module, arch: str) -> Tuple[str, int]:
    """(name, input width) of a torchvision classifier's output layer: its last Linear — except squeezenet's,
    a 1x1 conv to the classes followed by pooling, which is its whole `classifier`."""
    if arch.startswith("squeezenet"):
        return "classifier", net.classifier[1].in_channels
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no Linear classifier to replace by a projection")
    return names[-1], net.get_submodule(names[-1]).in_features


def torchvision_backbone(arch: str, image_size: int, out_dim: Optional[int] = None) -> Tuple[nn.Module, str]:
    """torchvision `arch` whose classifier output layer is a Linear to `out_dim` (a projection) or, with
    `out_dim` None, nothing: the network outputs its pooled features. Returns (network, that layer's name)."""
    import torchvision

    kwargs = dict(_TORCHVISION_KWARGS.get(arch, {}))
    if arch.startswith("vit_"):  # torchvision ViTs are built for one input size (their positional embedding)
        kwargs["image_size"] = image_size
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    name, width = _output_layer(net, arch)
    replacement: nn.Module = nn.Linear(width, out_dim) if out_dim is not None else nn.Identity()
    if arch.startswith("squeezenet"):  # the replaced conv came before the pooling: pool its input channels
        replacement = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    *([replacement] if out_dim is not None else []))
    net.set_submodule(name, replacement)
    return net, name


def open_clip_image_tower(vision_cfg: Dict[str, Any], out_dim: int, quick_gelu: bool = False) -> nn.Module:
    """open_clip's image tower of `vision_cfg` (what a CLIP of that config holds as `.visual`), whose output
    projection maps to `out_dim`."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(out_dim, vision_cfg, quick_gelu)


def open_clip_config_image_tower(model_name: str, image_size: Optional[int] = None) -> nn.Module:
    """The `.visual` of open_clip config `model_name` (its own embedding size), at `image_size` if given."""
    config = open_clip_model_config(model_name)
    vision_cfg = dict(config["vision_cfg"])
    if image_size and image_size != open_clip_image_size(model_name):
        vision_cfg["image_size"] = image_size
    return open_clip_image_tower(vision_cfg, int(config["embed_dim"]), bool(config.get("quick_gelu", False)))


# --- weights files: torchvision's, self-supervised checkpoints', ours -----------------------------------
# What sits before a backbone's own parameter names in the files people bring: DDP's `module.`, MoCo's query
# encoder `module.encoder_q.` (its momentum encoder `encoder_k` and queue are training state), SimCLR/SEED's
# `encoder.`, and our checkpoints' `visual.` (image_student, open_clip CLIPs) and `visual.net.` (student_clip).
BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder.", "module.backbone.", "module.",
                     "encoder.", "backbone.", "visual.net.", "visual.", "")
# top-level names of a projection MLP on the pooled features (MoCo v2 `fc`, SwAV `projection_head`)
HEAD_NAMES = ("fc", "projection_head", "head", "mlp")
# what the ignored keys of well-known files are, for the one line that reports them
_KNOWN_EXTRAS = {"encoder_k": "momentum encoder", "queue": "queue", "queue_ptr": "queue pointer",
                 "prototypes": "SwAV prototypes", "fc": "projection head", "projection_head": "projection head",
                 "head": "projection head", "mlp": "projection head"}


@dataclass
class FittedWeights:
    """A weights file matched to a backbone: its tensors under the backbone's own names, the projection MLP
    found beside it (relative names, e.g. `0.weight`), and what was left out."""

    backbone: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    head_name: Optional[str]
    prefix: str
    ignored: Dict[str, int]  # "name (what it is)" -> number of tensors

    def describe(self) -> str:
        kept = f"{len(self.backbone)} backbone tensors" + (f" (prefix {self.prefix!r} stripped)" if self.prefix else "")
        left = ", ".join(f"{name} ({count})" for name, count in self.ignored.items())
        return kept + (f"; ignored: {left}" if left else "")


def read_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """The flat {name: tensor} of a weights file, read with weights_only=True (tensors and plain containers
    only: MoCo's and SwAV's files hold `state_dict` beside an optimizer state and numbers, SimCLR's is the
    state dict itself, ours hold `state_dict` beside a `model_spec`). ValueError (one line) otherwise."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as error:  # pickled objects weights_only refuses, truncated or not torch at all
        reason = str(error).splitlines()[0][:160] if str(error) else ""
        raise ValueError(f"{path} is no weights file torch can read with weights_only=True "
                         f"({type(error).__name__}: {reason})") from None
    for key in ("state_dict", "model", "network"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)} if isinstance(content, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no state dict (no tensors under state_dict, model or at the top level)")
    return tensors


def fit_backbone_weights(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], what: str) -> FittedWeights:
    """Match `state` to `own` (a backbone's state_dict): the prefix of BACKBONE_PREFIXES under which most of
    the backbone's names appear is stripped; every one of the backbone's tensors must be there with its shape
    (ValueError naming the first missing or mismatched ones otherwise). Keys left over are reported, and a
    projection MLP under the same prefix (HEAD_NAMES) is kept apart for who wants it."""

    def matches(prefix: str) -> int:
        return sum(1 for key in state if key.startswith(prefix) and key[len(prefix):] in own)

    prefix = max(BACKBONE_PREFIXES, key=matches)  # ties: the first listed (the longest of nested ones)
    found = {key[len(prefix):]: value for key, value in state.items()
             if key.startswith(prefix) and key[len(prefix):] in own}
    missing = [key for key in own if key not in found]
    if missing:
        raise ValueError(f"{what} does not fit: {len(missing)} of its {len(own)} tensors are not in the file "
                         f"(e.g. {', '.join(missing[:3])}); is it a checkpoint of this architecture?")
    mismatched = [key for key in own if found[key].shape != own[key].shape]
    if mismatched:
        key = mismatched[0]
        raise ValueError(f"{what} does not fit: {len(mismatched)} tensors have other shapes (e.g. {key}: file "
                         f"{tuple(found[key].shape)}, model {tuple(own[key].shape)}); is it another width or depth?")
    # tensors under the prefix inside the backbone's own modules that it does not have: a deeper network of the
    # same family (resnet34's layer1.2 for a resnet18), which would otherwise load as a silently truncated copy
    own_modules = {key.split(".", 1)[0] for key in own}
    extra = [key[len(prefix):] for key in state if key.startswith(prefix) and key[len(prefix):] not in own
             and key[len(prefix):].split(".", 1)[0] in own_modules]
    if extra:
        raise ValueError(f"{what} does not fit: the file has {len(extra)} tensors in the backbone's modules that it "
                         f"lacks (e.g. {', '.join(extra[:3])}); is it a deeper or wider architecture?")
    head: Dict[str, torch.Tensor] = {}
    head_name = None
    ignored: Dict[str, int] = {}
    for key, value in state.items():
        if key.startswith(prefix) and key[len(prefix):] in own:
            continue
        under_prefix = key.startswith(prefix)
        inner = key[len(prefix):] if under_prefix else key[len("module."):] if key.startswith("module.") else key
        top = inner.split(".", 1)[0]
        if under_prefix and top in HEAD_NAMES and head_name in (None, top):
            head_name = top
            head[inner[len(top) + 1:]] = value  # "fc.0.weight" -> "0.weight", MoCo v1's "fc.weight" -> "weight"
        label = f"{top} ({_KNOWN_EXTRAS[top]})" if top in _KNOWN_EXTRAS else top
        ignored[label] = ignored.get(label, 0) + 1
    return FittedWeights(found, head, head_name, prefix, ignored)


def load_backbone_weights(module: nn.Module, path: str, what: str) -> FittedWeights:
    """Fill `module` from the weights file at `path` (read_weights_file + fit_backbone_weights)."""
    fitted = fit_backbone_weights(read_weights_file(path), module.state_dict(), f"{what} {path}")
    module.load_state_dict(fitted.backbone)
    return fitted


class FrozenOnDevice:
    """Base of the frozen teachers (text encoders, image teachers): deliberately not nn.Modules, so their
    weights stay out of the student's parameters, state_dict, optimizer and DDP; `.to` moves `self.module`."""

    module: nn.Module
    device: torch.device

    def to(self, device: "torch.device | str") -> "FrozenOnDevice":
        device = torch.device(device)
        if device != self.device:
            self.module.to(device)
            self.device = device
        return self
