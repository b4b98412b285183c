"""Clustering of ProtoRKD / ProtoCLIP, as pure functions (no training state). The job's losses (SimReg,
RKD, the prototype loss) are distillation losses and live in compress.ops.distill_losses.

- `kmeans`: faiss k-means (on this rank's own GPU with faiss-gpu, else the CPU), labels by nearest centroid;
  `assign_to_centroids`: that labelling in bounded chunks (faiss search), never an N×k matrix.
- `translate_prototypes`: Prototypical Back Translation (ProtoCLIP): the centroid of cluster c expressed in
  another space = mean of that space's features of the samples labelled c.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from foundation.progress import Progress

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
           max_points_per_centroid: int = DEFAULT_MAX_POINTS_PER_CENTROID, desc: str = "k-means",
           show_progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """faiss k-means on `features` (N, D): returns (centroids (k, D) float32, labels (N,) int64).

    Trained on at most `max_points_per_centroid` * k points (faiss samples them, seeded); labels of all N
    rows are the nearest centroid (L2), by `assign_to_centroids`. On GPU `gpu` (its index) when given, else
    on the CPU. Memory: O(N·D + k·D). `show_progress`: both phases' progress under the name `desc`
    (foundation.progress: the elapsed time of faiss's training, the rows labelled)."""
    points = _points(features)
    with Progress(desc=f"{desc}: training {k} centroids ({max_iter} iterations x {nredo})",
                  enabled=show_progress) as training, training.ticking():
        centroids = train_centroids(points, k, max_iter, nredo, seed, gpu, max_points_per_centroid)
    with Progress(total=len(points), desc=f"{desc}: labelling by nearest centroid", unit="row",
                  enabled=show_progress) as labelling:
        labels = assign_to_centroids(points, centroids, gpu=gpu, progress=labelling.update)
    return torch.from_numpy(centroids), labels


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


def assign_to_centroids(features, centroids, gpu: Optional[int] = None, chunk_rows: int = ASSIGN_CHUNK_ROWS,
                        progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Nearest centroid (L2) of each row: a faiss search (k=1) over the centroids, `chunk_rows` rows at a
    time. Memory O(N·D + k·D), never the N×k score matrix (2.7M rows × 20000 centroids would be 216 GB).
    `progress(rows)` is called after each chunk with the rows it labelled."""
    centroids = _points(centroids)
    index, _resources = _flat_index(centroids.shape[1], gpu)
    index.add(centroids)
    num_rows = len(features)
    labels = np.empty(num_rows, dtype=np.int64)
    for start in range(0, num_rows, chunk_rows):
        _, nearest = index.search(_points(features[start:start + chunk_rows]), 1)
        labels[start:start + chunk_rows] = nearest[:, 0]
        if progress is not None:
            progress(len(nearest))
    return torch.from_numpy(labels)


def translate_prototypes(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Prototypical Back Translation: row c = mean of `features` of the samples labelled c (0 when none).

    `features` live in the space the prototypes are wanted in; `labels` come from clustering another
    modality. Rows are returned un-normalised (distill_losses.proto_loss normalises)."""
    sums = torch.zeros(k, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, labels.to(features.device), features.float())
    counts = torch.bincount(labels.to(features.device), minlength=k).clamp(min=1).unsqueeze(1)
    return sums / counts

