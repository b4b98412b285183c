"""In-loop evaluation: the trainer's bridge to eval/ (which knows nothing of training)."""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn

from eval.metrics import DEFAULT_TOPK


@torch.no_grad()
def evaluate_model(model: nn.Module, eval_data_dir: str, benchmarks: List[str], device: torch.device,
                   batch_size: int = 64, workers: int = 0, topk: Iterable[int] = DEFAULT_TOPK) -> Dict[str, float]:
    """Score the live (unwrapped) model on the eval root; the caller puts it back in train mode. `topk`: the k
    of the zero-shot / linear-probe accuracies (acc{k}), as the monitor's --topk."""
    from eval import encoder_from_model, run_benchmarks

    model.eval()
    return run_benchmarks(encoder_from_model(model, device=device), eval_data_dir, benchmarks=tuple(benchmarks),
                          batch_size=batch_size, workers=workers, device=device, topk=topk)
