"""Image backbones of the student kinds: a torchvision classifier or an open_clip image tower, whose output
layer is a projection of our choosing (or nothing, to expose the pooled features).

Both student kinds build their image side here: `student_clip` (compress.models.students) projects into a
teacher's embedding space, `image_student` (compress.models.text_students) takes the features and adds its own
head. Networks are randomly initialised: weights come from a checkpoint, a torchvision file or training.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

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
