"""Model → model operations (pruning, low-rank, students, cascades) and the model registry.

`compress.load(path)` rebuilds any checkpoint this project writes, pruned shapes included.
"""
from compress.registry import build_model, get_preprocess, get_tokenizer, load, register_model_kind

__all__ = ["build_model", "get_preprocess", "get_tokenizer", "load", "register_model_kind"]
