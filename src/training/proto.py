"""Losses and clustering of ProtoRKD / ProtoCLIP, as pure functions (no training state).

- `simreg_loss`: SimReg, MSE between L2-normalised student and teacher features.
- `rkd_distance_loss`, `rkd_angle_loss`: Relational KD (Park et al. 2019): match the *relations* between
  samples (pairwise distances, triplet angles), so student and teacher dimensions may differ.
- `kmeans`: faiss k-means (on this rank's own GPU with faiss-gpu, else the CPU), labels by nearest centroid;
  `assign_to_centroids`: that labelling in bounded chunks (faiss search), never an N×k matrix.
- `translate_prototypes`: Prototypical Back Translation (ProtoCLIP): the centroid of cluster c expressed in
  another space = mean of that space's features of the samples labelled c.
- `proto_loss`: ProtoCLIP's prototype-level discrimination with soft (or hard) targets.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


# faiss's own default: k-means trains on at most this many points per centroid, sampled (ProtoCLIP's
# faiss.Kmeans uses it as is); every point is still labelled, by assign_to_centroids
DEFAULT_MAX_POINTS_PER_CENTROID = 256
# rows per faiss search in assign_to_centroids: bounds the float32 copy of the queries; faiss itself
# computes distances in blocks of a few thousand queries x centroids, never the whole N x k matrix
ASSIGN_CHUNK_ROWS = 1 << 16


def _points(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    return np.ascontiguousarray(features, dtype=np.float32)


def faiss_gpu(device: torch.device | str | None) -> Optional[int]:
    """The GPU faiss should use for a process on `device`: its index when that is a CUDA device and this
    faiss has GPU support, else None (CPU). Never "every visible GPU", which is faiss.Kmeans(gpu=True)'s
    choice: on an 8-GPU node each rank must keep to its own."""
    import faiss

    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return None
    if faiss.get_num_gpus() <= 0:
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _flat_index(dim: int, gpu: Optional[int]):
    """An exact L2 index on the CPU or on GPU `gpu` (that one only)."""
    import faiss

    if gpu is None:
        return faiss.IndexFlatL2(dim), None
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = int(gpu)
    return faiss.GpuIndexFlatL2(resources, dim, config), resources  # the resources must outlive the index


def kmeans(features, k: int, max_iter: int = 20, nredo: int = 1, seed: int = 0, gpu: Optional[int] = None,
           max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID) -> Tuple[torch.Tensor, torch.Tensor]:
    """faiss k-means on `features` (N, D): returns (centroids (k, D) float32, labels (N,) int64).

    Trained on at most `max_points_per_centroid` * k points (faiss samples them, seeded); labels of all N
    rows are the nearest centroid (L2), by `assign_to_centroids`. On GPU `gpu` (its index) when given, else
    on the CPU. Memory: O(N·D + k·D)."""
    points = _points(features)
    centroids = train_centroids(points, k, max_iter, nredo, seed, gpu, max_points_per_centroid)
    return torch.from_numpy(centroids), assign_to_centroids(points, centroids, gpu=gpu)


def train_centroids(points: np.ndarray, k: int, max_iter: int = 20, nredo: int = 1, seed: int = 0,
                    gpu: Optional[int] = None,
                    max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID) -> np.ndarray:
    """The k-means centroids (k, D) of float32 `points` (faiss.Clustering, what faiss.Kmeans runs)."""
    import faiss

    points = _points(points)
    if k > len(points):
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {len(points)}")
    clustering = faiss.Clustering(points.shape[1], k)
    clustering.niter, clustering.nredo, clustering.seed, clustering.verbose = max_iter, nredo, seed, False
    clustering.min_points_per_centroid = 1
    clustering.max_points_per_centroid = max_points_per_centroid
    index, _resources = _flat_index(points.shape[1], gpu)
    clustering.train(points, index)
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, points.shape[1]).copy()


def assign_to_centroids(features, centroids, gpu: Optional[int] = None,
                        chunk_rows: int = ASSIGN_CHUNK_ROWS) -> torch.Tensor:
    """Nearest centroid (L2) of each row: a faiss search (k=1) over the centroids, `chunk_rows` rows at a
    time. Memory O(N·D + k·D), never the N×k score matrix (2.7M rows × 20000 centroids would be 216 GB)."""
    centroids = _points(centroids)
    index, _resources = _flat_index(centroids.shape[1], gpu)
    index.add(centroids)
    num_rows = len(features)
    labels = np.empty(num_rows, dtype=np.int64)
    for start in range(0, num_rows, chunk_rows):
        _, nearest = index.search(_points(features[start:start + chunk_rows]), 1)
        labels[start:start + chunk_rows] = nearest[:, 0]
    return torch.from_numpy(labels)


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
