"""Process-group setup from torchrun's or SLURM's environment, and small collective helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT). Under `srun` without torchrun,
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give the same; MASTER_ADDR/MASTER_PORT must then be
exported by the batch script (see scripts/slurm_example.sh). gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from foundation.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def _elastic_round_store(rank: int, world_size: int, timeout: timedelta):
    """A store private to this restart round of a torchrun job, or None outside torchelastic.

    torchrun's c10d rendezvous hands its workers one TCPStore server (TORCHELASTIC_USE_AGENT_STORE)
    and keeps that same server across `--max-restarts` rounds, without a per-round key prefix
    (pytorch/pytorch#135712). A restarted round then reads the dead round's gloo/nccl addresses
    ("Gloo connectFullMesh failed ... Connection refused") or hangs. Every rank number joins exactly
    once per round, so a per-rank join counter in that store gives all ranks the same round number
    without any agreement step; the process group lives under that round's prefix.
    (TORCHELASTIC_RESTART_COUNT is not usable: each node's agent counts its own restarts.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=timeout)
    generation = shared.add(f"clipcompress/joins/rank{rank}", 1)
    return dist.PrefixStore(f"clipcompress/round{generation}", shared)


def init_distributed(device_flag: str = "auto", backend: str | None = None, timeout_minutes: float = 30) -> DistInfo:
    """Join the process group the launcher describes (a no-op for a single process)."""
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)

    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        timeout = timedelta(minutes=timeout_minutes)
        backend = backend or ("nccl" if use_cuda else "gloo")
        round_store = _elastic_round_store(rank, world_size, timeout)
        if round_store is not None:
            dist.init_process_group(backend=backend, store=round_store, rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """More than one process in an initialised group: when a collective has anyone to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
    return value


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_MASTER_RESULTS = 0  # how many compute_on_master calls this process made: every rank makes the same ones


def compute_on_master(compute: Callable[[], Any], what: str, report_every_s: float = 600.0,
                      poll_s: float = 1.0) -> Any:
    """`compute()` on rank 0, its picklable result handed to every rank (plain `compute()` in one process).

    The other ranks wait by polling the process group's store, not inside a collective: rank 0's job (e.g.
    k-means of millions of rows) may take longer than --dist-timeout-minutes, past which a collective fails
    the job. A waiting rank logs a warning every `report_every_s` seconds naming `what`; if rank 0 fails,
    every rank stops with one line."""
    global _MASTER_RESULTS
    if not is_distributed():
        return compute()
    _MASTER_RESULTS += 1
    key = f"clipcompress/compute_on_master/{_MASTER_RESULTS}"
    store = dist.distributed_c10d._get_default_store()
    result = None
    if dist.get_rank() == 0:
        try:
            result = compute()
        except BaseException:
            store.set(key, "failed")
            raise
        store.set(key, "done")
    else:
        started = reported = time.monotonic()
        while not store.check([key]):  # non-blocking: no store timeout, no collective in flight
            time.sleep(poll_s)
            if time.monotonic() - reported >= report_every_s:
                reported = time.monotonic()
                logging.warning("rank %d: still waiting for rank 0 (%s), %.0f min so far; no collective is "
                                "pending, so --dist-timeout-minutes does not apply", dist.get_rank(), what,
                                (reported - started) / 60)
        if store.get(key) == b"failed":
            raise UserError(f"rank 0 failed while {what}; its log says why")
    return broadcast_object(result)
