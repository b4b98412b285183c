"""The step loop of one epoch: forward through the job, backward, step, log, save.

Knows nothing of what a job computes: it gets a loss dict from `job.loss` and hands control back at
`job.on_step_end`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from foundation.errors import DataError, NonFiniteLossError
from foundation.progress import Progress
from training.accel import autocast
from training.distributed import DistInfo, all_reduce_mean, all_reduce_sum


@dataclass
class RunContext:
    """What the loop and the jobs share during a run."""

    args: Any
    dist: DistInfo
    model: nn.Module  # what the loss runs through: possibly DDP-wrapped and/or compiled
    unwrapped_model: nn.Module  # the plain module: saved, evaluated, edited by jobs
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    scheduler: Callable[[int], float]
    data: Any
    tb_writer: Any = None
    results_file: Any = None
    epoch: int = 0
    step: int = 0  # global optimizer steps done
    step_in_epoch: int = 0  # batches of this epoch done (data position)
    samples_seen: int = 0
    samples_skipped: int = 0
    save_checkpoint: Callable[[str], None] = None
    stopped_early: bool = False  # the run ends mid-epoch, as if interrupted: --stop-after-steps, or a stop signal
    stop: Any = None  # training.preemption.StopRequest: the stop signals this process received
    stopped_by: Optional[str] = None  # the signal every rank agreed to stop on (e.g. "SIGTERM")
    val_data: Any = None  # --val-data's loader, on rank 0 (training.validation)

    def log_scalars(self, scalars: Dict[str, float], step: Optional[int] = None) -> None:
        """Tensorboard + results.jsonl, rank 0 only."""
        if not self.dist.is_master:
            return
        step = self.step if step is None else step
        if self.tb_writer is not None:
            for key, value in scalars.items():
                self.tb_writer.add_scalar(key, value, step)
        if self.results_file is not None:
            import json

            self.results_file.write(
                json.dumps({"step": step, "epoch": self.epoch, "time": time.time(), **scalars}) + "\n")
            self.results_file.flush()


def move_to_device(batch: Dict[str, Any], device: torch.device, precision: str) -> Dict[str, Any]:
    out = dict(batch)
    for key in ("image", "text", "index"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key].to(device, non_blocking=True)
    if precision == "bf16" and isinstance(out.get("image"), torch.Tensor):
        out["image"] = out["image"].to(torch.bfloat16)
    return out


def _check_bad_fraction(ctx: RunContext) -> None:
    seen = ctx.samples_seen + ctx.samples_skipped
    if seen >= 100 and ctx.samples_skipped / seen > ctx.args.max_bad_fraction:
        raise DataError(
            f"stopping: {ctx.samples_skipped} of {seen} samples so far were bad "
            f"({100 * ctx.samples_skipped / seen:.1f}% > --max-bad-fraction {ctx.args.max_bad_fraction}); "
            f"see out.log for which files"
        )


def _stop_flag(ctx: RunContext, device: torch.device) -> torch.Tensor:
    return torch.tensor(1.0 if ctx.stop is not None and ctx.stop.requested else 0.0, device=device)


def stop_agreed(ctx: RunContext) -> bool:
    """Collective: whether a stop signal reached any rank; if so ctx.stopped_by names it (on every rank)."""
    flag = _stop_flag(ctx, ctx.dist.device)
    if ctx.dist.distributed:
        flag = all_reduce_sum(flag)
    if flag.item() > 0:
        _agree_to_stop(ctx)
    return ctx.stopped_by is not None


def _agree_to_stop(ctx: RunContext) -> None:
    own = ctx.stop.requested if ctx.stop is not None else None
    ctx.stopped_by = own or "a stop signal to another rank"
    logging.warning("rank %d: stopping after step %d (%s%s)", ctx.dist.rank, ctx.step, ctx.stopped_by,
                    f", {ctx.stop.seconds_since():.1f} s after it came" if own else "")


def _backward(loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


class FeatureCache:
    """--accum-freq N for a job whose loss couples the samples of a batch (`job.caches_features`), as
    open_clip_train: each micro-batch's features are computed without gradients and kept; after the N-th, each
    micro-batch is computed again with gradients and its loss taken over its own features concatenated with the
    other N − 1 micro-batches' cached ones, so the contrastive loss sees N x B samples per rank, then backward.

    The N backwards sum to the gradient of the loss over all N x B samples: each micro-batch's features carry
    their own share, and the scalars (temperature, bias), shared by all N losses, carry gradient in the last
    one only (open_clip_train lets every loss add it, N times the gradient). Exact when the forward is
    deterministic: dropout and patch dropout draw anew in the recomputation, as in open_clip_train."""

    def __init__(self, job, precision: str, device: torch.device):
        self.job, self.precision, self.device = job, precision, device
        self.batches: list = []
        self.features: Dict[str, list] = {}

    def add(self, model: nn.Module, batch: Dict[str, Any]) -> None:
        with torch.no_grad(), autocast(self.precision, self.device):
            out = self.job.features(model, batch)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                self.features.setdefault(key, []).append(value)
        self.batches.append(batch)

    def backward(self, model: nn.Module, scaler: Optional[torch.amp.GradScaler]) -> Dict[str, torch.Tensor]:
        """The N losses' backward (gradients all-reduced in the last one under DDP); the last loss dict."""
        batches, cached = self.batches, self.features
        self.batches, self.features = [], {}
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            sync_context = model.no_sync if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext
            with sync_context():
                with autocast(self.precision, self.device):
                    out = self.job.features(model, batch)
                    inputs = {}
                    for key, value in out.items():
                        if key in cached:
                            inputs[key] = torch.cat(cached[key][:j] + [value] + cached[key][j + 1:])
                        elif isinstance(value, torch.Tensor) and not last:
                            inputs[key] = value.detach()
                        else:
                            inputs[key] = value
                    losses = self.job.features_loss(inputs)
                _backward(losses["loss"], scaler)
        return losses


