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
"""
from __future__ import annotations

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


def icl_loss(student_image: torch.Tensor, teacher_text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_tᵀ, diag) + CE(s·T_t I_sᵀ, diag)]: the student's images must find their captions in
    the teacher's text space."""
    logits_per_image, logits_per_text = _affinity_logits(student_image, teacher_text, logit_scale)
    labels = torch.arange(student_image.shape[0], device=student_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def crd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
             teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
             teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[KL(p_t^{i→t} ‖ p_s^{i→t}) + KL(p_t^{t→i} ‖ p_s^{t→i})] over the batch's affinity matrices."""
    s_image, s_text = _affinity_logits(student_image, student_text, student_logit_scale)
    t_image, t_text = _affinity_logits(teacher_image, teacher_text, teacher_logit_scale)
    return 0.5 * (_kl_rows(s_image, t_image) + _kl_rows(s_text, t_text))


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_logits.softmax(dim=-1) * student_logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def affinity_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                  teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
                  teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_sᵀ, softmax(s_t·I_t T_tᵀ)) + CE(transposes)] (TinyCLIP affinity mimicking)."""
    s_image, s_text = _affinity_logits(student_image, student_text, student_logit_scale)
    t_image, t_text = _affinity_logits(teacher_image, teacher_text, teacher_logit_scale)
    return 0.5 * (_soft_cross_entropy(s_image, t_image) + _soft_cross_entropy(s_text, t_text))


# name → (function, needs captions?, CLIP-KD/TinyCLIP default weight)
LOSSES = {
    "cosine": (cosine_loss, False, 1.0),
    "fd": (fd_loss, False, 2000.0),
    "icl": (icl_loss, True, 1.0),
    "crd": (crd_loss, True, 1.0),
    "affinity": (affinity_loss, True, 1.0),
}
