"""The loader workers' shared memory: the batches each worker holds ready sit in /dev/shm, and a /dev/shm
too small for them kills a worker mid-epoch with a bus error, so a run checks at start and refuses with
one clear line instead. It depends on the machine and the flags, not on the data source."""
from __future__ import annotations

import os
import random
import shutil
from typing import Callable

import torch
from PIL import Image

from foundation.errors import DataError

# batches each loader worker holds ready (--prefetch-factor); the tensors sit in /dev/shm until collected
DEFAULT_PREFETCH_FACTOR = 2
SHARED_MEMORY = "/dev/shm"


def loader_prefetch_factor(args) -> int:
    """--prefetch-factor (the default when a caller's own namespace leaves the flag out)."""
    return getattr(args, "prefetch_factor", DEFAULT_PREFETCH_FACTOR)


def shared_memory_needed(sample_bytes: int, batch_size: int, workers: int, prefetch_factor: int,
                         local_processes: int = 1) -> int:
    """Bytes of /dev/shm the loaders of one machine hold at once: each worker of each local process keeps
    `prefetch_factor` batches (its image tensors) in shared memory until the trainer collects them."""
    return sample_bytes * batch_size * workers * prefetch_factor * local_processes


def check_shared_memory(needed: int, free: int) -> None:
    """Refuse at start what would otherwise kill a worker mid-epoch with a bus error."""
    if needed > free:
        raise DataError(
            f"the loader workers need about {needed / 2**30:.2f} GiB of {SHARED_MEMORY} (batch x workers x "
            f"--prefetch-factor x processes on this machine, images as float32) but {free / 2**30:.2f} GiB is "
            f"free: lower --prefetch-factor or --workers, or give the container more (docker --shm-size)")


def check_loader_shared_memory(args, transform: Callable) -> None:
    """`check_shared_memory` for this run's loader, when it has workers and the machine a /dev/shm."""
    if args.workers <= 0 or not os.path.isdir(SHARED_MEMORY):
        return
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):  # a random crop here must not move the run's streams
        probe = transform(Image.new("RGB", (256, 256)))  # the real transform: its output size and dtype
    random.setstate(python_state)
    sample_bytes = probe.numel() * probe.element_size() if isinstance(probe, torch.Tensor) else 0
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = shared_memory_needed(sample_bytes, args.batch_size, args.workers, loader_prefetch_factor(args),
                                  local_processes)
    check_shared_memory(needed, shutil.disk_usage(SHARED_MEMORY).free)
