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

Every field a resume uses is checked before torch or numpy sees it, and a mismatch is one line naming the key
(a CheckpointRefused: exit 2). The file itself is checked as it is read (foundation.checkpoint.load_checkpoint:
a regular file, stored records, tensors their storage holds); then `validate_resume_state` checks the fields'
types and the RNG states (every rank, whatever file it read); `check_resume_weights` sizes the model from its
spec on the meta device against the weights the file holds, before the job builds anything;
`load_resumed_weights` checks the state dict against the model the job built; `check_optimizer_state` and
`check_scaler_state` check the optimizer's and the AMP scaler's state against the live ones (torch's fused and
foreach AdamW kernels index the moment estimates by the parameter's size unchecked: a one-element `exp_avg`
is a segmentation fault, not an error).
"""
from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from foundation import checkpoint as ckpt_io
from foundation.errors import CheckpointRefused, UserError
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
            what = f"{choice.path} (received from rank 0)"
            state = ckpt_io.load_checkpoint_buffer(received.numpy(), what)
            del received
            validate_resume_state(state, f"checkpoint {what}")
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
                state = _load(path)
            except UserError as error:
                logging.warning("--resume latest: %s; trying the next checkpoint", error)
                continue
            return _describe(path, state, log_dir), state
        logging.info("--resume latest: no checkpoint yet in %s, starting fresh", checkpoints)
        return None, None
    path = Path(args.resume)
    if not path.exists():
        raise UserError(f"--resume {args.resume}: no such file")
    state = _load(path)
    return _describe(path, state, log_dir), state


def _load(path: Path) -> Dict[str, Any]:
    state = ckpt_io.load_checkpoint(path)
    validate_resume_state(state, f"checkpoint {path}")
    return state


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
        return _load(path)
    except UserError:  # unreadable here: take rank 0's bytes instead
        return None


def check_same_position(ctx) -> None:
    """Collective: every rank is about to train from the same (epoch, step, batch of the epoch)."""
    here = (ctx.epoch, ctx.step, ctx.step_in_epoch)
    positions = all_gather_object(here)
    if len(set(positions)) > 1:
        listed = "; ".join(f"rank {rank}: epoch {e} step {s} batch {b}" for rank, (e, s, b) in enumerate(positions))
        raise UserError(f"the ranks would start from different positions ({listed}); refusing to train")


# --- what a resume uses, checked before it is used ---------------------------------------------------------

# fields of a training checkpoint (training.main.write_run_checkpoint) a resume reads: (required, check). A count
# is below 2**53: exact as a float, as the logs and results.jsonl carry it.
MAX_COUNT = 1 << 53
_COUNT = (f"an integer in [0, {MAX_COUNT})", lambda value: type(value) is int and 0 <= value < MAX_COUNT)
_FIELDS = {
    "epoch": (True, _COUNT),
    "step": (True, _COUNT),
    "step_in_epoch": (False, _COUNT),
    "samples_seen": (False, _COUNT),
    "samples_skipped": (False, _COUNT),
    "world_size": (False, (f"an integer in [1, {MAX_COUNT})", lambda value: type(value) is int
                           and 1 <= value < MAX_COUNT)),
    "model_spec": (True, ("a mapping", lambda value: isinstance(value, dict))),
    "state_dict": (True, ("a mapping of tensors", lambda value: isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items()))),
    # required, but checked for presence where it is restored: a refused model_spec is the more telling line
    "optimizer": (False, ("a mapping with 'state' (a mapping) and 'param_groups' (a list of mappings)",
                         lambda value: isinstance(value, dict) and isinstance(value.get("state"), dict)
                         and isinstance(value.get("param_groups"), list)
                         and all(isinstance(group, dict) for group in value["param_groups"]))),
    "scaler": (False, ("None or a mapping", lambda value: value is None or isinstance(value, dict))),
    "job_state": (False, ("None or a mapping", lambda value: value is None or isinstance(value, dict))),
    "rng": (False, ("None or a list of per-rank states", lambda value: value is None or isinstance(value, list))),
    "name": (False, ("a text", lambda value: isinstance(value, str))),
    "job": (False, ("a text", lambda value: isinstance(value, str))),
}


def validate_resume_state(state: Any, what: str) -> None:
    """The fields of a training checkpoint that a resume reads have the types it reads them as, and every
    rank's RNG state is what this process's generators take (foundation.checkpoint.check_rng_state).
    CheckpointRefused, `what: KEY: ...`, otherwise. Fields no resume reads are not looked at."""
    if not isinstance(state, dict):
        raise CheckpointRefused(f"{what}: holds a {type(state).__name__}, not a mapping of fields")
    for key, (required, (expected, fits)) in _FIELDS.items():
        if key not in state:
            if required:
                raise CheckpointRefused(f"{what}: {key}: missing (not a training checkpoint)")
        elif not fits(state[key]):
            raise CheckpointRefused(f"{what}: {key}: expected {expected}, got {repr(state[key])[:60]}")
    for rank, rng in enumerate(state.get("rng") or ()):
        ckpt_io.check_rng_state(rng, f"{what}: rng.{rank}")


def check_resume_weights(state: Dict[str, Any], job, what: str) -> None:
    """Before the job builds anything: the model of the checkpoint's spec, sized on the meta device, against
    the weights the file holds (compress.models.registry.check_weights), the spec validated with the text
    encoders the job's own flags name."""
    from compress.models.registry import check_weights

    try:
        check_weights(state["model_spec"], state["state_dict"], job.resume_text_encoders())
    except CheckpointRefused as refusal:
        raise CheckpointRefused(f"{what}: {refusal}") from None


