"""Losses and clustering of ProtoRKD / ProtoCLIP, as pure functions (no training state).

- `simreg_loss`: SimReg, MSE between L2-normalised student and teacher features.
- `rkd_distance_loss`, `rkd_angle_loss`: Relational KD (Park et al. 2019): match the *relations* between
  samples (pairwise distances, triplet angles), so student and teacher dimensions may differ.
- `kmeans`: faiss k-means (GPU when faiss sees one), labels by nearest centroid.
- `translate_prototypes`: Prototypical Back Translation (ProtoCLIP): the centroid of cluster c expressed in
  another space = mean of that space's features of the samples labelled c.
- `proto_loss`: ProtoCLIP's prototype-level discrimination with soft (or hard) targets.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def simreg_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the squared distance between L2-normalised features (SimReg)."""
    diff = F.normalize(student, dim=-1) - F.normalize(teacher, dim=-1)
    return diff.pow(2).sum(dim=-1).mean()


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


# --- clustering --------------------------------------------------------------------------------------


def kmeans(features: torch.Tensor, k: int, max_iter: int = 20, nredo: int = 1, seed: int = 0,
           use_gpu: bool | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """faiss k-means on `features` (N, D): returns (centroids (k, D) float32, labels (N,) int64).

    Labels are the nearest centroid (L2). faiss uses the GPU when it sees one (`faiss.get_num_gpus()`),
    unless `use_gpu=False`.
    """
    import faiss

    points = np.ascontiguousarray(features.detach().float().cpu().numpy())
    if k > len(points):
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {len(points)}")
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    clustering = faiss.Kmeans(points.shape[1], k, niter=max_iter, nredo=nredo, seed=seed, gpu=use_gpu,
                              verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    clustering.train(points)
    _, labels = clustering.index.search(points, 1)
    return torch.from_numpy(clustering.centroids.copy()), torch.from_numpy(labels[:, 0].astype(np.int64))


def assign_to_centroids(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (L2) of each row: argmax of 2 x·c − |c|² (same labels as faiss' index search)."""
    features, centroids = features.float(), centroids.float().to(features.device)
    scores = 2 * features @ centroids.T - centroids.pow(2).sum(dim=1)
    return scores.argmax(dim=1)


def translate_prototypes(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Prototypical Back Translation: row c = mean of `features` of the samples labelled c (0 when none).

    `features` live in the space the prototypes are wanted in; `labels` come from clustering another
    modality. Rows are returned un-normalised (proto_loss normalises)."""
    sums = torch.zeros(k, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels.to(features.device), features.float())
    counts = torch.bincount(labels.to(features.device), minlength=k).clamp(min=1).unsqueeze(1)
    return sums / counts


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
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
