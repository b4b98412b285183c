"""A model as a folder of standard files: `model.safetensors` (the weights) and `model_spec.json` (its spec).

    compress.save(model, "deploy/pruned")       # any kind: pruned, low-rank, students, int8 quantized, ...
    model = compress.load("deploy/pruned")      # the same call that loads a .pt checkpoint

Neither file can run code when read: safetensors holds raw tensor bytes behind a JSON header, and the spec is
JSON. `read(folder)` reads these two files of the folder and nothing else, into what a checkpoint holds
(`model_spec`, `state_dict`); `compress.load` then treats it exactly as a checkpoint's: the spec validated by its
kind's schema (`compress.models.spec`: nothing in it may name a file, a URL or a hub model), and every tensor
checked against the model the spec builds (its name, shape and dtype; none missing) before any weight is
copied, each refusal one line naming the key.

safetensors refuses two names for one storage, so tied weights (one tensor under several state-dict names)
are written once, under the first of their names in sorted order, with the file's metadata naming each other
name and the one it is stored under (what safetensors' own `save_model` records). Reading puts the tensor back
under every name; the check against the model then refuses a name that is no tie of the model's (its bytes
would be missing).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import nn

from compress.models.spec import validate_spec
from foundation.checkpoint import atomic_write, atomic_write_bytes
from foundation.errors import UserError

WEIGHTS = "model.safetensors"
SPEC = "model_spec.json"
FORMAT_KEY = "format"  # safetensors metadata: which framework wrote the file


class ModelFolderError(UserError, ValueError):
    """A model folder that cannot be read: a file missing, not JSON or not safetensors, or metadata tying a
    name to a tensor the file does not hold. (A ValueError too, as a bad spec's SpecError is.)"""


def is_model_folder(path: Any) -> bool:
    """Whether `path` names a folder (a model folder, or one that should be: `read` says what is wrong)."""
    return (isinstance(path, str) or hasattr(path, "__fspath__")) and Path(path).is_dir()


def tied_names(state_dict: Dict[str, torch.Tensor]) -> List[List[str]]:
    """Groups (sorted, 2 names or more) of state-dict entries that are one tensor: the same storage, offset,
    shape and strides. Empty tensors share no bytes, whatever their storage pointer says."""
    groups: Dict[Tuple, List[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        groups.setdefault(key, []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def save(model: nn.Module, folder: str | Path, allowed_text_encoders: Iterable[str] = ()) -> Path:
    """Write `model` (any kind this project builds; it carries `model_spec`) as `folder`/model.safetensors and
    `folder`/model_spec.json, each file written whole or not at all. Returns the folder.

    Floating-point weights are written in float32, what every builder makes (half precision widens exactly);
    integer tensors (int8 weights) keep their dtype."""
    import safetensors.torch

    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise ModelFolderError("this model has no model_spec: only models built by compress (build_model, load, "
                               "or a tool of this project) can be saved as a model folder")
    spec = validate_spec(spec, allowed_text_encoders)
    state_dict = model.state_dict()
    metadata = {FORMAT_KEY: "pt"}
    for names in tied_names(state_dict):
        for alias in names[1:]:
            del state_dict[alias]
            metadata[alias] = names[0]
    tensors = {name: (t.detach().float() if t.is_floating_point() else t.detach()).contiguous().cpu()
               for name, t in state_dict.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))
    atomic_write_bytes(folder / SPEC, (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return folder


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read(folder: str | Path) -> Dict[str, Any]:
    """What a checkpoint holds, from a model folder: {"model_spec": the parsed JSON, "state_dict": the tensors,
    each tied name included}. Neither is checked here beyond its file's format: `compress.load` checks them as
    it checks a checkpoint's."""
    path = Path(folder) / SPEC
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a model folder: it has no {SPEC} (write one with compress.save or "
                               "python -m utils.export CKPT --format safetensors)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({str(e).splitlines()[0][:200]})")
    if not isinstance(spec, dict):
        raise ModelFolderError(f"{path}: expected a JSON object (the model_spec), got {type(spec).__name__}")
    return {"model_spec": spec, "state_dict": _read_weights(Path(folder) / WEIGHTS)}


def _read_weights(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelFolderError(f"{path.parent} has no {WEIGHTS}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # a truncated file, a bad header, offsets outside the file: safetensors' own checks
        raise ModelFolderError(f"{path} cannot be read as safetensors ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})")
    for alias, stored in metadata.items():
        if alias == FORMAT_KEY:
            continue
        if alias in tensors or stored not in tensors:
            raise ModelFolderError(f"{path}: its metadata ties {alias[:200]!r} to {stored[:200]!r}, which "
                                   + ("it also stores" if alias in tensors else "it does not hold"))
        tensors[alias] = tensors[stored]
    return tensors