def load_resumed_weights(model: nn.Module, state: Dict[str, Any], what: str) -> None:
    """The checkpoint's weights into the model the job built, after checking them against it."""
    ckpt_io.check_tensors_fit(state["state_dict"], model.state_dict(keep_vars=True), f"{what}: state_dict")
    model.load_state_dict(state["state_dict"])


# The per-parameter state AdamW keeps: its step count (a 0-d float32 tensor), and two moment estimates of the
# parameter's shape (three with amsgrad).
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")
ADAMW_AMSGRAD_MOMENT = "max_exp_avg_sq"
# group flags that decide the state's layout or where it must live: the saved value must be the live one
_FIXED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _same_kind(value: Any, live: Any, where: str) -> None:
    """`value` (saved) is of the kind `live` (this run's) is: a flag, a finite number >= 0, a tuple of them."""
    if live is None or isinstance(live, bool):
        fits, expected = value is None or isinstance(value, bool), "true, false or None"
    elif isinstance(live, (int, float)):
        fits = type(value) in (int, float) and math.isfinite(value) and value >= 0
        expected = "a finite number >= 0"
    elif isinstance(live, (tuple, list)):
        fits, expected = isinstance(value, (tuple, list)) and len(value) == len(live), f"{len(live)} numbers"
        if fits:
            for i, (item, live_item) in enumerate(zip(value, live)):
                _same_kind(item, live_item, f"{where}.{i}")
    else:
        fits, expected = type(value) is type(live), type(live).__name__
    if not fits:
        raise CheckpointRefused(f"{where}: expected {expected}, got {repr(value)[:60]}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, what: str) -> None:
    """`saved` (an AdamW state_dict, its structure checked by `validate_resume_state`; None when the checkpoint
    has none) is one `optimizer` (this run's AdamW) can load and step with: as many groups of as many
    parameters; each group's hyperparameters of the kinds this run's are, its layout flags (`_FIXED_FLAGS`) this
    run's; per parameter, exactly AdamW's state with the parameter's shape and a 0-d float32 step.
    CheckpointRefused naming the key otherwise."""
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"check_optimizer_state knows AdamW's state, not {type(optimizer).__name__}'s")
    where = f"{what}: optimizer"
    if saved is None:
        raise CheckpointRefused(f"{where}: missing (not a training checkpoint)")
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(live_groups):
        raise CheckpointRefused(f"{where}.param_groups: {len(groups)} groups, this run's optimizer has "
                                f"{len(live_groups)}")
    params: Dict[int, Tuple[torch.Tensor, Dict[str, Any]]] = {}
    for g, (group, live) in enumerate(zip(groups, live_groups)):
        at = f"{where}.param_groups.{g}"
        ids = group.get("params")
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise CheckpointRefused(f"{at}.params: expected a list of {len(live['params'])} parameter indices, got "
                                    f"{repr(ids)[:60]}")
        for key, value in group.items():
            if key not in live:
                raise CheckpointRefused(f"{at}.{str(key)[:40]}: not a setting of this run's optimizer")
            if key != "params":
                _same_kind(value, live[key], f"{at}.{key}")
        for flag in _FIXED_FLAGS:
            if flag in group and group[flag] != live.get(flag):
                raise CheckpointRefused(f"{at}.{flag}: {group[flag]!r}, this run's optimizer has {live.get(flag)!r}")
        if group.get("foreach") and group.get("fused"):
            raise CheckpointRefused(f"{at}: foreach and fused both set (one implementation runs a step)")
        for index, param in zip(ids, live["params"]):
            if type(index) is not int or index in params:
                raise CheckpointRefused(f"{at}.params: {repr(index)[:40]} is not a parameter index of its own")
            params[index] = (param, live)
    for index, entry in saved["state"].items():
        at = f"{where}.state.{str(index)[:40]}"
        if index not in params:
            raise CheckpointRefused(f"{at}: no parameter of the saved groups has this index")
        param, live = params[index]
        expected = {"step", *ADAMW_MOMENTS, *((ADAMW_AMSGRAD_MOMENT,) if live.get("amsgrad") else ())}
        if not isinstance(entry, dict) or set(entry) != expected:
            held = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise CheckpointRefused(f"{at}: holds {held}, AdamW keeps {sorted(expected)}")
        step = entry["step"]
        if not (isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.float32
                and math.isfinite(float(step)) and float(step) >= 0):
            raise CheckpointRefused(f"{at}.step: expected a 0-d float32 tensor >= 0, got {repr(step)[:60]}")
        for name in sorted(expected - {"step"}):
            moment = entry[name]
            if not (isinstance(moment, torch.Tensor) and moment.is_floating_point()
                    and moment.shape == param.shape):
                got = (f"{moment.dtype} {list(moment.shape)}" if isinstance(moment, torch.Tensor)
                       else type(moment).__name__)
                raise CheckpointRefused(f"{at}.{name}: {got}, the parameter is {param.dtype} {list(param.shape)}")
            ckpt_io.check_tensor(moment, f"{at}.{name}")


def check_scaler_state(scaler, saved: Any, what: str) -> None:
    """`saved` is a state of this run's AMP GradScaler: its fields, each of the kind the live one's is, the
    scale above 0."""
    live = scaler.state_dict()
    where = f"{what}: scaler"
    if not isinstance(saved, dict) or set(saved) != set(live):
        held = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointRefused(f"{where}: holds {held}, the scaler keeps {sorted(live)}")
    for key, value in saved.items():
        _same_kind(value, live[key], f"{where}.{key}")
    if "scale" in saved and not saved["scale"] > 0:
        raise CheckpointRefused(f"{where}.scale: {saved['scale']!r}, a scale must be above 0")
