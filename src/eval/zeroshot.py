"""Zero-shot classification the way CLIP does it.

Class embedding = mean of the L2-normalised embeddings of the class name in every template, renormalised;
logits = 100 · image · W (CLIP's fixed scale, independent of the model's learned temperature).
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch
import torch.nn.functional as F

from eval.features import extract_text_features
from eval.metrics import DEFAULT_TOPK, classification_metrics
from eval.templates import fill_template

LOGIT_SCALE = 100.0


@torch.no_grad()
def zero_shot_classifier(
    encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Weights [D, num_classes] (CPU, float32): one unit-norm column per class."""
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    text_features = extract_text_features(encoder, prompts, batch_size, desc="class prompts")  # normalised
    per_class = text_features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return LOGIT_SCALE * image_features.float() @ classifier.to(image_features.device).float()


def zero_shot_metrics(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                      topk: Iterable[int] = DEFAULT_TOPK) -> Dict[str, float]:
    """`acc{k}` for each k of `topk` (default acc1, acc5) and `mean_per_class_recall` of L2-normalised image
    features against a classifier."""
    logits = zero_shot_logits(image_features, classifier)
    return classification_metrics(logits, labels.to(logits.device), num_classes=classifier.shape[1], topk=topk)
