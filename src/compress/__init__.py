"""Models and model → model operations (pruning, low-rank, students, cascades, profiling): a library with no
command line (those are in `utils`, the layer above every other).

    compress.models   model kinds and the registry that rebuilds any checkpoint we write (`compress.load`)
    compress.ops      operations on models: low-rank, head/Fisher pruning, token masking, text-layer dropping,
                      int8 quantisation, ONNX export, calibration gradients, distillation losses, profiling,
                      cascade search; it imports compress.models, never the other way round

`compress.load(path)` rebuilds any checkpoint this project writes, pruned shapes included; `compress.save(model,
folder)` writes any of them as standard files (model.safetensors + model_spec.json), which `compress.load(folder)`
reads back.
"""
from compress.models.folder import save
from compress.models.registry import build_model, get_preprocess, get_tokenizer, load, register_model_kind

__all__ = ["build_model", "get_preprocess", "get_tokenizer", "load", "register_model_kind", "save"]
