"""Cascaded text→image search (casCLIP, Cascade CLIP): a cheap encoder shortlists, larger encoders re-rank.

Level 1 embeds the whole gallery once with the cheapest image encoder into a faiss inner-product index
(normalised features: cosine). For a query, level 1 returns its top-m_1 gallery images; level 2 embeds those
candidates it has not seen yet (lazily, cached for every later query) and keeps the top-m_2 by its own
scores; … the last level returns the top-k. Every level scores against the same query embedding, so all
image encoders must live in one text embedding space (a distilled student paired with its teacher's text
tower, a pruned copy of the large CLIP, …).

Scoring after level 1 is exact (float64 dot products over the candidates); ties go to the lower gallery
index. Level 1 uses faiss (float32) only to choose the candidates. An encoder that appears at several
levels is embedded once (its cache is shared), so a cascade of one encoder ranks exactly like that encoder.

This is only the search; `python -m compress.cascade` (compress/cascade.py) is the experiment harness that
times it and scores its recall.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


class CachedImageEncoder:
    """Embeds gallery images by index, each at most once. Missing images are embedded in ascending index
    order in batches of `batch_size`, so results do not depend on which query asked first."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256):
        self.encode = encode
        self.images = images
        self.batch_size = batch_size
        self.features: Optional[torch.Tensor] = None
        self.done = torch.zeros(len(images), dtype=torch.bool)
        self.encoded = 0  # images embedded so far (the cost this level paid)
        self.seconds = 0.0  # wall time spent embedding them

    @torch.no_grad()
    def ensure(self, indices: torch.Tensor) -> None:
        missing = torch.unique(indices.flatten())
        missing = missing[~self.done[missing]]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            began = time.perf_counter()
            features = self.encode(self.images[chunk]).float().cpu()
            self.seconds += time.perf_counter() - began
            if self.features is None:
                self.features = torch.zeros(len(self.images), features.shape[1], dtype=torch.float32)
            self.features[chunk] = features
            self.done[chunk] = True
            self.encoded += len(chunk)

    def all_features(self) -> torch.Tensor:
        self.ensure(torch.arange(len(self.images)))
        return self.features


def rank_candidates(query_features: torch.Tensor, gallery_features: torch.Tensor, candidates: torch.Tensor,
                    keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (Q, keep) candidates with the highest float64 scores, best first (ties → lower gallery index),
    and those scores."""
    candidates, _ = candidates.sort(dim=1)  # the stable sort below then breaks ties by index
    # gathered candidate features are Q×m×D: score in query chunks of ≲ 2**24 elements (m = N on COCO is big)
    rows = max(1, (1 << 24) // max(1, candidates.shape[1] * gallery_features.shape[1]))
    scores = torch.cat([
        torch.einsum("qd,qmd->qm", query_features[i:i + rows].double(),
                     gallery_features[candidates[i:i + rows]].double())
        for i in range(0, len(candidates), rows)])
    best = torch.sort(scores, dim=1, descending=True, stable=True)
    return candidates.gather(1, best.indices[:, :keep]), best.values[:, :keep]


class Cascade:
    """r-level cascade over one gallery. `encoders[i]` maps an image batch to (normalised) features;
    `ms[i]` is how many candidates level i+1 passes on (len(ms) == len(encoders) - 1)."""

    def __init__(self, encoders: Sequence[Callable[[torch.Tensor], torch.Tensor]], ms: Sequence[int],
                 images: Sequence[torch.Tensor] | torch.Tensor, batch_size: int = 256):
        if len(ms) != len(encoders) - 1:
            raise ValueError(f"{len(encoders)} levels need {len(encoders) - 1} candidate counts m, got {list(ms)}")
        if isinstance(images, torch.Tensor):
            images = [images] * len(encoders)
        self.gallery_size = len(images[0])
        self.ms = [min(int(m), self.gallery_size) for m in ms]
        if any(m < 1 for m in self.ms):
            raise ValueError(f"candidate counts must be positive, got {list(ms)}")
        caches: Dict[Tuple[int, int], CachedImageEncoder] = {}
        self.levels: List[CachedImageEncoder] = []
        for encode, level_images in zip(encoders, images):
            key = (id(encode), id(level_images))  # one encoder on the same images: one cache
            if key not in caches:
                caches[key] = CachedImageEncoder(encode, level_images, batch_size)
            self.levels.append(caches[key])
        self.index = None

    def build(self) -> None:
        """Level 1 embeds the whole gallery into a faiss inner-product index."""
        import faiss

        features = np.ascontiguousarray(self.levels[0].all_features().numpy(), dtype=np.float32)
        self.index = faiss.IndexFlatIP(features.shape[1])
        self.index.add(features)

    @torch.no_grad()
    def search(self, query_features: torch.Tensor, k: int) -> torch.Tensor:
        """(Q, k) gallery indices, best first, for L2-normalised query features (Q, D)."""
        return self.search_scored(query_features, k)[0]

    @torch.no_grad()
    def search_scored(self, query_features: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """`search`'s (Q, k) indices and the last level's float64 scores of them: what a recall that counts
        ties against the model (eval.metrics) needs, since the indices alone hide ties."""
        if self.index is None:
            self.build()
        k = min(k, self.gallery_size)
        query_features = query_features.float().cpu()
        keeps = self.ms + [k]  # how many candidates each level passes on; the last level gives the top-k
        if keeps[0] >= self.gallery_size:  # everything passes: no search needed
            candidates = torch.arange(self.gallery_size).expand(len(query_features), -1)
        else:
            _, found = self.index.search(np.ascontiguousarray(query_features.numpy()), keeps[0])
            candidates = torch.from_numpy(found).long()
        # level 1's own order only matters when it is the last level
        for level_index in range(0 if len(self.levels) == 1 else 1, len(self.levels)):
            level = self.levels[level_index]
            level.ensure(candidates)
            keep = min(keeps[level_index], candidates.shape[1])
            candidates, scores = rank_candidates(query_features, level.features, candidates, keep)
        return candidates[:, :k], scores[:, :k]

    def _unique_levels(self) -> List[Optional[CachedImageEncoder]]:
        seen, unique = set(), []
        for level in self.levels:
            unique.append(None if id(level) in seen else level)
            seen.add(id(level))
        return unique

    def images_encoded(self) -> List[int]:
        """Images each level embedded so far (shared caches count once, at their first level)."""
        return [level.encoded if level else 0 for level in self._unique_levels()]

    def image_seconds(self) -> float:
        """Wall time all levels spent embedding images so far."""
        return sum(level.seconds for level in self._unique_levels() if level)
