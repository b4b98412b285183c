"""ProtoRKD's clustering (training/proto.py) in bounded memory: chunked assignment, k-means on a sample of
points per centroid labelling every row, faiss on the local rank's GPU only."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO, subprocess_env

from training import proto


def test_chunked_assignment_equals_the_dense_argmin():
    generator = torch.Generator().manual_seed(0)
    features, centroids = torch.randn(1000, 8, generator=generator), torch.randn(37, 8, generator=generator)
    dense = torch.cdist(features, centroids).argmin(dim=1)
    assert torch.equal(proto.assign_to_centroids(features, centroids, chunk_rows=7), dense)
    assert torch.equal(proto.assign_to_centroids(features.numpy(), centroids.numpy()), dense)


@pytest.mark.slow
def test_assignment_memory_is_linear_not_rows_times_clusters():
    """200k rows x 5000 centroids: a dense score matrix would be 4 GB; the labelling stays near the features'
    own 12.8 MB (peak resident memory of a fresh process, above its baseline after imports)."""
    code = """
import resource, numpy as np, torch, faiss
from training import proto
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
x, c = rng.standard_normal((200_000, 16), dtype=np.float32), rng.standard_normal((5000, 16), dtype=np.float32)
labels = proto.assign_to_centroids(x, c)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, len(labels))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120, check=True)
    peak_mib, rows = result.stdout.split()
    assert int(rows) == 200_000 and float(peak_mib) < 300, peak_mib


def test_kmeans_samples_points_per_centroid_but_labels_every_row():
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(500, 4, generator=generator) * 0.01 + 5,
                       torch.randn(500, 4, generator=generator) * 0.01 - 5])
    centroids, labels = proto.kmeans(blobs, k=2, max_iter=10, seed=0, max_points_per_centroid=20)
    assert labels.shape == (1000,) and len(set(labels[:500].tolist())) == len(set(labels[500:].tolist())) == 1
    assert torch.allclose(centroids[labels[0]], blobs[:500].mean(0), atol=1e-2)


def test_faiss_uses_the_local_ranks_gpu_only(monkeypatch):
    import faiss

    assert proto.faiss_gpu(torch.device("cpu")) is None
    if not hasattr(faiss, "StandardGpuResources"):
        assert proto.faiss_gpu(torch.device("cuda", 3)) is None  # faiss-cpu: k-means on the CPU
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 8)
    assert proto.faiss_gpu(torch.device("cuda", 3)) == 3  # rank 3's GPU, not every visible one
