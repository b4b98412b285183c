"""Student CLIPs: a small image tower paired with a (teacher's) open_clip text tower.

Model kind `student_clip` (rebuilt by `compress.load` from the checkpoint's model_spec):

    {"kind": "student_clip",
     "embed_dim": 128,                                   # the teacher's joint embedding size
     "image_tower": {"type": "torchvision", "name": "mobilenet_v3_small", "image_size": 32,
                     "freeze_backbone": false}
                  | {"type": "open_clip_vit", "vision_cfg": {...open_clip CLIPVisionCfg...}, "quick_gelu": false},
     "text_tower": {"text_cfg": {...open_clip CLIPTextCfg...}, "quick_gelu": false, "from": "teacher clipc-vit-t2-64"},
     "tokenizer_model": "clipc-vit-t2-64",                # open_clip tokenizer of the text tower
     "preprocess": {"image_size": 64, "mean": [...], "std": [...]},   # the teacher's: same images
     "init_logit_bias": -10.0}                           # optional: a SigLIP student's learnable logit bias

- torchvision students (`torchvision.models.get_model(name)`, any classification architecture): the
  classifier's output layer becomes a Linear to `embed_dim` (compress.models.backbones); that Linear is the
  "head" `--freeze-backbone` trains (casCLIP's setting).
- open_clip ViT students: an open_clip `VisionTransformer` whose `proj` maps to `embed_dim`; smaller ViTs can
  be initialised from the teacher with `inherit_vit_from_teacher` (TinyCLIP manual inheritance).
- Students see the teacher's preprocessed images; a student with a smaller `image_size` resizes them inside
  its forward (so the cost of resizing is part of its measured latency, and a cascade feeds every level the
  same tensors).
- The text tower is an open_clip `TextTransformer` built from the teacher's text config and filled with the
  teacher's text weights (`copy_teacher_text_tower`); its parameter names match a CLIP's text attributes.
- A student trained with SigLIP's sigmoid loss (the distill job under `--siglip` or with a SigLIP teacher) has a
  `logit_bias` parameter beside `logit_scale`, as open_clip's CLIP has with `init_logit_bias`; the spec's
  `init_logit_bias` says so, and the checkpoint's state dict holds its trained value. Without it, `logit_bias`
  is None (open_clip's convention).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.backbones import (
    fit_backbone_weights,
    is_torchvision_arch,
    open_clip_image_tower,
    open_clip_model_config,
    read_weights_file,
    torchvision_backbone,
)
from compress.models.registry import open_clip_preprocess, register_model_kind

# --- specs ---------------------------------------------------------------------------------------------


def student_image_spec(student: str, teacher_model: str, image_size: Optional[int] = None,
                       width: Optional[int] = None, layers: Optional[int] = None,
                       freeze_backbone: bool = False) -> Dict[str, Any]:
    """Image-tower spec for `--student`: a torchvision architecture, an open_clip model name (its vision
    config), or `teacher` (the teacher's vision config). `width`/`layers`/`image_size` shrink a ViT."""
    teacher_vision = open_clip_model_config(teacher_model)["vision_cfg"]
    if is_torchvision_arch(student):
        if width is not None or layers is not None:
            raise ValueError("--student-width/--student-layers apply to open_clip ViT students only")
        return {"type": "torchvision", "name": student, "image_size": image_size or teacher_vision["image_size"],
                "freeze_backbone": freeze_backbone}
    source = teacher_model if student == "teacher" else student
    try:
        config = open_clip_model_config(source)
    except ValueError:
        raise ValueError(f"--student {student!r} is neither a torchvision architecture nor an open_clip model")
    vision_cfg = dict(config["vision_cfg"])
    if isinstance(vision_cfg.get("layers"), (list, tuple)) or vision_cfg.get("timm_model_name"):
        raise ValueError(f"--student {student!r}: only open_clip ViT configs are supported as students")
    for key, value in (("image_size", image_size), ("width", width), ("layers", layers)):
        if value is not None:
            vision_cfg[key] = value
    return {"type": "open_clip_vit", "vision_cfg": vision_cfg, "quick_gelu": bool(config.get("quick_gelu", False)),
            "freeze_backbone": freeze_backbone}


def teacher_text_spec(text_model: str) -> Dict[str, Any]:
    config = open_clip_model_config(text_model)
    return {"text_cfg": dict(config["text_cfg"]), "quick_gelu": bool(config.get("quick_gelu", False)),
            "from": text_model}


def student_clip_spec(image_tower: Dict[str, Any], teacher_model: str, text_model: Optional[str] = None,
                      init_logit_bias: Optional[float] = None) -> Dict[str, Any]:
    """Spec of a student CLIP: `image_tower` + the text tower of `text_model` (default: the teacher's),
    in the teacher's embedding space and with the teacher's preprocessing; with a learnable logit bias starting
    at `init_logit_bias` when one is given (SigLIP's sigmoid loss)."""
    teacher_config = open_clip_model_config(teacher_model)
    text_model = text_model or teacher_model
    bias = {} if init_logit_bias is None else {"init_logit_bias": float(init_logit_bias)}
    return {
        "kind": "student_clip",
        "embed_dim": int(teacher_config["embed_dim"]),
        "image_tower": image_tower,
        "text_tower": teacher_text_spec(text_model),
        "tokenizer_model": text_model,
        "teacher_model": teacher_model,
        "preprocess": open_clip_preprocess(teacher_model),
        **_model_cfg(teacher_model, text_model),
        **bias,
    }


def _model_cfg(*names: str) -> Dict[str, Any]:
    """`model_cfg` for a spec that names a config no file describes (a teacher converted from a Hugging Face
    folder), so the checkpoint registers it again wherever it is loaded."""
    from foundation.model_configs import inline_config

    configs = {name: inline_config(name) for name in names if inline_config(name) is not None}
    if len(configs) > 1:
        raise ValueError(f"a student can name one converted Hugging Face architecture, not {sorted(configs)}")
    return {"model_cfg": next(iter(configs.values()))} if configs else {}


# --- image towers --------------------------------------------------------------------------------------


class StudentImageTower(nn.Module):
    """A student image network ending in a projection to the joint embedding size."""

    def __init__(self, spec: Dict[str, Any], embed_dim: int):
        super().__init__()
        self.spec = spec
        if spec["type"] == "torchvision":
            self.image_size = int(spec["image_size"])
            net, self.head_name = torchvision_backbone(spec["name"], self.image_size, out_dim=embed_dim)
        elif spec["type"] == "open_clip_vit":
            net = open_clip_image_tower(spec["vision_cfg"], embed_dim, spec.get("quick_gelu", False))
            self.head_name = "proj"
            self.image_size = int(spec["vision_cfg"]["image_size"])
        else:
            raise ValueError(f"unknown student image tower type {spec['type']!r}")
        self.net = net
        self.freeze_backbone = bool(spec.get("freeze_backbone", False))
        if self.freeze_backbone:
            for name, param in self.net.named_parameters():
                param.requires_grad = name == self.head_name or name.startswith(self.head_name + ".")

    def train(self, mode: bool = True) -> "StudentImageTower":
        super().train(mode)
        if self.freeze_backbone and mode:
            # a frozen backbone keeps its BatchNorm statistics and dropout off; only the (linear) head learns
            self.net.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.net(images)


def load_torchvision_weights(tower: StudentImageTower, path: str) -> str:
    """Fill a torchvision student's backbone from a local weights file: torchvision's state dict, or a
    self-supervised checkpoint (MoCo's `module.encoder_q.`, SimCLR's, SwAV's `module.`, their heads, momentum
    encoders and queues left out), read weights_only (compress.models.backbones). Its classifier output layer,
    now the projection, keeps its fresh init. Returns the one line saying what was loaded and left out."""
    if tower.spec["type"] != "torchvision":
        raise ValueError("--student-pretrained takes a torchvision state dict; ViT students use --inherit-from-teacher")
    head = tower.head_name + "."
    backbone = {k: v for k, v in tower.net.state_dict().items() if not k.startswith(head)}
    fitted = fit_backbone_weights(read_weights_file(path), backbone,
                                  f"--student-pretrained {path} ({tower.spec['name']})")
    tower.net.load_state_dict(fitted.backbone, strict=False)
    return fitted.describe()


# --- the student CLIP ----------------------------------------------------------------------------------


class StudentCLIP(nn.Module):
    """Student image tower + open_clip text tower in one embedding space (the open_clip CLIP interface)."""

    def __init__(self, spec: Dict[str, Any]):
        super().__init__()
        from open_clip.model import _build_text_tower

        embed_dim = int(spec["embed_dim"])
        self.visual = StudentImageTower(spec["image_tower"], embed_dim)
        text = spec["text_tower"]
        self.text = _build_text_tower(embed_dim, text["text_cfg"], text.get("quick_gelu", False))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        bias = spec.get("init_logit_bias")
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))
        self.output_dict = True

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)
        if isinstance(features, tuple):  # a text tower that also outputs its tokens (CoCa's): the pooled features
            features = features[0]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """Normalised features of whichever inputs are given (DDP needs the step to go through forward), and the
        exponentiated temperature; with the logit bias too when the student has one (open_clip's CLIP output)."""
        out = {
            "image_features": self.encode_image(image, normalize=True) if image is not None else None,
            "text_features": self.encode_text(text, normalize=True) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


@register_model_kind("student_clip")
def build_student_clip(spec: Dict[str, Any]) -> nn.Module:
    return StudentCLIP(spec)


def copy_teacher_text_tower(student: StudentCLIP, teacher: nn.Module) -> None:
    """Fill the student's text tower and temperature from an open_clip CLIP (same text config)."""
    load_text_tower(student, teacher.state_dict())


def load_text_tower(student: StudentCLIP, teacher_state: Dict[str, torch.Tensor]) -> None:
    """Fill the student's text tower and temperature from an open_clip CLIP's state dict, or the part of it that
    holds them (a reinforced set's teacher_text.safetensors): the text attributes of a CLIP carry exactly the
    TextTransformer's parameter names; a CLIP whose text tower is a module of its own (open_clip's
    CustomTextCLIP: MobileCLIP, EVA, SigLIP, CoCa) holds them under `text.`. ValueError naming the first tensor
    missing or of another shape."""
    own = student.text.state_dict()
    if not any(name in teacher_state for name in own):
        teacher_state = {**{name[len("text."):]: tensor for name, tensor in teacher_state.items()
                            if name.startswith("text.")}, "logit_scale": teacher_state.get("logit_scale")}
    for name, tensor in [*own.items(), ("logit_scale", student.logit_scale)]:
        found = teacher_state.get(name)
        if not isinstance(found, torch.Tensor) or found.numel() != tensor.numel() or (
                name != "logit_scale" and found.shape != tensor.shape):
            shape = tuple(found.shape) if isinstance(found, torch.Tensor) else "none"
            raise ValueError(f"the teacher's text tower has no {name} of shape {tuple(tensor.shape)} (found {shape})")
    student.text.load_state_dict({name: teacher_state[name] for name in own})
    with torch.no_grad():
        student.logit_scale.copy_(teacher_state["logit_scale"].detach().reshape(()))


# --- TinyCLIP-style manual weight inheritance ------------------------------------------------------------


def default_inherited_layers(teacher_layers: int, student_layers: int) -> List[int]:
    """Every step-th teacher layer, step = teacher_layers // student_layers (TinyCLIP)."""
    if student_layers > teacher_layers:
        raise ValueError(f"student has {student_layers} layers, teacher only {teacher_layers}")
    step = teacher_layers // student_layers
    return [i * step for i in range(student_layers)]


def _resize_grid_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g², W] → [1 + grid², W]: bicubic resize of the patch grid, the class token kept."""
    cls, patches = pos_embed[:1], pos_embed[1:]
    old = int(round(math.sqrt(patches.shape[0])))
    if old == grid:
        return pos_embed
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _leading(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return tensor[tuple(slice(0, n) for n in shape)]


@torch.no_grad()
def inherit_vit_from_teacher(student_vit: nn.Module, teacher_vit: nn.Module, layers: Sequence[int]) -> None:
    """Initialise an open_clip VisionTransformer from a larger one: student block j ← teacher block
    layers[j]; every matrix keeps its leading rows/columns (so with equal head width, the leading heads
    and MLP units); q, k and v of `in_proj` are sliced separately; the positional embedding is resized
    to the student's patch grid. The projection keeps the teacher's embedding space (leading rows)."""
    teacher_state = teacher_vit.state_dict()
    student_state = student_vit.state_dict()
    if len(layers) != len(student_vit.transformer.resblocks):
        raise ValueError(f"{len(layers)} inherited layers for a {len(student_vit.transformer.resblocks)}-layer student")
    teacher_width = teacher_vit.transformer.width
    new_state = {}
    for name, value in student_state.items():
        source = name
        if name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks."):].split(".", 1)
            source = f"transformer.resblocks.{layers[int(index)]}.{rest}"
        if source not in teacher_state:
            raise ValueError(f"teacher ViT has no {source!r} to inherit {name!r} from")
        teacher_value = teacher_state[source]
        if name == "positional_embedding":
            grid = student_vit.grid_size[0]
            teacher_value = _resize_grid_pos_embed(teacher_value, grid)
        if name.endswith("attn.in_proj_weight") or name.endswith("attn.in_proj_bias"):
            width = value.shape[0] // 3
            blocks = teacher_value.split(teacher_width)
            new_state[name] = torch.cat([_leading(b, (width,) + tuple(value.shape[1:])) for b in blocks])
            continue
        if any(s > t for s, t in zip(value.shape, teacher_value.shape)) or value.ndim != teacher_value.ndim:
            raise ValueError(f"cannot inherit {name}: student shape {tuple(value.shape)} exceeds teacher "
                             f"{tuple(teacher_value.shape)} (patch size and embedding size must match)")
        new_state[name] = _leading(teacher_value, value.shape).clone()
    student_vit.load_state_dict(new_state)
