"""Metrics on embeddings and logits: classification accuracy and retrieval recall.

Both rest on one idea: the *rank* of the right answer among the candidates, counted as the number of wrong
candidates that score at least as high as it. Two consequences are deliberate:

- Ties count against the model (pessimistic). A collapsed model whose embeddings are all equal scores 0,
  not a perfect recall that `topk` might hand it by index order. NaN scores (a diverged model) count as the
  worst score for the same reason.
- Counting needs no top-k list, so recall@k for every k comes from one pass, and a k larger than the gallery
  is simply "always a hit".

A search that returns only a best-first list (the cascade, compress.ops.cascade) is scored by the same rule:
`ranks_in_ranking` counts, from the list's scores, the listed candidates that score at least as high as the
target, and `recall_at_ks` turns any ranks into recall@k for both kinds of caller.
`overlap_at_k` scores such a list against a reference search's list instead of a labelled target.

Similarities are computed in chunks of queries, so a 5k × 25k or a 100k gallery needs only
`chunk × gallery` floats at a time.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch

# How many similarity entries one chunk may hold (64 MiB of float32): bounds memory for any gallery size.
DEFAULT_CHUNK_ELEMENTS = 2**24


def _chunk_rows(num_queries: int, gallery_size: int, max_elements: int) -> int:
    return max(1, min(num_queries, max_elements // max(1, gallery_size)))


def _finite_scores(scores: torch.Tensor) -> torch.Tensor:
    # NaN compares False with everything, which would make a NaN positive look like rank 0.
    return torch.nan_to_num(scores, nan=float("-inf"))


# --- classification ------------------------------------------------------------------------------------


def rank_of_true_class(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each row, how many *other* classes score >= the true class (0 = correct at top-1)."""
    # Half precision is widened for the comparisons; float64 (the cascade's exact scores) is kept, because
    # rounding it to float32 could merge close scores into ties that would then count against the model.
    logits = _finite_scores(logits if logits.dtype == torch.float64 else logits.float())
    true_scores = logits.gather(1, labels.view(-1, 1))
    # The true class ties with itself; subtract it.
    return (logits >= true_scores).sum(dim=1) - 1


# The accuracies reported unless a caller asks for others: CLIP_benchmark's acc1 and acc5.
DEFAULT_TOPK = (1, 5)


def check_topk(topk: Iterable[int]) -> Tuple[int, ...]:
    """The distinct k of `topk`, ascending; ValueError unless every k is a whole number >= 1."""
    ks = tuple(topk)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"top-k accuracies need whole numbers k >= 1, got {list(ks)}")
    return tuple(sorted(set(ks)))


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, prefix: str = "",
    topk: Iterable[int] = DEFAULT_TOPK,
) -> Dict[str, float]:
    """`acc{k}` for every k of `topk` (default acc1, acc5) and `mean_per_class_recall` (balanced top-1
    accuracy), as CLIP_benchmark names them.

    `prefix="lp_"` gives the linear-probe names. acc{k} with fewer than k classes is 1.0 (clamped k).
    """
    labels = labels.to(logits.device).long()
    num_classes = num_classes or logits.shape[1]
    ranks = rank_of_true_class(logits, labels)
    correct_top1 = (ranks == 0).float()
    # the rank counts the classes scoring at least as high as the true one, so one pass gives every k
    metrics = {f"{prefix}acc{k}": (ranks < k).float().mean().item() for k in check_topk(topk)}
    # Mean over the classes present in `labels` of their top-1 recall (classes absent from the set are skipped
    # rather than counted as 0, so a small test split doesn't drag the number down).
    per_class_hits = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, correct_top1)
    per_class_counts = torch.bincount(labels, minlength=num_classes).float()
    present = per_class_counts > 0
    metrics[f"{prefix}mean_per_class_recall"] = (per_class_hits[present] / per_class_counts[present]).mean().item()
    return metrics


# --- retrieval -----------------------------------------------------------------------------------------


def recall_at_ks(ranks: torch.Tensor, ks: Iterable[int]) -> Dict[int, float]:
    """{k: fraction of queries whose right answer has rank < k}, rank as `retrieval_ranks` and
    `ranks_in_ranking` count it (wrong candidates scoring >= the right one)."""
    return {k: (ranks < k).float().mean().item() for k in ks}


# Rank of a target that a result list does not hold: a miss at every k.
NOT_RETRIEVED = torch.iinfo(torch.long).max


