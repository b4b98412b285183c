"""A per-row function of a whole caption corpus, computed once and kept as a numpy memmap keyed by row.

Two users: ProtoRKD's frozen-teacher embeddings (`kind="teacher"`, float32) and the loader's token ids
(`kind="tokens"`, int32): a frozen function of a caption gives the same answer every epoch, so it is
computed once: batched, the work split across ranks (round r: rank i encodes rows
[r·W·B + i·B, r·W·B + (i+1)·B)), the pieces all-gathered, and written to `<dir>/<kind>_<key>.npy` by one
process per node (so it also works without a shared filesystem). The key hashes the function's identity
and the data file's path, size and mtime, so a new teacher/tokenizer or changed data builds a new cache
and a resume reuses the old one. A `.json` beside the array, written last, marks it complete: an
interrupted build is redone, never half-read.

The array is written with ordinary writes into a file whose whole size is reserved first (posix_fallocate):
a disk too small for it fails at once with one line (UserError, exit 2), and a disk that fills anyway fails
the write with ENOSPC. Writing through a memory map instead turns a full disk into a SIGBUS that kills the
process (exit 135) with no message. A failed build leaves no partial file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from foundation.checkpoint import atomic_write_bytes
from foundation.errors import UserError
from foundation.files import preallocate, write_failure
from foundation.progress import Progress
from training.distributed import is_distributed


def cache_key(function: Dict[str, Any], data_path: str, num_rows: int) -> str:
    """Hash of what determines the rows: the function's identity (teacher spec, tokenizer) and the data's."""
    stat = os.stat(data_path)
    identity = {"teacher": function, "data": os.path.abspath(data_path), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "rows": num_rows}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def round_rows(round_index: int, rank: int, num_rows: int, batch_size: int, world_size: int) -> range:
    """The rows `rank` encodes in round `round_index` of a cache build (possibly none, in the last round)."""
    start = round_index * batch_size * world_size + rank * batch_size
    return range(min(start, num_rows), min(start + batch_size, num_rows))


def num_rounds(num_rows: int, batch_size: int, world_size: int) -> int:
    return (num_rows + batch_size * world_size - 1) // (batch_size * world_size)


def _all_gather(tensor: torch.Tensor) -> List[torch.Tensor]:
    if not is_distributed():
        return [tensor]
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    return pieces


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def load_or_build_row_cache(encode: Callable[[Sequence[str]], torch.Tensor], captions: Sequence[str], dim: int,
                            cache_dir: str | os.PathLike, key: str, batch_size: int = 256,
                            device: torch.device = torch.device("cpu"), show_progress: bool = True,
                            local_rank: int = 0, kind: str = "teacher",
                            dtype: torch.dtype = torch.float32) -> np.memmap:
    """The (len(captions), dim) memmap of `encode`'s rows (read-only), building it if needed.

    Collective when distributed: every rank calls it with the same captions. `encode(list_of_str)` returns
    a (n, dim) tensor; it runs on this rank's share only (`round_rows`, round after round). `captions` may be
    any sliceable sequence of the rows' inputs (an image teacher's cache passes the row numbers)."""
    cache_dir = Path(cache_dir)
    array_path, done_path = cache_dir / f"{kind}_{key}.npy", cache_dir / f"{kind}_{key}.json"
    label = {"teacher": "teacher embeddings", "tokens": "caption tokens"}.get(kind, kind)
    num_rows = len(captions)
    if _all_ranks_agree(done_path.exists(), device):
        logging.info("%s: reusing %s", label, array_path)
        return np.load(array_path, mmap_mode="r")

    rank = dist.get_rank() if is_distributed() else 0
    world_size = dist.get_world_size() if is_distributed() else 1
    writer = local_rank == 0  # one writer per node
    numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    out, partial_path, failure = None, None, ""
    if writer:
        # a name per writer: nodes sharing a filesystem each write their own, then atomically replace
        partial_path = cache_dir / f"{kind}_{key}.{socket.gethostname()}-{os.getpid()}.partial.npy"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            out = _start_array(partial_path, numpy_dtype, (num_rows, dim))
        except OSError as error:
            failure = write_failure(error)
    # every rank stops together when a writer cannot reserve the file: none is left waiting in a collective
    if not _all_ranks_agree(not failure, device):
        _discard(out, partial_path)
        raise UserError(f"cannot write the {label} cache {array_path}: "
                        f"{failure or 'another node could not write its copy'} "
                        f"({num_rows * dim * numpy_dtype.itemsize:,} bytes needed)")
    try:
        _fill(out, encode, captions, dim, batch_size, rank, world_size, device, dtype, label, show_progress)
        if writer:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(partial_path, array_path)
            atomic_write_bytes(done_path, json.dumps({"rows": num_rows, "dim": dim}).encode())
    except OSError as error:
        _discard(out, partial_path)
        raise UserError(f"cannot write the {label} cache {array_path}: {write_failure(error)}") from None
    except BaseException:
        _discard(out, partial_path)
        raise
    if is_distributed():
        dist.barrier()
    logging.info("%s: wrote %s (%d x %d)", label, array_path, num_rows, dim)
    return np.load(array_path, mmap_mode="r")


def _start_array(path: Path, dtype: np.dtype, shape) -> BinaryIO:
    """A new .npy file at `path` holding the header of a `shape` array, its data's space reserved, open for
    the rows to be appended in order."""
    out = open(path, "wb")
    try:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": tuple(shape)})
        preallocate(out, out.tell() + int(np.prod(shape)) * dtype.itemsize)
    except BaseException:
        out.close()
        raise
    return out


def _discard(out: Optional[BinaryIO], path: Optional[Path]) -> None:
    if out is not None:
        out.close()
    if path is not None:
        path.unlink(missing_ok=True)


def _fill(out: Optional[BinaryIO], encode, captions, dim: int, batch_size: int, rank: int, world_size: int,
          device: torch.device, dtype: torch.dtype, label: str, show_progress: bool) -> None:
    """Encode this rank's rows round after round; the writer appends every rank's rows, in row order."""
    num_rows = len(captions)
    rows_per_round = batch_size * world_size
    with Progress(total=num_rows, desc=label, unit="row", enabled=show_progress) as progress:
        for r in range(num_rounds(num_rows, batch_size, world_size)):
            rows = round_rows(r, rank, num_rows, batch_size, world_size)
            mine = list(captions[rows.start:rows.stop])
            embedded = torch.zeros(batch_size, dim, dtype=dtype, device=device)
            if mine:
                embedded[:len(mine)] = encode(mine).to(device, dtype)
            for source_rank, piece in enumerate(_all_gather(embedded)):
                begin = r * rows_per_round + source_rank * batch_size
                end = min(begin + batch_size, num_rows)
                if out is not None and end > begin:
                    out.write(np.ascontiguousarray(piece[:end - begin].cpu().numpy()).tobytes())
            progress.update(min(rows_per_round, num_rows - r * rows_per_round))
