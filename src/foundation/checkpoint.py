"""Crash-safe checkpoints: written to a temp file, fsync'd, then renamed over the target.

A reader (the monitor, a resume) never sees half a file: `os.replace` is atomic on POSIX, and the
fsync before it makes sure the bytes are on disk before the name points at them. Contents are plain
tensors and containers, so every load uses `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from foundation.errors import UserError

LATEST = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# atomic_write's temp files: `.NAME.tmp.PID`
_TEMP_FILE = re.compile(r"^\..+\.tmp\.\d+$")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(binary_file)` into a temp file beside `path`, fsync it, rename it over `path`, fsync the folder:
    readers see the old file or the whole new one. The temp name (`.NAME.tmp.PID`) never looks like a
    checkpoint or a result file to a directory scan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError("unexpected pos …")
        raise UserError(f"cannot write {path}: {_write_failure(e)}; the previous {path.name}, if any, is untouched")
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _write_failure(error: BaseException) -> str:
    """The OS's reason for a failed write (e.g. "No space left on device"), found anywhere in the chain."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` as the whole new content of `path`, written crash-safe (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> None:
    # streamed into the temp file rather than serialised to bytes first: a checkpoint can be large
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist")
    except Exception as e:  # corrupt, truncated, or not ours
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})")


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (io.BytesIO copies anything but bytes)."""

    def __init__(self, buffer):
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        count = max(0, min(len(target), len(self._view) - self._pos))
        target[:count] = self._view[self._pos:self._pos + count]
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def load_checkpoint_buffer(buffer, what: str) -> Dict[str, Any]:
    """`load_checkpoint` of a checkpoint file's bytes held in memory (a bytes-like buffer), `what` naming it."""
    try:
        return torch.load(_BufferReader(buffer), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not ours
        raise UserError(f"checkpoint {what} cannot be read ({type(e).__name__}: {e})")


def epoch_checkpoints(checkpoint_dir: str | Path) -> Dict[int, Path]:
    """`epoch_N.pt` files of a run, by N."""
    found = {}
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            m = _EPOCH_FILE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def checkpoint_progress(path: str | Path) -> Optional[Tuple[int, int]]:
    """(epoch, step) stored in a checkpoint, reading only its small pickle record, or None if unreadable.

    `torch.load(mmap=True)` maps the file and builds every tensor as a view of the mapping without touching
    its bytes, so this reads the zip directory and `data.pkl` (kilobytes), not the weights and optimizer state
    (gigabytes for a ViT-B/16 with AdamW)."""
    try:
        if zipfile.is_zipfile(path):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # torch's legacy format cannot be mapped: read it all
            state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state.get("epoch", 0)), int(state.get("step", 0))
    except Exception:  # truncated, corrupt, not ours: not a candidate
        return None


def resume_candidates(checkpoint_dir: str | Path) -> Iterator[Tuple[Path, Tuple[int, int]]]:
    """(path, (epoch, step)) of the run's readable checkpoints, most advanced first (a generator).

    Ordered by (epoch, step) as stored inside: the epoch says how much of the run is done, and the global
    step orders checkpoints within an epoch (a mid-epoch epoch_latest.pt after epoch_N.pt). So a stale
    epoch_latest.pt from before the last epoch checkpoint does not win, even when its step is higher: one
    left by a run that had more steps per epoch (another batch size or data), from which the run was
    restarted at an earlier epoch_N.pt.

    Only small records are read (`checkpoint_progress`), and only where the order needs them: epoch_N.pt
    holds N completed epochs, so a file named below epoch_latest.pt's epoch ranks below it by its name, and
    its record is read only when the caller asks for the next candidate (the first ones did not load)."""
    checkpoint_dir = Path(checkpoint_dir)
    ranked: List[Tuple[Path, Tuple[int, int]]] = []
    latest = checkpoint_dir / LATEST
    latest_progress = checkpoint_progress(latest) if latest.exists() else None
    if latest_progress is not None:
        ranked.append((latest, latest_progress))
    below: List[Tuple[int, Path]] = []
    for epoch, path in epoch_checkpoints(checkpoint_dir).items():
        if latest_progress is not None and epoch < latest_progress[0]:
            below.append((epoch, path))
            continue
        progress = checkpoint_progress(path)
        if progress is not None:
            ranked.append((path, progress))
    yield from sorted(ranked, key=lambda item: item[1], reverse=True)
    for _, path in sorted(below, key=lambda item: item[0], reverse=True):
        progress = checkpoint_progress(path)
        if progress is not None:
            yield path, progress


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    """The most advanced readable checkpoint of a run (`resume_candidates`' first), or None."""
    return next((path for path, _ in resume_candidates(checkpoint_dir)), None)


def checkpoint_fingerprint(path: str | Path) -> str:
    """A hash of a checkpoint's contents from its zip directory alone: every record's name (without the
    archive's folder, which follows the file name it was saved under), size and CRC-32, which torch.save
    computes as it writes. Two files with the same fingerprint hold the same bytes in every record; reading
    it costs the zip's central directory, not the file."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            record = info.filename.split("/", 1)[-1]
            digest.update(f"{record}\0{info.file_size}\0{info.CRC}\n".encode("utf-8"))
    return digest.hexdigest()


def remove_stale_temp_files(folder: str | Path) -> List[Tuple[Path, int]]:
    """Delete `atomic_write`'s temp files (`.NAME.tmp.PID`) in `folder`: what a process killed mid-write left
    (each up to a whole checkpoint). Only for a folder no other process writes to at the same time (the
    trainer holds its run's lock). Returns (path, size) of each file removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _TEMP_FILE.match(path.name) and path.is_file():
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append((path, size))
    return removed


# --- random number generator state -----------------------------------------------------------------
# numpy's state holds an ndarray and python's a tuple of ints: both are turned into tensors/lists so
# the checkpoint stays loadable under weights_only=True.


def capture_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