def ranks_in_ranking(ranked: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each query's target within its best-first result list: `ranked[q]` (Q, L) gallery indices,
    `scores[q]` their scores, `targets[q]` the right gallery index. Ties count against the model, as in
    `retrieval_ranks`; a target missing from the list gets NOT_RETRIEVED.

    Only listed candidates are counted, so for a top-L list of a larger candidate set the ranks decide
    recall@k exactly for k < L: a candidate tied with the target but cut off after position L can only push
    it to rank L or beyond. Ask the search for one result more than the largest k.
    """
    found = ranked == targets.view(-1, 1).to(ranked.device)
    position = found.int().argmax(dim=1)  # first match; 0 (ignored below) where there is none
    ranks = rank_of_true_class(scores, position)
    return torch.where(found.any(dim=1), ranks, torch.full_like(ranks, NOT_RETRIEVED))


def overlap_at_k(ranked: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Mean over queries of the share of `reference[q]`'s first k results that `ranked[q]`'s first k hold:
    how approximate nearest-neighbour search is judged, with the exact search's (here the large model's own)
    top k as the reference. Both are (Q, L) best-first gallery indices; 1.0 means the same top-k set,
    whatever its order. Unlike recall against a labelled target it needs no ground truth, so it measures how
    faithfully an approximate search reproduces the exact one even where the exact one seldom finds the target.
    A `ranked` list shorter than k (a cascade that keeps only m < k candidates) counts its missing places as misses.
    """
    if k < 1 or reference.shape[1] < k:
        raise ValueError(f"overlap@{k} needs k >= 1 and at least k reference results per query, got "
                         f"{reference.shape[1]}")
    if ranked.shape[0] != reference.shape[0]:
        raise ValueError(f"overlap@{k}: {ranked.shape[0]} ranked queries against {reference.shape[0]} references")
    reference = reference[:, :k].to(ranked.device)
    shared = (reference.unsqueeze(2) == ranked[:, :k].unsqueeze(1)).any(dim=2)  # (Q, k): reference entry found
    return shared.float().sum(dim=1).div(k).mean().item()


@torch.no_grad()
def retrieval_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions from one pass over the similarity matrix, a chunk of image rows at a time.

    Returns (text_ranks [num_images]: non-matching captions scoring >= the image's best matching caption,
             image_ranks [num_texts]: other images scoring >= the caption's own image).

    Per chunk this costs the matmul plus two comparisons and two sums; the matching pairs are read by
    gather, and their own contribution to each count is subtracted instead of masked out of the
    [chunk × gallery] matrix. Each subtraction uses the very matmul values it was counted with, so it is exact.
    """
    device = image_features.device
    text_features = text_features.to(device)
    text_to_image = text_to_image.to(device)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    finite = bool(torch.isfinite(image_features).all() and torch.isfinite(text_features).all())

    # Captions grouped by image, so a chunk of images finds its captions by slicing.
    captions_by_image = torch.argsort(text_to_image, stable=True)
    image_boundaries = torch.searchsorted(text_to_image[captions_by_image], torch.arange(num_images + 1, device=device))
    # Threshold for text → image: the caption's score with its own image (from a dot product; the matmul's
    # own rounding of that pair is what gets subtracted below).
    own_image_scores = _finite_scores((text_features * image_features[text_to_image]).sum(dim=1))

    text_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    image_ranks = torch.zeros(num_texts, dtype=torch.long, device=device)
    rows = _chunk_rows(num_images, num_texts, max_chunk_elements)
    # Comparisons are written as 0./1. floats into one reused buffer and summed as floats: ~5x faster than
    # summing a bool tensor (which casts to int64 first), and exact (counts stay far below 2**24).
    hits_buffer = torch.empty(rows, num_texts, device=device, dtype=torch.float32)
    for start in range(0, num_images, rows):
        stop = min(start + rows, num_images)
        hits = hits_buffer[: stop - start]
        scores = image_features[start:stop] @ text_features.T  # [chunk, num_texts]
        if not finite:
            scores = _finite_scores(scores)
        # The matching (image, caption) pairs of this chunk and their scores.
        match_texts = captions_by_image[image_boundaries[start] : image_boundaries[stop]]
        match_rows = text_to_image[match_texts] - start
        match_scores = scores[match_rows, match_texts]

        # Image → text: count captions >= the best match, minus the matches among them.
        best_match = torch.full((stop - start,), float("-inf"), device=device)
        best_match = best_match.scatter_reduce(0, match_rows, match_scores, reduce="amax")
        matches_at_best = torch.zeros(stop - start, dtype=torch.long, device=device).index_add_(
            0, match_rows, (match_scores >= best_match[match_rows]).long()
        )
        text_ranks[start:stop] = torch.ge(scores, best_match.view(-1, 1), out=hits).sum(dim=1).long() - matches_at_best

        # Text → image: count images >= the caption's own-image score, minus its own image when in this chunk.
        image_ranks += torch.ge(scores, own_image_scores.view(1, -1), out=hits).sum(dim=0).long()
        image_ranks.index_add_(0, match_texts, -(match_scores >= own_image_scores[match_texts]).long())
    return text_ranks, image_ranks


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Iterable[int] = (1, 5, 10),
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Dict[str, float]:
    """`text_retrieval_recall@k` (per image: any of its captions in its top k), `image_retrieval_recall@k`
    (per caption: its image in top k), and `mean_recall` (mean of all of them).

    Features should be L2-normalised (cosine similarity); `text_to_image[j]` is the image index of caption j.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    if text_to_image.numel() != text_features.shape[0]:
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {text_features.shape[0]} captions")
    image_features, text_features = image_features.float(), text_features.float()
    t_ranks, i_ranks = retrieval_ranks(image_features, text_features, text_to_image, max_chunk_elements)
    ks = list(ks)
    metrics: Dict[str, float] = {}
    for direction, ranks in (("image", i_ranks), ("text", t_ranks)):
        metrics.update({f"{direction}_retrieval_recall@{k}": v for k, v in recall_at_ks(ranks, ks).items()})
    recalls = [v for name, v in metrics.items() if "_recall@" in name]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


# --- feature analysis ----------------------------------------------------------------------------------


def feature_statistics(image_features: torch.Tensor, text_features: torch.Tensor) -> Dict[str, float]:
    """Modality gap and spread of L2-normalised features.

    `modality_gap`: distance between the mean image embedding and the mean text embedding (Liang et al. 2022).
    `image_feature_std` / `text_feature_std`: per-dimension standard deviation across samples, averaged over
    dimensions — near 0 means the modality has collapsed to one point.
    """
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return {
        "modality_gap": (image_features.mean(0) - text_features.mean(0)).norm().item(),
        "image_feature_std": image_features.std(0).mean().item() if len(image_features) > 1 else 0.0,
        "text_feature_std": text_features.std(0).mean().item() if len(text_features) > 1 else 0.0,
    }
