"""Frozen self-supervised image teachers: MoCo v1/v2, SimCLR and SwAV checkpoints of ResNets (ProtoRKD's
teacher table: ResNet-50/101/152 and SwAV's ResNet-50 ×2/×4/×5).

The teacher is a torchvision architecture (any of `torchvision.models`, e.g. resnet50) — or SwAV's widened
ResNet-50s `resnet50w2`/`resnet50w4`/`resnet50w5`, built from torchvision's blocks with every width
multiplied — filled from the checkpoint by `backbones.load_backbone_weights` (weights_only; the prefixes
`module.`, `module.encoder_q.`, `encoder.` stripped; MoCo's momentum encoder and queue, SwAV's prototypes
left out and reported). Its features are the pooled backbone output, or (`features="head"`) the checkpoint's
projection MLP on it (MoCo v2 `fc`, SwAV `projection_head`). Like the text teachers it is no nn.Module: its
weights stay out of the student's parameters, optimizer, DDP and checkpoint.

It sees images through its own eval transform: resize to 256/224 of the input size, centre crop,
ImageNet mean/std (how these networks were trained and evaluated), never the student's augmentation, so its
features are a function of the row alone and can be cached by row (training/row_cache.py).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from compress.models.backbones import FrozenOnDevice, is_torchvision_arch, load_backbone_weights, torchvision_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_WIDE_RESNETS = {"resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}
FEATURES = ("pooled", "head")


def is_image_teacher_arch(name: Optional[str]) -> bool:
    """A torchvision (or SwAV) architecture name that no open_clip config has: open_clip's `convnext_tiny` is
    a CLIP, not torchvision's ImageNet network of the same name."""
    import open_clip

    from foundation.model_configs import register_model_configs

    if not name or not (name in SWAV_WIDE_RESNETS or is_torchvision_arch(name)):
        return False
    register_model_configs()
    return name not in open_clip.list_models()


def swav_wide_resnet50(widen: int) -> nn.Module:
    """SwAV's ResNet-50 ×`widen`: torchvision's Bottleneck ResNet-50 with the stem and every stage `widen`
    times wider (parameter names as torchvision's, which SwAV's files use); pooled output, no classifier."""
    from torchvision.models.resnet import Bottleneck, ResNet

    net = ResNet(Bottleneck, [3, 4, 6, 3])
    width = 64 * widen
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.inplanes = width  # _make_layer reads and advances it, as torchvision's constructor does
    net.layer1 = net._make_layer(Bottleneck, width, 3)
    net.layer2 = net._make_layer(Bottleneck, width * 2, 4, stride=2)
    net.layer3 = net._make_layer(Bottleneck, width * 4, 6, stride=2)
    net.layer4 = net._make_layer(Bottleneck, width * 8, 3, stride=2)
    net.fc = nn.Identity()
    return net


def head_from_weights(head: Dict[str, torch.Tensor]) -> nn.Module:
    """The projection MLP a checkpoint holds beside its backbone, rebuilt from its tensors: one Linear
    (MoCo v1: `fc.weight`), or a Sequential whose numbered entries with a 2-d `weight` are Linears, with
    `running_mean` BatchNorm1d, and without tensors ReLUs (MoCo v2 `fc.0/fc.2`, SwAV `projection_head.0-3`)."""
    if set(head) <= {"weight", "bias"}:
        out_dim, in_dim = head["weight"].shape
        module: nn.Module = nn.Linear(in_dim, out_dim, bias="bias" in head)
    else:
        try:
            positions = {int(key.split(".", 1)[0]) for key in head}
        except ValueError:
            raise ValueError(f"cannot rebuild the projection head from its tensors {sorted(head)[:4]}") from None
        layers = []
        for position in range(max(positions) + 1):
            weight = head.get(f"{position}.weight")
            if f"{position}.running_mean" in head:
                layers.append(nn.BatchNorm1d(len(head[f"{position}.running_mean"])))
            elif weight is not None and weight.ndim == 2:
                layers.append(nn.Linear(weight.shape[1], weight.shape[0], bias=f"{position}.bias" in head))
            else:
                layers.append(nn.ReLU())
        module = nn.Sequential(*layers)
    module.load_state_dict(head)
    return module


class FrozenImageTeacher(FrozenOnDevice):
    """A frozen image network taking image batches (its own `transform`'s output); not an nn.Module."""

    def __init__(self, arch: str, weights: str, features: str = "pooled", image_size: int = 224):
        from torchvision import transforms

        if features not in FEATURES:
            raise ValueError(f"image teacher features {features!r}: choose {' or '.join(FEATURES)}")
        if not os.path.isfile(weights):
            raise ValueError(f"--teacher-pretrained {weights}: no such file (an image teacher needs its checkpoint)")
        net = (swav_wide_resnet50(SWAV_WIDE_RESNETS[arch]) if arch in SWAV_WIDE_RESNETS
               else torchvision_backbone(arch, image_size)[0])
        fitted = load_backbone_weights(net, weights, f"--teacher-pretrained ({arch})")
        self.description = fitted.describe()
        if features == "head":
            if not fitted.head:
                raise ValueError(f"--teacher-pretrained {weights} has no projection head (fc, projection_head) "
                                 f"beside its backbone: use the pooled features")
            net = nn.Sequential(net, nn.Flatten(1), head_from_weights(fitted.head))
            self.description += f"; features: its projection head {fitted.head_name}"
        self.module = net.eval().requires_grad_(False)
        self.device = torch.device("cpu")
        stat = os.stat(weights)
        # what determines the features: the cache of them is keyed by this (training/row_cache.py)
        self.spec: Dict[str, Any] = {"type": "image", "arch": arch, "weights": os.path.abspath(weights),
                                     "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "features": features,
                                     "image_size": image_size}
        self.transform = transforms.Compose([
            transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.image_size = image_size
        with torch.no_grad():
            self.dim = int(self.module(torch.zeros(1, 3, image_size, image_size)).flatten(1).shape[1])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(len(images), dim) float32 on `self.device`, not normalised."""
        return self.module(images.to(self.device)).flatten(1).float()
