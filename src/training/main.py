"""Trainer entry point: `torchrun --nproc_per_node N -m training.main --job JOB ...` (or `python -m ...`).

Reads top to bottom: processes → run folder → job and model → data → optimizer and schedule → resume →
epochs → end. What a run computes lives in the job (training/jobs/); the step loop in training/train.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from compress.models.registry import get_preprocess
from compress.models.text_context import text_context_unchanged_reason, trim_text_context
from foundation import checkpoint as ckpt_io
from foundation.errors import UserError
from foundation.locks import RunLock
from foundation.logs import quiet_open_clip
from training.accel import log_accelerator_setup
from training.data import get_data
from training.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup,
    compute_on_master,
    in_turns,
    init_distributed,
)
from training.jobs import available_jobs
from training.params import parse_args
from training.preemption import STOP_EXIT_CODE, StopRequest, StopRequested, serve_stack_dumps
from training.resume import (
    check_optimizer_state,
    check_resume_weights,
    check_same_position,
    check_scaler_state,
    load_resume_state,
    load_resumed_weights,
)
from training.train import RunContext, stop_agreed, train_one_epoch
from training.validation import make_val_data, validate_in_loop


def main(argv=None) -> None:
    stop = None
    try:
        args = parse_args(argv)
        stop = StopRequest(args.stop_signal).install()
        serve_stack_dumps(args.stack_dump_signal)
        summary = run(args, stop)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        log_to_files_only(logging.ERROR, str(e))  # out.log keeps it too; the console has it once, above
        cleanup()
        sys.exit(2)
    except StopRequested as e:  # during start-up: nothing trained since the last checkpoint
        logging.warning("stopped by %s during start-up; nothing to save (run again with --resume latest)", e)
        cleanup()
        exit_soon(STOP_EXIT_CODE)
    finally:
        if stop is not None:  # a caller in this process (a test) gets its own handlers back
            stop.uninstall()
    if summary["stopped_by"]:
        exit_soon(STOP_EXIT_CODE)


def exit_soon(code: int) -> None:
    """The exit of a finished run, and of a run stopped by a signal, where the grace period counts and the exit
    code is what the SLURM script requeues on. Everything is on disk by now (checkpoint written, logs and result files
    closed), so the interpreter's teardown is skipped: its final garbage collections take 5-10 s on a loaded
    2-core machine, and torch's C++ threads can abort in it (`terminate called without an active
    exception`, exit 134), which would turn a clean stop into a crash. Loader workers see their rank gone
    and end by themselves."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(args, stop: Optional[StopRequest] = None) -> Dict[str, Any]:
    """The whole run; its summary's "stopped_by" names the signal it stopped on, None when it ran to its end."""
    stop = stop or StopRequest()  # not installed: nothing sets it (a caller that handles signals itself)
    with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
        with stop.abortable():  # start-up: a stop signal ends the process at once, nothing is trained yet
            ctx, job = start_run(args, stop, held)
        train_epochs(ctx, job)
        return finish_run(ctx, job)


def start_run(args, stop: StopRequest, held: contextlib.ExitStack):
    # 1. processes and the run folder -----------------------------------------------------------------
    dist_info = init_distributed(args.device, args.dist_backend, args.dist_timeout_minutes,
                                 set_device_rank=not args.no_set_device_rank)
    args.name = broadcast_object(args.name or time.strftime("%Y_%m_%d-%H_%M_%S-") + args.model.replace("/", "-"))
    log_dir, notes = prepare_run_dir(args, dist_info, held)
    setup_logging(log_dir, dist_info, args.log_level)
    logging.info("run %s: job %s, %d process(es) on %s, launched by %s", args.name, args.job,
                 dist_info.world_size, dist_info.device, dist_info.launcher)
    for note in notes:
        logging.info("%s", note)
    log_accelerator_setup(args, dist_info.device)  # TF32 on CUDA; the pure-bf16 warning; which faiss loaded
    if getattr(args, "job_from_flags", None):  # the ProtoRKD README's commands carry no --job
        logging.info("no --job given: running --job %s, the job of %s", args.job, args.job_from_flags)
    for note in getattr(args, "config_notes", ()):  # e.g. OpenAI weights → the -quickgelu config
        logging.info("%s", note)

    # 2. job and model (same init on every rank, then per-rank randomness) --------------------------
    seed_everything(args.seed)
    resumed = load_resume_state(args, log_dir, dist_info)  # rank 0 chooses; every rank gets the same state
    resume_from, checkpoint = resumed if resumed else (None, None)
    job = available_jobs()[args.job](args, dist_info)
    if checkpoint:  # its model sized from its spec, on the meta device, against the weights it holds: first
        check_resume_weights(checkpoint, job, f"checkpoint {resume_from}")
    # weights a build downloads (an open_clip tag, a hub teacher) are fetched once per cache: rank 0 builds
    # first, then the first rank of each other node, then the rest, who find the weights in their node's cache
    model = in_turns(lambda: job.build_model(checkpoint["model_spec"] if checkpoint else None), dist_info.local_rank)
    if checkpoint:
        load_resumed_weights(model, checkpoint, f"checkpoint {resume_from}")
    model = place_model(model, args, dist_info)
    seed_everything(args.seed + dist_info.rank)

    # 3. data -------------------------------------------------------------------------------------------
    transform, tokenizer = job.data_transforms(model)
    data = get_data(args, transform, tokenizer, dist_info.rank, dist_info.world_size, device=dist_info.device,
                    local_rank=dist_info.local_rank, default_cache_dir=os.path.join(log_dir, "cache"))
    logging.info("%d samples per epoch, %d batches per rank, %d optimizer steps in all",
                 data.num_samples, data.num_batches, data.num_batches // args.accum_freq * args.epochs)

    # 4. optimizer, scaler, schedule ------------------------------------------------------------------
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" and dist_info.device.type == "cuda" else None

    ctx = RunContext(args=args, dist=dist_info, model=model, unwrapped_model=model, optimizer=optimizer,
                     scaler=scaler, scheduler=run_schedule(optimizer, args, data, job), data=data,
                     tb_writer=make_tb_writer(args, log_dir, dist_info),
                     results_file=open(log_dir / "results.jsonl", "a") if dist_info.is_master else None, stop=stop)
    ctx.save_checkpoint = lambda kind: save_run_checkpoint(ctx, job, log_dir, kind)
    # --val-data: the eval transform of the model's (possibly --image-* overridden) preprocessing
    ctx.val_data = make_val_data(args, get_preprocess(model.model_spec), tokenizer, job, dist_info)

    # 5. resume: weights above; here optimizer, scaler, job state, position and RNG --------------------
    if checkpoint:
        restore_run_state(ctx, job, checkpoint, f"checkpoint {resume_from}")
        logging.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)",
                     resume_from, ctx.epoch, ctx.step, ctx.step_in_epoch)
        checkpoint = resumed = None  # restored: the run does not keep a second copy of its state
    check_same_position(ctx)
    wrap_model(ctx, job)
    job.on_train_start(ctx)
    record_run(args, log_dir, dist_info)
    return ctx, job


def train_epochs(ctx: RunContext, job) -> None:
    """6. epochs, until the last, --stop-after-steps, or a stop signal (after a step, or at an epoch's end)."""
    args = ctx.args
    for epoch in range(ctx.epoch, args.epochs):
        if ctx.stopped_by or stop_agreed(ctx):  # came during the last epoch's end (checkpoint, eval)
            break
        ctx.epoch = epoch
        replacement = job.on_epoch_start(epoch, ctx)
        if replacement is not None:  # e.g. pruning surgery: a smaller model continues the run
            replace_model(ctx, job, replacement)
        ctx.data.set_epoch(epoch, ctx.step_in_epoch)
        train_one_epoch(ctx, job)
        if ctx.stopped_early:
            break
        ctx.step_in_epoch = 0
        job.on_epoch_end(epoch, ctx)
        ctx.epoch = epoch + 1
        ctx.save_checkpoint("epoch")
        evaluate_in_loop(ctx, job)
        validate_in_loop(ctx, job)
    if ctx.stopped_by and ctx.epoch >= args.epochs and not ctx.stopped_early:
        ctx.stopped_by = None  # the signal came after the last step: the run is complete, nothing to resume
    if ctx.stopped_early or ctx.stopped_by:
        ctx.save_checkpoint("latest")
        why = ctx.stopped_by or "--stop-after-steps"
        logging.info("stopped at epoch %d step %d (%s); epoch_latest.pt holds it%s", ctx.epoch, ctx.step, why,
                     f"; exiting {STOP_EXIT_CODE} (run again with --resume latest)" if ctx.stopped_by else "")


def finish_run(ctx: RunContext, job) -> Dict[str, Any]:
    # 7. end ---------------------------------------------------------------------------------------------
    args, dist_info = ctx.args, ctx.dist
    if not ctx.stopped_early and not ctx.stopped_by:
        job.on_train_end(ctx)
    summary = {"name": args.name, "job": args.job, "epochs": ctx.epoch, "steps": ctx.step,
               "samples_skipped": ctx.samples_skipped, "stopped_by": ctx.stopped_by}
    if dist_info.is_master:
        if ctx.tb_writer is not None:
            ctx.tb_writer.close()
        ctx.results_file.close()
        logging.info("done: %s", json.dumps(summary))
    barrier()
    cleanup()
    return summary


# --- run folder and logging --------------------------------------------------------------------------


TRAINER_LOCK = "trainer.lock"


def prepare_run_dir(args, dist_info: DistInfo, held: contextlib.ExitStack) -> Tuple[Path, List[str]]:
    """The run folder, locked by rank 0 for the run's life (one trainer per run: a second one, --resume latest
    or not, would fork the run and overwrite its checkpoints), and what to log about it once logging is up."""
    log_dir = Path(args.logs) / args.name
    problem, notes = None, []
    if dist_info.is_master:
        try:
            notes = _claim_run_dir(args, log_dir, held)
        except UserError as error:
            problem = str(error)
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)
    barrier()
    return log_dir, notes


def _claim_run_dir(args, log_dir: Path, held: contextlib.ExitStack) -> List[str]:
    log_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(log_dir / TRAINER_LOCK, "trainer").acquire()
    held.callback(lock.release)
    if args.resume is None and (log_dir / "params.txt").exists():
        raise UserError(f"run folder {log_dir} already exists; pass --resume latest to continue it, "
                        f"or choose another --name")
    notes = []
    if lock.previous.get("pid"):
        notes.append(f"took over {lock.path.name} from pid {lock.previous['pid']} on {lock.previous.get('host')} "
                     f"(no longer running)")
    checkpoints = log_dir / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    # left by a save that a kill interrupted, each up to a whole checkpoint; only the lock holder writes here
    removed = ckpt_io.remove_stale_temp_files(checkpoints)
    if removed:
        notes.append(f"removed {len(removed)} temp file(s) of interrupted checkpoint writes "
                     f"({sum(size for _, size in removed) / 2**20:.1f} MB): "
                     + ", ".join(path.name for path, _ in removed))
    return notes


def record_run(args, log_dir: Path, dist_info: DistInfo) -> None:
    """params.txt (and --copy-codebase's copy), written once every start-up check has passed: a run refused at
    start leaves only its out.log, so the same --name can be used again."""
    if not dist_info.is_master:
        return
    lines = "".join(f"{key}: {getattr(args, key)}\n" for key in sorted(vars(args)))
    ckpt_io.atomic_write_bytes(log_dir / "params.txt", lines.encode("utf-8"))
    if args.copy_codebase:
        copy_codebase(Path(__file__).resolve().parents[1], log_dir / "code" / "src")


# what --copy-codebase copies: the package source and its data files, nothing else that may sit beside it
CODEBASE_SUFFIXES = (".py", ".json")


def copy_codebase(src: Path, dest: Path) -> int:
    """Copy the packages under `src` (ProtoCLIP's --copy-codebase). Only regular files with a source suffix;
    no symlink is followed or copied, and no dotfile or dot-folder (.env, keys, .git) is entered."""
    copied = 0
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not os.path.islink(os.path.join(root, d)))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file() or path.suffix not in CODEBASE_SUFFIXES:
                continue
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target, follow_symlinks=False)
            copied += 1
    return copied


def setup_logging(log_dir: Path, dist_info: DistInfo, level: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter(f"%(asctime)s | rank {dist_info.rank} | %(levelname)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(getattr(logging, level.upper()) if dist_info.is_master else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    if dist_info.is_master:
        file_handler = logging.FileHandler(log_dir / "out.log")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_open_clip()


def log_to_files_only(level: int, message: str) -> None:
    """A record for the run's log files (out.log), not the console handler."""
    root = logging.getLogger()
    record = root.makeRecord(root.name, level, __file__, 0, message, (), None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)


def make_tb_writer(args, log_dir: Path, dist_info: DistInfo):
    """The --report-to sinks (tensorboard, wandb) as one writer on rank 0 (training/reporting.py)."""
    from training.reporting import make_writer

    return make_writer(args, log_dir, dist_info.is_master)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- model placement ---------------------------------------------------------------------------------


def place_model(model: nn.Module, args, dist_info: DistInfo) -> nn.Module:
    model = model.to(dist_info.device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    unchanged = "--full-text-context" if args.full_text_context else text_context_unchanged_reason(model)
    if unchanged is None:
        trim_text_context(model)
        logging.info("text tower: runs up to each batch's longest caption (--full-text-context: the whole context)")
    else:
        logging.info("text tower: the whole context (%s)", unchanged)
    return model


def wrap_model(ctx: RunContext, job) -> None:
    """DDP (and torch.compile) around the plain model; the plain one stays in ctx.unwrapped_model."""
    model = ctx.unwrapped_model
    sync_batchnorm(model, ctx.args, ctx.dist)
    if ctx.dist.distributed and any(p.requires_grad for p in model.parameters()):
        device_ids = [ctx.dist.device.index] if ctx.dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=job.ddp_find_unused_parameters())
    if ctx.args.torchcompile:
        model = torch.compile(model)
    ctx.model = model


def sync_batchnorm(model: nn.Module, args, dist_info: DistInfo) -> None:
    """--use-bn-sync under DDP: the model's BatchNorm layers become torch's SyncBatchNorm in place (the same
    parameters and buffers, so checkpoints do not change), as open_clip_train; one process has nothing to sync."""
    if not getattr(args, "use_bn_sync", False) or not dist_info.distributed:
        return
    if dist_info.device.type != "cuda":
        raise UserError("--use-bn-sync: torch's SyncBatchNorm trains on GPUs only")
    for name, child in list(model.named_children()):
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def replace_model(ctx: RunContext, job, new_model: nn.Module) -> None:
    """A job changed the architecture: new optimizer over the new parameters, re-wrapped."""
    ctx.unwrapped_model = place_model(new_model, ctx.args, ctx.dist)
    ctx.optimizer = build_optimizer(ctx.unwrapped_model, ctx.args)
    ctx.scheduler = run_schedule(ctx.optimizer, ctx.args, ctx.data, job)
    wrap_model(ctx, job)


# --- optimizer and schedule --------------------------------------------------------------------------


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, norms and the temperature (as open_clip)."""

    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("nothing to train: every parameter is frozen")
    groups = [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": args.wd},
    ]
    # The fused kernel updates every tensor in one pass; the default (foreach) path launches a chain of
    # ops per step. On CPU the fused step measured 4.5 ms against foreach's 20 ms for a 7M-parameter CLIP.
    fused = args.optimizer_impl == "fused" and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in named)
    implementation = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **implementation)


def run_schedule(optimizer: torch.optim.Optimizer, args, data, job):
    """The run's schedule over `optimizer`: --epochs of the data's optimizer steps, in the job's phases
    (the same at the start and for a job's replacement model, so the rate carries on by step)."""
    steps_per_epoch = data.num_batches // args.accum_freq
    cooldown = steps_per_epoch * (getattr(args, "epochs_cooldown", None) or 0)
    return cosine_schedule(optimizer, args, steps_per_epoch * args.epochs, job.lr_phase_starts(steps_per_epoch),
                           cooldown_steps=cooldown)


def cosine_schedule(optimizer: torch.optim.Optimizer, args, total_steps: int, phase_starts=(0,),
                    cooldown_steps: int = 0):
    """Returns `set_lr(step) -> lr`: linear warm-up, then cosine to 0, constant, or constant then a polynomial
    cooldown to --lr-cooldown-end over the phase's last `cooldown_steps` (open_clip_train's const_lr_cooldown),
    restarted at each of `phase_starts` (a job's phases, e.g. UPop's search then fine-tune). A pure function of
    the step, so a resumed run gets the same rate."""
    base_lrs = [group.get("initial_lr", args.lr) for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = lr
    boundaries = sorted({0, *(s for s in phase_starts if 0 < s < total_steps)}) + [total_steps]

    def set_lr(step: int) -> float:
        phase = max(i for i, start in enumerate(boundaries[:-1]) if start <= step) if step >= 0 else 0
        start, length = boundaries[phase], boundaries[phase + 1] - boundaries[phase]
        local = step - start
        factor = 1.0
        if local < args.warmup:
            factor = (local + 1) / args.warmup
        elif args.lr_scheduler == "cosine":
            progress = (local - args.warmup) / max(1, length - args.warmup)
            factor = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        elif args.lr_scheduler == "const-cooldown" and local >= length - cooldown_steps:
            decay = (1 - (local - (length - cooldown_steps)) / max(1, cooldown_steps)) ** args.lr_cooldown_power
            rates = [decay * (base - args.lr_cooldown_end) + args.lr_cooldown_end for base in base_lrs]
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate
            return rates[0]
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        return base_lrs[0] * factor

    set_lr(0)
    return set_lr


# --- checkpoints -------------------------------------------------------------------------------------


def gather_rng_states() -> list:
    """Every rank's RNG state (a collective): each rank resumes its own stream."""
    state = ckpt_io.capture_rng_state()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def save_run_checkpoint(ctx: RunContext, job, log_dir: Path, kind: str) -> None:
    """kind 'latest': mid-epoch epoch_latest.pt; 'epoch': epoch_N.pt (+ latest when asked). Collective."""
    rng_states = gather_rng_states()
    job_state = job.state_dict()
    problem = None
    if ctx.dist.is_master:
        try:
            write_run_checkpoint(ctx, job_state, rng_states, log_dir, kind)
        except UserError as e:  # a failed write (disk full): the previous checkpoint is still whole
            problem = str(e)
    # collective: a failed save stops every rank with the same one line; none waits on a barrier for it
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)


def write_run_checkpoint(ctx: RunContext, job_state, rng_states, log_dir: Path, kind: str) -> None:
    args = ctx.args
    model = ctx.unwrapped_model
    state = {
        "epoch": ctx.epoch,
        "step": ctx.step,
        "step_in_epoch": ctx.step_in_epoch,
        "name": args.name,
        "job": args.job,
        "model_spec": model.model_spec,
        "state_dict": model.state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "job_state": job_state,
        "rng": rng_states,
        "samples_seen": ctx.samples_seen,
        "samples_skipped": ctx.samples_skipped,
        "world_size": ctx.dist.world_size,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    checkpoint_dir = log_dir / "checkpoints"
    if kind == "latest":
        ckpt_io.save_checkpoint(state, checkpoint_dir / ckpt_io.LATEST)
    else:
        epoch = ctx.epoch
        if args.save_frequency > 0 and (epoch % args.save_frequency == 0 or epoch == args.epochs):
            ckpt_io.save_checkpoint(state, checkpoint_dir / f"epoch_{epoch}.pt")
            previous = checkpoint_dir / f"epoch_{epoch - args.save_frequency}.pt"
            if args.delete_previous_checkpoint and previous.exists():
                previous.unlink()
        if args.save_most_recent or args.save_every_n_steps:
            ckpt_io.save_checkpoint(state, checkpoint_dir / ckpt_io.LATEST)
    logging.info("saved %s checkpoint at epoch %d step %d", kind, ctx.epoch, ctx.step)


def restore_run_state(ctx: RunContext, job, checkpoint: Dict[str, Any], what: str) -> None:
    """The checkpoint's run state (its fields' types checked when it was read, training.resume), the optimizer's
    and scaler's checked against this run's before they are loaded; `what` names the checkpoint."""
    check_optimizer_state(ctx.optimizer, checkpoint.get("optimizer"), what)
    ctx.optimizer.load_state_dict(checkpoint["optimizer"])
    if ctx.scaler is not None and checkpoint.get("scaler"):
        check_scaler_state(ctx.scaler, checkpoint["scaler"], what)
        ctx.scaler.load_state_dict(checkpoint["scaler"])
    job.load_state_dict(checkpoint.get("job_state") or {})
    ctx.epoch = checkpoint["epoch"]
    ctx.step = checkpoint["step"]
    ctx.step_in_epoch = checkpoint.get("step_in_epoch", 0)
    ctx.samples_seen = checkpoint.get("samples_seen", 0)
    ctx.samples_skipped = checkpoint.get("samples_skipped", 0)
    ctx.scheduler(ctx.step)
    rng = checkpoint.get("rng")
    if rng and len(rng) == ctx.dist.world_size:
        ckpt_io.restore_rng_state(rng[ctx.dist.rank])
    elif rng:
        logging.warning("checkpoint was written by %d processes, this run has %d: RNG streams restart",
                        len(rng), ctx.dist.world_size)


# --- in-loop evaluation --------------------------------------------------------------------------------


def evaluate_in_loop(ctx: RunContext, job) -> None:
    """Zero-shot / linear / retrieval every N epochs through eval/, on rank 0.

    The other ranks wait outside any collective (`compute_on_master` polls the process group's store), so an
    eval longer than --dist-timeout-minutes cannot fail the job. A stop signal abandons the eval: the epoch's
    checkpoint is already written, and the monitor can score it."""
    args = ctx.args
    wanted = [name for name, freq in (("zeroshot", args.zeroshot_frequency), ("linear_probe", args.linear_frequency),
                                      ("retrieval", args.retrieval_frequency)) if freq and ctx.epoch % freq == 0]
    if not wanted or ctx.stopped_by:
        return

    def score() -> Optional[Dict[str, float]]:  # rank 0; --eval-data-dir is there: parse_args checks it
        from training.evaluation import evaluate_model

        logging.info("in-loop eval at epoch %d (%s); the other ranks wait", ctx.epoch, ", ".join(wanted))
        try:
            with ctx.stop.abortable():
                metrics = evaluate_model(ctx.unwrapped_model, args.eval_data_dir, wanted, ctx.dist.device,
                                         batch_size=args.batch_size, workers=args.workers, topk=args.topk,
                                         precision=args.precision)
        except StopRequested as signal_name:
            logging.warning("in-loop eval at epoch %d abandoned on %s; the monitor can score epoch_%d.pt",
                            ctx.epoch, signal_name, ctx.epoch)
            return None
        except Exception as error:
            if not ctx.stop.requested:
                raise
            # the signal reached the eval's loader workers too (SLURM and torchrun signal whole process groups)
            # and one died of it before this process noticed its own
            logging.warning("in-loop eval at epoch %d abandoned on %s (%s); the monitor can score epoch_%d.pt",
                            ctx.epoch, ctx.stop.requested, _first_line(error), ctx.epoch)
            return None
        finally:
            ctx.unwrapped_model.train()
        ctx.log_scalars({f"eval/{k}": v for k, v in metrics.items()})
        logging.info("eval at epoch %d: %s", ctx.epoch, json.dumps(metrics))
        return metrics

    compute_on_master(score, f"in-loop eval at epoch {ctx.epoch}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


if __name__ == "__main__":
    main()
    # a finished run has closed its writers and left the process group: skip the teardown, where torch's C++
    # threads can abort (exit 134), which torchrun would count as a failed worker and restart the finished job
    exit_soon(0)
