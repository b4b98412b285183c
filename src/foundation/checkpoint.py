"""Crash-safe checkpoints: written to a temp file, fsync'd, then renamed over the target.

A reader (the monitor, a resume) never sees half a file: `os.replace` is atomic on POSIX, and the
fsync before it makes sure the bytes are on disk before the name points at them. Contents are plain
tensors and containers, so every load uses `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional

import numpy as np
import torch

from foundation.errors import UserError

LATEST = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


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


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    """The most advanced readable checkpoint: `epoch_latest.pt`, else the highest `epoch_N.pt`.

    Candidates are ordered by (epoch, step) as stored inside them: the epoch says how much of the
    run is done, and the global step orders checkpoints within an epoch (a mid-epoch epoch_latest.pt
    after epoch_N.pt). So a stale epoch_latest.pt from before the last epoch checkpoint does not win,
    even when its step is higher: one left by a run that had more steps per epoch (another batch size
    or data), from which the run was restarted at an earlier epoch_N.pt.
    """
    checkpoint_dir = Path(checkpoint_dir)
    candidates = list(epoch_checkpoints(checkpoint_dir).values())
    if (checkpoint_dir / LATEST).exists():
        candidates.append(checkpoint_dir / LATEST)
    best, best_key = None, None
    for path in candidates:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            continue
        key = (int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0)))
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


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
