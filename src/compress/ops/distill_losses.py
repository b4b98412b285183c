"""Every student–teacher distillation (KD) loss of the project, as pure functions (no state): the distill
job's `--distill-loss` table, ProtoRKD's SimReg, relational (RKD) and prototype losses, and the prune job's
cross-modal KD terms (CLIP-KDPruning) are all defined here, once.

Conventions: `*_image`/`*_text` are feature batches (B, D) whose row i of the image batch belongs with row i
of the text batch; `logit_scale` is the *exponentiated* temperature (CLIP's `logit_scale.exp()`, 100 for a
trained CLIP). Logit pairs are (image→text, text→image), as open_clip's `ClipLoss.get_logits` returns them.

**Feature distances: one quantity.** For unit vectors ŝ, t̂ of width D, ‖ŝ − t̂‖² = 2 − 2·cos(ŝ, t̂). So the
three feature losses are `unit_feature_mse` (the mean over all B·D elements of (ŝ − t̂)², i.e.
mean‖ŝ − t̂‖² / D) of the L2-normalised features times a constant:

- `fd_loss`      CLIP-KD feature distillation = unit_feature_mse                  (CLIP-KD weight 2000)
- `simreg_loss`  ProtoRKD's SimReg, mean‖ŝ − t̂‖²  = D · unit_feature_mse
- `cosine_loss`  casCLIP / Cascade CLIP, mean(1 − cos) = D/2 · unit_feature_mse
- `feature_kd_loss`  the prune job's L_same = ½[unit_feature_mse(images) + unit_feature_mse(texts)] of
                     features the model has already normalised.

**Affinity losses** (the batch's image–text logits, each model at its own temperature):

- `soft_target_contrastive_loss`  CLIP-KDPruning's contrastive loss with targets
                 (1 − w)·ground truth + w·softmax(teacher logits); w = 0 is CLIP's loss.
- `affinity_loss`  TinyCLIP affinity mimicking / open_clip DistillClipLoss: the w = 1 case, soft cross-entropy
                 of the student's logits against the teacher's softmax, averaged over both directions.
- `crd_loss`     CLIP-KD contrastive relational distillation: KL(teacher ‖ student) of the same distributions.
                 Equals `affinity_loss` minus the teacher's entropy (constant in the student): same gradient,
                 different value.
- `logit_mse_loss`  the prune job's L_diff: ½[MSE(image→text logits) + MSE(text→image logits)].
- `soft_target_sigmoid_loss`  the sigmoid (SigLIP) counterpart of `soft_target_contrastive_loss`, on
                 `sigmoid_logits`: targets (1 − w)·identity + w·σ(teacher logits); w = 0 is SigLIP's loss.
- `icl_loss`     CLIP-KD interactive contrastive learning: InfoNCE student image ↔ teacher text.
- `sigmoid_affinity_loss`, `sigmoid_crd_loss`  the affinity and CRD losses of SigLIP pair logits (the distill
                 job under the sigmoid loss, where ICL is open_clip's SigLipLoss of student image ↔ teacher text).

**Relational and prototype losses** (ProtoRKD / ProtoCLIP; student and teacher widths may differ for RKD):

- `rkd_distance_loss`, `rkd_angle_loss`  Relational KD (Park et al. 2019): match the pairwise distances and
                 the triplet angles between samples.
- `proto_loss`   ProtoCLIP's prototype-level discrimination against the teacher's cluster structure
                 (`proto_targets`: soft or hard targets from the teacher-space centroids).

`LOSSES` maps each `--distill-loss` name to how it reads one step's `DistillFeatures`, whether it needs
captions, and its published default weight: the one table the distill job both parses and computes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

LogitPair = Tuple[torch.Tensor, torch.Tensor]  # (image→text, text→image)


# --- feature distances ---------------------------------------------------------------------------------


def unit_feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over every element of (s − t)² for rows already on the unit sphere: mean‖s − t‖² / D, which is
    mean(2 − 2·cos(s, t)) / D there. The one computation behind every feature-distance loss below."""
    return F.mse_loss(student, teacher)


def _unit_rows(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)


