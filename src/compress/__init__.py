"""Models and model → model operations (pruning, low-rank, students, cascades, profiling).

    compress.models   model kinds and the registry that rebuilds any checkpoint we write (`compress.load`)
    compress.ops      operations on models: UPop pruning, low-rank, head/Fisher pruning, token masking,
                      text-layer dropping, calibration gradients, distillation losses, profiling, cascade search
    compress.<tool>   command lines (`python -m utils.lowrank`, ...); the library never imports them

`compress.load(path)` rebuilds any checkpoint this project writes, pruned shapes included.
"""
from compress.models.registry import build_model, get_preprocess, get_tokenizer, load, register_model_kind

__all__ = ["build_model", "get_preprocess", "get_tokenizer", "load", "register_model_kind"]
