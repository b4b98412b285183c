"""Which checkpoint a run resumes from: chosen once, by rank 0, and held by every rank, whatever its disk has.

Only global rank 0 writes checkpoints (training.main), into its own run folder. On a cluster with node-local
disks the other nodes' run folders hold none, so no rank may decide on its own: a node that found nothing would
start at step 0 while node 0 resumed, and their collectives would no longer match (a hang until
--dist-timeout-minutes, or a silent divergence). So:

1. rank 0 picks the checkpoint (`--resume latest`: the most advanced readable one, ordered from small records,
   falling back to the next with a log line when one does not load) and loads it;
2. it broadcasts the choice: path, (epoch, step), size and a fingerprint of the contents;
3. a rank whose own disk has the same file (same fingerprint; a shared filesystem) loads its copy, and every
   other rank receives the file's bytes from rank 0 over torch.distributed;
4. every rank checks the state it holds is at the chosen (epoch, step).

Memory: a receiving rank holds the file's bytes and the state loaded from them at once (twice the checkpoint)
until the bytes are dropped, right after loading; training.main drops the state once it is restored.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from foundation import checkpoint as ckpt_io
from foundation.errors import UserError
from training.distributed import DistInfo, all_gather_object, broadcast_file, broadcast_object


@dataclass(frozen=True)
class ResumeChoice:
    path: str  # as rank 0 sees it
    in_run_folder: Optional[str]  # the path relative to the run folder, so each node looks in its own
    epoch: int
    step: int
    nbytes: int
    fingerprint: Optional[str]  # None for a file that is no zip archive: then every other rank receives it


def load_resume_state(args, log_dir: Path, dist_info: DistInfo) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path as rank 0 names it, the checkpoint's state) on every rank, or None for a fresh start. Collective."""
    problem, choice, state = None, None, None
    if dist_info.is_master and args.resume is not None:
        try:
            choice, state = _choose(args, log_dir)
        except UserError as error:
            problem = str(error)
    problem, choice = broadcast_object((problem, choice))
    if problem:
        raise UserError(problem)
    if choice is None:
        return None
    if not dist_info.is_master:
        state = _local_copy(choice, log_dir)
    needs = all_gather_object(state is None)
    receivers = [rank for rank, need in enumerate(needs) if need]
    if receivers:
        if dist_info.is_master:
            logging.info("sending %s (%.1f MB) to rank(s) %s, whose disks do not hold it", choice.path,
                         choice.nbytes / 2**20, ",".join(map(str, receivers)))
        received = broadcast_file(choice.path if dist_info.is_master else None, choice.nbytes, receivers)
        if received is not None:
            state = ckpt_io.load_checkpoint_buffer(received.numpy(), f"{choice.path} (received from rank 0)")
            del received
    if (int(state.get("epoch", 0)), int(state.get("step", 0))) != (choice.epoch, choice.step):
        raise UserError(f"rank {dist_info.rank}: the checkpoint it loaded for {choice.path} is at epoch "
                        f"{state.get('epoch')} step {state.get('step')}, rank 0's at epoch {choice.epoch} step "
                        f"{choice.step}")
    return choice.path, state


def _choose(args, log_dir: Path) -> Tuple[Optional[ResumeChoice], Optional[Dict[str, Any]]]:
    """Rank 0: the checkpoint to resume from, loaded, or (None, None) for a fresh start."""
    if args.resume == "latest":
        checkpoints = log_dir / "checkpoints"
        for path, (epoch, step) in ckpt_io.resume_candidates(checkpoints):
            try:
                state = ckpt_io.load_checkpoint(path)
            except UserError as error:
                logging.warning("--resume latest: %s; trying the next checkpoint", error)
                continue
            return _describe(path, state, log_dir), state
        logging.info("--resume latest: no checkpoint yet in %s, starting fresh", checkpoints)
        return None, None
    path = Path(args.resume)
    if not path.exists():
        raise UserError(f"--resume {args.resume}: no such file")
    state = ckpt_io.load_checkpoint(path)
    return _describe(path, state, log_dir), state


def _describe(path: Path, state: Dict[str, Any], log_dir: Path) -> ResumeChoice:
    try:
        in_run_folder = str(path.resolve().relative_to(log_dir.resolve()))
    except ValueError:
        in_run_folder = None
    return ResumeChoice(path=str(path), in_run_folder=in_run_folder, epoch=int(state.get("epoch", 0)),
                        step=int(state.get("step", 0)), nbytes=path.stat().st_size, fingerprint=_fingerprint(path))


def _fingerprint(path: Path) -> Optional[str]:
    try:
        return ckpt_io.checkpoint_fingerprint(path)
    except (OSError, zipfile.BadZipFile):  # torch's legacy format is no zip archive: no cheap fingerprint
        return None


def _local_copy(choice: ResumeChoice, log_dir: Path) -> Optional[Dict[str, Any]]:
    """This rank's own copy of the chosen checkpoint, loaded, if its disk holds the same file; else None."""
    if choice.fingerprint is None:
        return None
    path = log_dir / choice.in_run_folder if choice.in_run_folder else Path(choice.path)
    if not path.is_file() or path.stat().st_size != choice.nbytes or _fingerprint(path) != choice.fingerprint:
        return None
    try:
        return ckpt_io.load_checkpoint(path)
    except UserError:  # unreadable here: take rank 0's bytes instead
        return None


def check_same_position(ctx) -> None:
    """Collective: every rank is about to train from the same (epoch, step, batch of the epoch)."""
    here = (ctx.epoch, ctx.step, ctx.step_in_epoch)
    positions = all_gather_object(here)
    if len(set(positions)) > 1:
        listed = "; ".join(f"rank {rank}: epoch {e} step {s} batch {b}" for rank, (e, s, b) in enumerate(positions))
        raise UserError(f"the ranks would start from different positions ({listed}); refusing to train")
