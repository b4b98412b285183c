"""In-loop evaluation: the trainer's bridge to eval/ (which knows nothing of training)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


@torch.no_grad()
def evaluate_model(model: nn.Module, eval_data_dir: str, benchmarks: List[str], device: torch.device,
                   batch_size: int = 64, workers: int = 0) -> Dict[str, float]:
    from eval import load_encoder, run_benchmarks

    model.eval()
    encoder = load_encoder({"model_spec": model.model_spec, "state_dict": model.state_dict()}, device=str(device))
    return run_benchmarks(encoder, eval_data_dir, benchmarks=tuple(benchmarks), batch_size=batch_size,
                          workers=workers, device=str(device))
