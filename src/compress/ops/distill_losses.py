"""Student–teacher distillation losses for CLIP image towers (pure functions, no state).

Conventions: `*_image`/`*_text` are L2-normalised feature batches (B, D) whose row i of the image batch
belongs with row i of the text batch; `logit_scale` is the *exponentiated* temperature (CLIP's
`logit_scale.exp()`, 100 for a trained CLIP).

- `cosine_loss`      casCLIP / Cascade CLIP: mean(1 − cos(student, teacher)); images only.
- `fd_loss`          CLIP-KD feature distillation: MSE of normalised features (CLIP-KD weight 2000); images only.
- `icl_loss`         CLIP-KD interactive contrastive learning: InfoNCE student image ↔ teacher text.
- `crd_loss`         CLIP-KD contrastive relational distillation: KL(teacher ‖ student) of the image→text and
                     text→image affinity distributions, averaged over both directions.
- `affinity_loss`    TinyCLIP affinity mimicking / open_clip DistillClipLoss: soft cross-entropy of the
                     student's logits against the teacher's softmax, averaged over both directions.
                     Equals `crd_loss` plus the teacher's entropy (constant in the student), so the two differ
                     in value, not in gradient.

`LOSSES` maps each `--distill-loss` name to how it reads one step's `DistillFeatures`, whether it needs
captions, and its published default weight: the one table the distill job both parses and computes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F


def cosine_loss(student_image: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cosine similarity (torch's CosineEmbeddingLoss with all targets +1)."""
    return (1.0 - F.cosine_similarity(student_image, teacher_image, dim=-1)).mean()


def fd_loss(student_image: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the L2-normalised features, averaged over every element (CLIP-KD)."""
    return F.mse_loss(F.normalize(student_image, dim=-1), F.normalize(teacher_image, dim=-1))


def _affinity_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float):
    logits_per_image = logit_scale * image @ text.T
    return logits_per_image, logits_per_image.T


def icl_loss(student_image: torch.Tensor, teacher_text: torch.Tensor,
             logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_tᵀ, diag) + CE(s·T_t I_sᵀ, diag)]: the student's images must find their captions in
    the teacher's text space."""
    logits_per_image, logits_per_text = _affinity_logits(student_image, teacher_text, logit_scale)
    labels = torch.arange(student_image.shape[0], device=student_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def _both_directions(compare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], student_image: torch.Tensor,
                     student_text: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                     student_logit_scale: torch.Tensor | float,
                     teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[compare(student, teacher) of the image→text logits + the same of the text→image logits]."""
    s_image, s_text = _affinity_logits(student_image, student_text, student_logit_scale)
    t_image, t_text = _affinity_logits(teacher_image, teacher_text, teacher_logit_scale)
    return 0.5 * (compare(s_image, t_image) + compare(s_text, t_text))


def crd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
             teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
             teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[KL(p_t^{i→t} ‖ p_s^{i→t}) + KL(p_t^{t→i} ‖ p_s^{t→i})] over the batch's affinity matrices."""
    return _both_directions(_kl_rows, student_image, student_text, teacher_image, teacher_text,
                            student_logit_scale, teacher_logit_scale)


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_logits.softmax(dim=-1) * student_logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def affinity_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                  teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
                  teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_sᵀ, softmax(s_t·I_t T_tᵀ)) + CE(transposes)] (TinyCLIP affinity mimicking)."""
    return _both_directions(_soft_cross_entropy, student_image, student_text, teacher_image, teacher_text,
                            student_logit_scale, teacher_logit_scale)


# --- the table the distill job runs ------------------------------------------------------------------


@dataclass(frozen=True)
class DistillFeatures:
    """One step's L2-normalised features and exponentiated temperatures, as every loss reads them."""

    student_image: torch.Tensor
    teacher_image: torch.Tensor
    student_text: Optional[torch.Tensor]  # the student's own text tower's, else the teacher's (shared tower)
    teacher_text: Optional[torch.Tensor]  # None when no loss of the run needs captions
    logit_scale: torch.Tensor | float
    teacher_logit_scale: torch.Tensor | float
    student_has_text: bool = False  # the student trains a text tower of its own


def _icl(f: DistillFeatures) -> torch.Tensor:
    value = icl_loss(f.student_image, f.teacher_text, f.logit_scale)
    if f.student_has_text:  # CLIP-KD's ICL is symmetric: the teacher's images against the student's captions too
        value = 0.5 * (value + icl_loss(f.teacher_image, f.student_text, f.logit_scale))
    return value


def _relational(loss: Callable[..., torch.Tensor]) -> Callable[[DistillFeatures], torch.Tensor]:
    """A loss comparing the student's image-text affinities with the teacher's."""
    return lambda f: loss(f.student_image, f.student_text, f.teacher_image, f.teacher_text, f.logit_scale,
                          f.teacher_logit_scale)


class DistillLoss(NamedTuple):
    compute: Callable[[DistillFeatures], torch.Tensor]
    needs_text: bool  # reads the batch's captions (teacher_text / student_text)
    default_weight: float  # CLIP-KD / TinyCLIP's


LOSSES: Dict[str, DistillLoss] = {
    "cosine": DistillLoss(lambda f: cosine_loss(f.student_image, f.teacher_image), False, 1.0),
    "fd": DistillLoss(lambda f: fd_loss(f.student_image, f.teacher_image), False, 2000.0),
    "icl": DistillLoss(_icl, True, 1.0),
    "crd": DistillLoss(_relational(crd_loss), True, 1.0),
    "affinity": DistillLoss(_relational(affinity_loss), True, 1.0),
}
