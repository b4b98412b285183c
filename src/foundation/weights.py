"""Weights files from elsewhere (a Hugging Face folder), read without trusting them: safetensors only.

A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte range) and
the raw bytes; reading one runs no code. Its header is still untrusted: `safetensors_header` reads it within
`MAX_HEADER_BYTES`, from a regular file only (foundation.files.open_regular), and checks every entry (a known
dtype, a shape of non-negative integers, a byte range inside the file that is exactly the shape's size) before
any tensor is read, so the shapes can be checked against a model before anything is allocated, and a file
can make `load_safetensors` allocate no more than the bytes it really holds. Every refusal is a
`WeightsFileError`, one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import TYPE_CHECKING, Dict, Tuple, Union

from foundation.errors import UserError
from foundation.files import open_regular

if TYPE_CHECKING:
    import torch

PathLike = Union[str, "os.PathLike[str]"]

# A header's JSON: ~100 bytes a tensor, so 16 MiB describes 150,000 tensors, far more than any CLIP holds
# (safetensors' own limit is 100 MB, which its parser would hold many times over in memory).
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
MAX_DIMS = 8

# safetensors dtype names and their sizes in bytes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsFileError(UserError, ValueError):
    """A weights file that is refused; the message names the file and what is wrong."""


def safetensors_header(path: PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of the file at `path`, checked as the module says."""
    where = os.fspath(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise WeightsFileError(f"{where}: {size} bytes, too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise WeightsFileError(f"{where}: a safetensors header of {length:,} bytes (the file has {size:,}; "
                                       f"at most {MAX_HEADER_BYTES:,} are read)")
            text = f.read(length)
    except WeightsFileError:
        raise
    except (OSError, ValueError) as e:
        raise WeightsFileError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise WeightsFileError(f"{where}: the safetensors header is not JSON ({detail})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{where}: the safetensors header is a {type(header).__name__}, not a mapping")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise WeightsFileError(f"{where}: {len(header):,} tensors, over the limit of {MAX_TENSORS:,}")
    data_bytes = size - 8 - length
    tensors: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    for name, entry in header.items():
        tensors[name] = _entry(where, name, entry, data_bytes)
    return tensors


def _entry(where: str, name: str, entry, data_bytes: int) -> Tuple[str, Tuple[int, ...]]:
    what = f"{where}: tensor {name[:200]!r}"
    if not isinstance(entry, dict):
        raise WeightsFileError(f"{what}: its header entry is a {type(entry).__name__}, not a mapping")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise WeightsFileError(f"{what}: dtype {str(dtype)[:40]!r} is none of {', '.join(DTYPE_BYTES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_count(d) for d in shape)):
        raise WeightsFileError(f"{what}: shape {str(shape)[:80]} is no list of at most {MAX_DIMS} sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_bytes):
        raise WeightsFileError(f"{what}: byte range {str(offsets)[:80]} is not inside the file's "
                               f"{data_bytes:,} bytes of data")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise WeightsFileError(f"{what}: {offsets[1] - offsets[0]:,} bytes for a {dtype} tensor of shape {shape} "
                               f"({expected:,} bytes)")
    return dtype, tuple(shape)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_safetensors(path: PathLike) -> Dict[str, "torch.Tensor"]:
    """The tensors of a safetensors file whose header `safetensors_header` accepts."""
    import safetensors.torch

    safetensors_header(path)
    try:
        return safetensors.torch.load_file(os.fspath(path))
    except Exception as e:  # noqa: BLE001 (safetensors' own checks: overlapping ranges, a file changed meanwhile)
        raise WeightsFileError(f"{os.fspath(path)} cannot be read as safetensors ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

