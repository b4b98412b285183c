"""In-loop evaluation: the trainer's bridge to eval/ (which knows nothing of training)."""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn

from eval.metrics import DEFAULT_TOPK


@torch.no_grad()
def evaluate_model(model: nn.Module, eval_data_dir: str, benchmarks: List[str], device: torch.device,
                   batch_size: int = 64, workers: int = 0, topk: Iterable[int] = DEFAULT_TOPK,
                   precision: str = "fp32") -> Dict[str, float]:
    """Score the live (unwrapped) model on the eval root; the caller puts it back in train mode. `topk`: the k
    of the zero-shot / linear-probe accuracies (acc{k}), as the monitor's --topk. `precision`: the run's
    --precision; the towers run under its autocast, as in training."""
    from eval import encoder_from_model, run_benchmarks
    from training.accel import autocast_dtype

    model.eval()
    encoder = encoder_from_model(model, device=device)
    encoder.autocast_dtype = autocast_dtype(precision, torch.device(device))
    return run_benchmarks(encoder, eval_data_dir, benchmarks=tuple(benchmarks),
                          batch_size=batch_size, workers=workers, device=device, topk=topk)
