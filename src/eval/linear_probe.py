"""Linear probe: multinomial logistic regression on frozen image features, in torch (CPU or GPU).

The L2 penalty is chosen on a validation split carved from TRAIN (a coarse decade grid over 1e-6…1e2, then a
quarter-decade grid around the best), and the probe is refit on all of train with that value. The test set is
only ever used for the final numbers — `select_weight_decay` is never given it. (ProtoCLIP picked its best
epoch on test; CLIP_benchmark searches on a validation split like this.)

Full-batch L-BFGS: the problem is convex and small (N×D features, D×C weights), so at most 100
quasi-Newton steps from a zero start converge deterministically — the whole search (~17 fits) takes about a
second for 2k × 128 features on one CPU core. The same code runs on GPU features for large sets.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from eval.metrics import DEFAULT_TOPK, classification_metrics

# Below this many feature values, one CPU thread is faster: each L-BFGS step is a few tiny matmuls, and
# intra-op thread hand-offs cost more than the maths (40x slower with 2 threads on a loaded 2-core box).
SINGLE_THREAD_MAX_ELEMENTS = 2_000_000
COARSE_LOG10_WEIGHT_DECAYS = [float(e) for e in range(-6, 3)]  # 1e-6 … 1e2
FINE_STEPS_PER_DECADE = 4


@contextlib.contextmanager
def _threads_for(features: torch.Tensor) -> Iterator[None]:
    if features.device.type != "cpu" or features.numel() > SINGLE_THREAD_MAX_ELEMENTS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 100
) -> nn.Linear:
    """Minimise mean cross-entropy + weight_decay·‖W‖² (bias not penalised) from a zero start."""
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        # Validation accuracy, not the last digit of the loss, is what the search needs.
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels) + weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(features):  # callers often sit inside no_grad (eval loops)
        optimizer.step(closure)
    return classifier.eval()


def split_train_validation(num_samples: int, val_fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random (train, val) index split of the training set; both parts non-empty when num_samples >= 2."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_samples, generator=generator)
    num_val = min(num_samples - 1, max(1, round(val_fraction * num_samples)))
    return order[num_val:], order[:num_val]


@torch.no_grad()
def select_weight_decay(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> Tuple[float, List[Dict[str, float]]]:
    """The weight decay with the best validation accuracy (ties: lower validation loss, then stronger decay).

    Takes the training set only. Returns (weight_decay, one record per value tried).
    """
    fit_idx, val_idx = split_train_validation(len(train_labels), val_fraction, seed)
    fit_idx, val_idx = fit_idx.to(train_features.device), val_idx.to(train_features.device)
    tried: Dict[float, Dict[str, float]] = {}

    def evaluate(log10_wd: float) -> None:
        log10_wd = round(log10_wd, 6)
        if log10_wd in tried:
            return
        classifier = fit_logistic_regression(
            train_features[fit_idx], train_labels[fit_idx], num_classes, 10.0**log10_wd, max_iter
        )
        logits = classifier(train_features[val_idx])
        tried[log10_wd] = {
            "weight_decay": 10.0**log10_wd,
            "val_acc1": (logits.argmax(1) == train_labels[val_idx]).float().mean().item(),
            "val_loss": F.cross_entropy(logits, train_labels[val_idx]).item(),
        }

    def best() -> float:
        return max(tried, key=lambda e: (tried[e]["val_acc1"], -tried[e]["val_loss"], e))

    for log10_wd in COARSE_LOG10_WEIGHT_DECAYS:
        evaluate(log10_wd)
    centre = best()
    low, high = COARSE_LOG10_WEIGHT_DECAYS[0], COARSE_LOG10_WEIGHT_DECAYS[-1]
    for step in range(-FINE_STEPS_PER_DECADE, FINE_STEPS_PER_DECADE + 1):
        evaluate(min(high, max(low, centre + step / FINE_STEPS_PER_DECADE)))
    chosen = best()
    return tried[chosen]["weight_decay"], [tried[e] for e in sorted(tried)]


@torch.no_grad()
def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: Optional[int] = None,
    device: str | torch.device | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    topk: Iterable[int] = DEFAULT_TOPK,
) -> Dict[str, float]:
    """`lp_acc{k}` for each k of `topk` (default lp_acc1, lp_acc5), `lp_mean_per_class_recall` on test, plus the
    `lp_weight_decay` chosen on train."""
    device = torch.device(device) if device is not None else train_features.device
    train_features, train_labels = train_features.float().to(device), train_labels.long().to(device)
    num_classes = num_classes or int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if len(train_labels) >= 2:
        weight_decay, _ = select_weight_decay(train_features, train_labels, num_classes, val_fraction, seed)
    else:
        weight_decay = 1e-4  # nothing to validate on; a neutral value
    classifier = fit_logistic_regression(train_features, train_labels, num_classes, weight_decay)
    logits = classifier(test_features.float().to(device))
    metrics = classification_metrics(logits, test_labels.long().to(device), num_classes, prefix="lp_", topk=topk)
    metrics["lp_weight_decay"] = weight_decay
    return metrics