def train_one_epoch(ctx: RunContext, job) -> None:
    args, dist_info, device = ctx.args, ctx.dist, ctx.dist.device
    model, optimizer, scaler = ctx.model, ctx.optimizer, ctx.scaler
    model.train()
    num_batches = ctx.data.num_batches
    steps_per_epoch = num_batches // args.accum_freq
    # a bar on a terminal; where stderr is a file (SLURM), a line every $CLIPCOMPRESS_PROGRESS_SECONDS
    progress = Progress(total=num_batches, initial=ctx.step_in_epoch, desc=f"epoch {ctx.epoch}", unit="batch",
                        enabled=dist_info.is_master and args.log_level != "warning")
    data_time = batch_time = 0.0
    window_samples, window_start = 0, time.perf_counter()
    end = time.perf_counter()
    micro_step = 0
    bad_logged = 0
    cache = FeatureCache(job, args.precision, device) if args.accum_freq > 1 and job.caches_features else None

    for batch in ctx.data.batches():
        data_time += time.perf_counter() - end
        skipped = batch["skipped"]
        if skipped:
            ctx.samples_skipped += skipped
            for reason in batch["skipped_reasons"][: max(0, 20 - bad_logged)]:
                logging.warning("skipped bad sample: %s", reason)
            bad_logged += len(batch["skipped_reasons"])
        ctx.samples_seen += len(batch["caption"])
        _check_bad_fraction(ctx)

        batch = move_to_device(batch, device, args.precision)
        micro_step += 1
        last_micro = micro_step % args.accum_freq == 0
        if cache is not None:
            cache.add(model, batch)
        else:
            sync_context = model.no_sync if (hasattr(model, "no_sync") and not last_micro) else contextlib.nullcontext
            with sync_context():
                with autocast(args.precision, device):
                    losses = job.loss(model, batch)
                total = losses["loss"]
                _backward(total / args.accum_freq, scaler)
        ctx.step_in_epoch += 1
        progress.update(1)
        if not last_micro:
            continue
        if cache is not None:
            losses = cache.backward(model, scaler)
            total = losses["loss"]

        # one host sync per optimizer step: a NaN on any rank stops (or skips) on every rank together, and a
        # stop signal on any rank stops every rank after this same step
        flags = torch.stack([torch.isfinite(total.detach()).float(), _stop_flag(ctx, total.device)])
        if dist_info.distributed:
            flags = all_reduce_sum(flags)
        finite_ranks, stopping_ranks = flags.tolist()
        if finite_ranks < dist_info.world_size:
            if not args.skip_nonfinite_loss:
                raise NonFiniteLossError(
                    f"loss is {total.item()} at step {ctx.step + 1} (epoch {ctx.epoch}); stopping before any "
                    f"checkpoint is written (lower --lr, use --grad-clip-norm, or --skip-nonfinite-loss)")
            # a skipped step still counts: the schedule, the job's step hooks, the logs, checkpoints,
            # --stop-after-steps and the epoch's end all see the same step numbers as without the skip
            logging.warning("skipping step %d: non-finite loss %s", ctx.step + 1, total.item())
        elif scaler is not None:
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients go with it
        ctx.step += 1
        lr = ctx.scheduler(ctx.step)
        job.on_step_end(ctx)

        batch_time += time.perf_counter() - end
        window_samples += len(batch["caption"]) * args.accum_freq * dist_info.world_size
        end = time.perf_counter()

        if ctx.step % args.log_every_n_steps == 0 or ctx.step_in_epoch == num_batches:
            # the logged loss is the mean over ranks, so runs on different rank counts compare directly
            values = {k: all_reduce_mean(v.detach().float()).item() for k, v in losses.items()}
            elapsed = time.perf_counter() - window_start
            scalars = {f"train/{k}": v for k, v in values.items()}
            scalars.update({
                "train/lr": lr,
                "train/samples_per_second": window_samples / max(elapsed, 1e-9),
                "train/data_time": data_time / max(1, args.log_every_n_steps),
                "train/batch_time": batch_time / max(1, args.log_every_n_steps),
                "data/skipped": ctx.samples_skipped,
            })
            scale = getattr(ctx.unwrapped_model, "logit_scale", None)
            if isinstance(scale, torch.Tensor):
                scalars["train/logit_scale"] = scale.detach().float().exp().item()
            ctx.log_scalars(scalars)
            if dist_info.is_master:
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                logging.info("epoch %d step %d (%d/%d) loss %.4f lr %.3e %.1f samples/s skipped %d",
                             ctx.epoch, ctx.step, ctx.step_in_epoch, num_batches, values["loss"], lr,
                             scalars["train/samples_per_second"], ctx.samples_skipped)
            data_time = batch_time = 0.0
            window_samples, window_start = 0, time.perf_counter()

        if stopping_ranks > 0:
            _agree_to_stop(ctx)
            # mid-epoch the run ends here (training.main writes epoch_latest.pt); after the epoch's last step
            # the epoch ends as usual first, its checkpoint included
            ctx.stopped_early = ctx.step_in_epoch < steps_per_epoch * args.accum_freq
            break
        if args.save_every_n_steps and ctx.step % args.save_every_n_steps == 0 and ctx.step_in_epoch < num_batches:
            ctx.save_checkpoint("latest")
        if args.stop_after_steps and ctx.step >= args.stop_after_steps:
            ctx.stopped_early = True
            break
        if ctx.step_in_epoch >= steps_per_epoch * args.accum_freq:
            break
    progress.close()