def fd_loss(student_image: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the L2-normalised features, averaged over every element (CLIP-KD)."""
    return unit_feature_mse(*_unit_rows(student_image, teacher_image))


def simreg_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the squared distance between L2-normalised features (SimReg) = D · fd_loss."""
    return student.shape[-1] * unit_feature_mse(*_unit_rows(student, teacher))


def cosine_loss(student_image: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cosine similarity (torch's CosineEmbeddingLoss with all targets +1) = D/2 · fd_loss:
    computed as a squared distance, exact where 1 − cos would cancel (student close to teacher)."""
    return 0.5 * student_image.shape[-1] * unit_feature_mse(*_unit_rows(student_image, teacher_image))


def feature_kd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                    teacher_text: torch.Tensor) -> torch.Tensor:
    """½[unit_feature_mse(images) + unit_feature_mse(texts)] of features the models already normalised
    (CLIP-KDPruning's L_same; not normalised again, so a bf16 teacher's features are compared as it gave them)."""
    return (unit_feature_mse(student_image, teacher_image) + unit_feature_mse(student_text, teacher_text)) / 2


# --- affinity (logit) losses ----------------------------------------------------------------------------


def affinity_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> LogitPair:
    """(s·I Tᵀ, its transpose): one batch's image→text and text→image logits on one device."""
    logits_per_image = logit_scale * image @ text.T
    return logits_per_image, logits_per_image.T


def icl_loss(student_image: torch.Tensor, teacher_text: torch.Tensor,
             logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_tᵀ, diag) + CE(s·T_t I_sᵀ, diag)]: the student's images must find their captions in
    the teacher's text space."""
    logits_per_image, logits_per_text = affinity_logits(student_image, teacher_text, logit_scale)
    labels = torch.arange(student_image.shape[0], device=student_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def soft_target_contrastive_loss(student_logits: LogitPair, teacher_logits: LogitPair, labels: torch.Tensor,
                                 teacher_weight: float = 1.0) -> torch.Tensor:
    """½[CE(s^{i→t}, y^{i→t}) + CE(s^{t→i}, y^{t→i})] with soft targets y = (1 − w)·one-hot(labels) +
    w·softmax(teacher logits), w = `teacher_weight` (CLIP-KDPruning's contrastive loss). `labels` index each
    row's positive column (the ground truth open_clip's ClipLoss gives for these logits). Linear in w:
    (1 − w)·CLIP's contrastive loss + w·the affinity loss of these logits."""
    student_i2t, student_t2i = student_logits
    teacher_i2t, teacher_t2i = teacher_logits
    hard = F.one_hot(labels, student_i2t.shape[1]).to(student_i2t.dtype)
    target_i2t = (1 - teacher_weight) * hard + teacher_weight * teacher_i2t.softmax(-1)
    target_t2i = (1 - teacher_weight) * hard + teacher_weight * teacher_t2i.softmax(-1)
    return (F.cross_entropy(student_i2t, target_i2t) + F.cross_entropy(student_t2i, target_t2i)) / 2


def affinity_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                  teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
                  teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[CE(s·I_s T_sᵀ, softmax(s_t·I_t T_tᵀ)) + CE(transposes)] (TinyCLIP affinity mimicking): the
    `soft_target_contrastive_loss` with the teacher's softmax as the whole target (w = 1)."""
    labels = torch.arange(student_image.shape[0], device=student_image.device)
    return soft_target_contrastive_loss(affinity_logits(student_image, student_text, student_logit_scale),
                                        affinity_logits(teacher_image, teacher_text, teacher_logit_scale),
                                        labels, teacher_weight=1.0)


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def crd_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
             teacher_text: torch.Tensor, student_logit_scale: torch.Tensor | float,
             teacher_logit_scale: torch.Tensor | float) -> torch.Tensor:
    """½[KL(p_t^{i→t} ‖ p_s^{i→t}) + KL(p_t^{t→i} ‖ p_s^{t→i})] over the batch's affinity matrices."""
    s_image, s_text = affinity_logits(student_image, student_text, student_logit_scale)
    t_image, t_text = affinity_logits(teacher_image, teacher_text, teacher_logit_scale)
    return 0.5 * (_kl_rows(s_image, t_image) + _kl_rows(s_text, t_text))


def sigmoid_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                   logit_bias: torch.Tensor | float) -> torch.Tensor:
    """s·I Tᵀ + b: SigLIP's pair logits (open_clip's `SigLipLoss.get_logits`), each pair scored on its own."""
    return logit_scale * image @ text.T + logit_bias


def soft_target_sigmoid_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             teacher_weight: float = 1.0) -> torch.Tensor:
    """SigLIP's sigmoid loss with soft targets, the sigmoid counterpart of `soft_target_contrastive_loss`:
    Σ_ij BCE(σ(s_ij), y_ij) / n with y = (1 − w)·I + w·σ(teacher logits), w = `teacher_weight`. w = 0 is
    open_clip's SigLipLoss of these logits (−Σ log σ(z_ij·s_ij) / n, z = +1 on the diagonal, −1 off it)."""
    n = student_logits.shape[0]
    hard = torch.eye(n, device=student_logits.device, dtype=student_logits.dtype)
    target = (1 - teacher_weight) * hard + teacher_weight * torch.sigmoid(teacher_logits.to(student_logits.dtype))
    return F.binary_cross_entropy_with_logits(student_logits, target, reduction="sum") / n


