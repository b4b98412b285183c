"""Process-group setup from torchrun's or SLURM's environment, and small collective helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT). A task that `srun` started (one per
GPU, no torchrun) has SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID instead, and MASTER_ADDR /
MASTER_PORT exported by the batch script (see scripts/slurm_example.sh). gloo on CPU, nccl on GPU.
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
    launcher: str = "one process"  # or "torchrun", "srun": who described the process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def launch_environment(environ=os.environ) -> tuple:
    """(launcher, rank, world_size, local_rank) from the launcher's variables.

    torchrun's RANK / WORLD_SIZE / LOCAL_RANK win, also under srun (one torchrun per node). Otherwise a task
    that srun started carries SLURM_PROCID / SLURM_LOCALID and its step's task count SLURM_STEP_NUM_TASKS.
    SLURM_NTASKS alone does not make a world: a batch script's own shell has it (the allocation's task count)
    and SLURM_PROCID=0, so a plain `python -m training.main` there would wait for ranks that never come."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return ("torchrun", int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                int(environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return ("srun", int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"]),
                int(environ.get("SLURM_LOCALID", 0)))
    return "one process", 0, 1, 0


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


def init_distributed(device_flag: str = "auto", backend: str | None = None, timeout_minutes: float = 30,
                     set_device_rank: bool = True) -> DistInfo:
    """Join the process group the launcher describes (a no-op for a single process).

    `set_device_rank=False` (--no-set-device-rank) takes cuda:0 whatever the local rank: a launcher that binds
    one GPU to each process (SLURM's --gpus-per-task=1) leaves each process seeing its own GPU as device 0."""
    launcher, rank, world_size, local_rank = launch_environment()

    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank if set_device_rank else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:  # torchrun always sets them; an srun task gets them from its batch script
            raise UserError(f"{launcher} started rank {rank} of {world_size}, but {' and '.join(missing)} "
                            f"is not set: export the first node's address and a free port before srun "
                            f"(scripts/slurm_example.sh)")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        timeout = timedelta(minutes=timeout_minutes)
        backend = backend or ("nccl" if use_cuda else "gloo")
        round_store = _elastic_round_store(rank, world_size, timeout)
        if round_store is not None:
            dist.init_process_group(backend=backend, store=round_store, rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, launcher=launcher)


def is_distributed() -> bool:
    """More than one process in an initialised group: when a collective has anyone to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def in_turns(work: Callable[[], Any], local_rank: int) -> Any:
    """`work()` on every rank, in three turns with a barrier after each: rank 0; then the first process of
    each other node (`local_rank` 0); then all the others. For work that fills a download cache (open_clip
    and Hugging Face weights): rank 0 fills a cache the nodes share, each node's first process its own,
    and the rest find the files there instead of every process downloading them at once. A rank whose work
    fails (an Exception) still joins the later turns, then raises; a stop signal or Ctrl-C (BaseException)
    ends it at once. Plain `work()` in one process."""
    if not is_distributed():
        return work()
    turn = 0 if dist.get_rank() == 0 else 1 if local_rank == 0 else 2
    result, failure = None, None
    for current in range(3):
        if current == turn:
            try:
                result = work()
            except Exception as error:  # the other turns must still meet this rank at their barriers
                failure = error
        dist.barrier()
    if failure is not None:
        raise failure
    return result


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


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


FILE_CHUNK_BYTES = 64 << 20


def broadcast_file(path, nbytes: int, receivers: list, chunk_bytes: int = FILE_CHUNK_BYTES):
    """The `nbytes` bytes of rank 0's file `path`, sent to each rank in `receivers` (a collective of every rank).

    Returns the bytes as a uint8 tensor on a receiver, None elsewhere. Sent in chunks over a group of rank 0 and
    the receivers, so rank 0 holds one chunk beyond what it already has, and a receiver the file's size (once:
    chunks land in place). Over nccl each chunk passes through the GPU, which nccl needs."""
    rank = dist.get_rank()
    members = sorted({0, *receivers})
    group = dist.new_group(members)  # every rank takes part in making a group, member or not
    if rank not in members:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    received = torch.empty(nbytes, dtype=torch.uint8) if rank != 0 else None
    source = open(path, "rb") if rank == 0 else None
    try:
        staging = torch.empty(min(chunk_bytes, max(nbytes, 1)), dtype=torch.uint8)
        for start in range(0, nbytes, chunk_bytes):
            size = min(chunk_bytes, nbytes - start)
            chunk = staging[:size] if rank == 0 else received[start:start + size]
            if rank == 0 and source.readinto(memoryview(chunk.numpy())) != size:
                raise UserError(f"{path} changed size while it was being sent to the other ranks")
            if device is None:
                dist.broadcast(chunk, src=0, group=group)
            else:
                on_device = chunk.to(device)
                dist.broadcast(on_device, src=0, group=group)
                if rank != 0:
                    chunk.copy_(on_device)
    finally:
        if source is not None:
            source.close()
        dist.destroy_process_group(group)
    return received


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