def logit_mse_loss(student_logits: LogitPair, teacher_logits: LogitPair) -> torch.Tensor:
    """½[MSE(s^{i→t}, t^{i→t}) + MSE(s^{t→i}, t^{t→i})], each model's logits at its own temperature
    (CLIP-KDPruning's L_diff)."""
    return (F.mse_loss(student_logits[0], teacher_logits[0]) + F.mse_loss(student_logits[1], teacher_logits[1])) / 2


# --- relational and prototype losses (ProtoRKD / ProtoCLIP) ---------------------------------------------


def _normalised_pairwise_distances(features: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix divided by its mean off-diagonal (non-zero) entry: scale-free, so a
    student and a teacher whose features have different norms or dimensions can be compared."""
    distances = torch.cdist(features, features)
    off_diagonal = ~torch.eye(len(features), dtype=torch.bool, device=features.device)
    mean = distances[off_diagonal & (distances > 0)].mean()
    return distances / mean


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the two normalised pairwise-distance matrices (RKD distance term)."""
    with torch.no_grad():
        target = _normalised_pairwise_distances(teacher.float())
    return F.smooth_l1_loss(_normalised_pairwise_distances(student.float()), target)


def _triplet_angle_cosines(features: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between samples i and k, for all (i, j, k): entry [j, i, k]."""
    differences = F.normalize(features.unsqueeze(0) - features.unsqueeze(1), dim=2)  # [j, i] = e_i - e_j
    return torch.bmm(differences, differences.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the triplet angle cosines of student and teacher (RKD angle term). O(B³) memory."""
    with torch.no_grad():
        target = _triplet_angle_cosines(teacher.float())
    return F.smooth_l1_loss(_triplet_angle_cosines(student.float()), target)


def proto_targets(target_centroids: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(C[y] Cᵀ / T) over prototypes with C the L2-normalised target centroids; one-hot when T ≤ 0."""
    if temperature is None or temperature <= 0:
        return F.one_hot(labels, num_classes=len(target_centroids)).float()
    centroids = F.normalize(target_centroids.float(), dim=-1)
    return torch.softmax(centroids[labels] @ centroids.T / temperature, dim=1)


def proto_loss(features: torch.Tensor, prototypes: torch.Tensor, target_centroids: torch.Tensor,
               labels: torch.Tensor, scale: torch.Tensor, target_temperature: float) -> torch.Tensor:
    """ProtoCLIP's prototype loss: cross-entropy between softmax(τ · f Pᵀ) (f, P L2-normalised; `scale` = τ,
    i.e. exp of the learnable log-temperature, as open_clip's ClipLoss takes it) and the targets of
    `proto_targets`. Rows with label −1 are ignored."""
    keep = labels >= 0
    if not bool(keep.any()):
        return (features.sum() + scale) * 0.0  # still part of the graph: DDP expects every used input's gradient
    features, labels = features[keep], labels[keep]
    logits = scale * F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    targets = proto_targets(target_centroids, labels, target_temperature).to(logits.device)
    return F.cross_entropy(logits, targets)  # probability targets: −Σ y·log_softmax(logits), mean over rows


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
    # SigLIP's sigmoid loss: `contrastive(images, captions)` is the run's image–caption loss at the student's
    # temperature and bias (open_clip's SigLipLoss across ranks, training.jobs.Job.contrastive_loss), and the
    # affinity losses compare sigmoid pair logits, each model's with its own bias. None: the softmax losses.
    contrastive: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    logit_bias: Optional[torch.Tensor | float] = None
    teacher_logit_bias: Optional[torch.Tensor | float] = None


def _icl(f: DistillFeatures) -> torch.Tensor:
    pair = f.contrastive or (lambda image, text: icl_loss(image, text, f.logit_scale))
    value = pair(f.student_image, f.teacher_text)
    if f.student_has_text:  # CLIP-KD's ICL is symmetric: the teacher's images against the student's captions too
        value = 0.5 * (value + pair(f.teacher_image, f.student_text))
    return value


def _sigmoid_pair_logits(f: DistillFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) SigLIP pair logits of the batch, each model at its own temperature and bias."""
    if f.teacher_logit_bias is None:
        raise ValueError("the sigmoid affinity losses need the teacher's logit bias")
    return (sigmoid_logits(f.student_image, f.student_text, f.logit_scale, f.logit_bias),
            sigmoid_logits(f.teacher_image, f.teacher_text, f.teacher_logit_scale, f.teacher_logit_bias))


def _relational(loss: Callable[..., torch.Tensor], sigmoid: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> Callable[[DistillFeatures], torch.Tensor]:
    """A loss comparing the student's image-text affinities with the teacher's: `loss` of the softmax
    affinities, or under SigLIP's loss `sigmoid(student pair logits, teacher pair logits)`."""
    def compute(f: DistillFeatures) -> torch.Tensor:
        if f.contrastive is not None:
            return sigmoid(*_sigmoid_pair_logits(f))
        return loss(f.student_image, f.student_text, f.teacher_image, f.teacher_text, f.logit_scale,
                    f.teacher_logit_scale)
    return compute


def sigmoid_affinity_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`affinity_loss` under SigLIP: each pair's BCE against the teacher's pair probability σ(t_ij), summed over
    pairs / n (`soft_target_sigmoid_loss` at w = 1, the prune job's sigmoid KD target)."""
    return soft_target_sigmoid_loss(student_logits, teacher_logits, 1.0)


def sigmoid_crd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`crd_loss` under SigLIP: Σ_ij KL(Bernoulli(σ(t_ij)) ‖ Bernoulli(σ(s_ij))) / n, the sigmoid affinity loss
    minus the teacher's own (its pairs' entropy, constant in the student): same gradient, zero at the teacher."""
    return (sigmoid_affinity_loss(student_logits, teacher_logits)
            - sigmoid_affinity_loss(teacher_logits.to(student_logits.dtype), teacher_logits))


class DistillLoss(NamedTuple):
    """One entry of `LOSSES`: how to compute a distillation loss from `DistillFeatures`, and what it needs."""

    compute: Callable[[DistillFeatures], torch.Tensor]
    needs_text: bool  # reads the batch's captions (teacher_text / student_text)
    default_weight: float  # CLIP-KD / TinyCLIP's


LOSSES: Dict[str, DistillLoss] = {
    "cosine": DistillLoss(lambda f: cosine_loss(f.student_image, f.teacher_image), False, 1.0),
    "fd": DistillLoss(lambda f: fd_loss(f.student_image, f.teacher_image), False, 2000.0),
    "icl": DistillLoss(_icl, True, 1.0),
    "crd": DistillLoss(_relational(crd_loss, sigmoid_crd_loss), True, 1.0),
    "affinity": DistillLoss(_relational(affinity_loss, sigmoid_affinity_loss), True, 1.0),
}
