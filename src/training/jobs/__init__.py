"""Jobs: what a training run computes. The trainer (training/main.py, training/train.py) owns the loop,
distribution, precision, optimizer, schedule, logging and checkpoints; a job owns its models and losses.

A job is one file in this package defining a `Job` subclass with a unique `name`; it is found
automatically (`--job NAME`), and its flags are added by its `add_arguments`. Hooks, in call order:

    job = JobClass(args, dist_info)
    model = job.build_model(resume_spec)        # the trainable module (has .model_spec); teachers live on the job
    transform, tokenizer = job.data_transforms(model)
    job.on_train_start(ctx)
    per epoch:  new = job.on_epoch_start(epoch, ctx)     # may return a replacement model (surgery)
                per step: losses = job.loss(ddp_model, batch)  → {"loss": total, ...parts}
                          job.on_step_end(ctx)             # after optimizer.step (or a skipped step):
                                                           # temperature clamp, mask updates
                job.on_epoch_end(epoch, ctx)
    job.on_train_end(ctx)
    job.state_dict() / job.load_state_dict()    # saved in the checkpoint's job_state → exact resume

`ctx` is the trainer's `RunContext` (model, step, epoch, data, args, dist info, tensorboard writer).
What a job tells the trainer beyond these hooks is declared here too: `lr_phase_starts` (its schedule
phases), `ddp_find_unused_parameters` (how DDP must wrap its model) and `temperatures` (the log-temperatures
the base `on_step_end` clamps).
"""
from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

# CLIP clamps its learnable temperature at 100 (logit_scale = log τ⁻¹ ≤ log 100): past it training is unstable
MAX_LOGIT_SCALE = math.log(100)


class Job:
    name: str = ""
    help: str = ""
    temperatures: Tuple[str, ...] = ("logit_scale",)
    """Attributes of the trainable model holding a learnable log-temperature; the base `on_step_end`
    clamps each to [0, MAX_LOGIT_SCALE] after every step. Every model trained here is CLIP-like and has
    `logit_scale`; a job whose model has another (or none) says so."""

    def __init__(self, args: argparse.Namespace, dist_info):
        self.args = args
        self.dist = dist_info
        self.device = dist_info.device

    # --- flags ------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this job's flags (use `add_argument_once` for flags another job may also define)."""

    # --- models -----------------------------------------------------------------------------------
    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None) -> nn.Module:
        """The trainable model. `resume_spec` is the checkpoint's model_spec when resuming (it may
        describe a changed architecture, e.g. after pruning surgery)."""
        raise NotImplementedError

    def data_transforms(self, model: nn.Module) -> Tuple[Callable, Callable]:
        """(image transform, tokenizer) for the training data; tokenizer None when the job reads only
        batch["caption"] (the batch then has no `text`)."""
        from compress.models.registry import get_preprocess, get_tokenizer

        return get_preprocess(model.model_spec), get_tokenizer(model.model_spec)

    def ddp_find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters without a gradient in a step (slower: a graph walk per
        step). True when some steps leave trainable parameters out of the loss, e.g. losses switched on
        and off by epoch; otherwise DDP waits for their gradients forever."""
        return False

    # --- step -------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_clip_loss(self):
        """open_clip's contrastive loss, distributed as the trainer's flags ask (--local-loss,
        --gather-with-grad) over this run's ranks."""
        from open_clip.loss import ClipLoss

        return ClipLoss(local_loss=self.args.local_loss, gather_with_grad=self.args.gather_with_grad,
                        cache_labels=True, rank=self.dist.rank, world_size=self.dist.world_size)

    # --- schedule ---------------------------------------------------------------------------------
    def lr_phase_starts(self, steps_per_epoch: int) -> List[int]:
        """Optimizer steps at which the learning rate starts a fresh warm-up + cosine (one phase: [0])."""
        return [0]

    # --- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, ctx) -> None:
        pass

    def on_epoch_start(self, epoch: int, ctx) -> Optional[nn.Module]:
        return None

    def on_step_end(self, ctx) -> None:
        """After every optimizer step (a skipped non-finite step too, so step-indexed schedules stay in
        line with ctx.step). Clamps `temperatures`; an override calls this first."""
        with torch.no_grad():
            for name in self.temperatures:
                getattr(ctx.unwrapped_model, name).clamp_(0, MAX_LOGIT_SCALE)

    def on_epoch_end(self, epoch: int, ctx) -> None:
        pass

    def on_train_end(self, ctx) -> None:
        pass

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


# the trainer's parser gives each job's flags an argument group titled "--job NAME" (training/params.py)
JOB_GROUP_PREFIX = "--job "


def mark_job_flag(action: argparse.Action, group) -> None:
    """Record on `action` that the job whose argument group is `group` takes it (`action.jobs`, a frozenset of
    job names): the trainer refuses a flag of another job than the one it runs, and picks the job from its
    flags when no --job is given."""
    title = getattr(group, "title", None) or ""
    if title.startswith(JOB_GROUP_PREFIX):
        action.jobs = getattr(action, "jobs", frozenset()) | {title[len(JOB_GROUP_PREFIX):]}


def add_argument_once(group, *names: str, **kwargs) -> None:
    """Add a flag unless another job already defined it (jobs share e.g. --teacher-model); either way the flag
    belongs to this group's job too."""
    existing = {opt: action for action in group._actions for opt in action.option_strings}
    shared = next((existing[name] for name in names if name in existing), None)
    if shared is None:
        mark_job_flag(group.add_argument(*names, **kwargs), group)
    elif getattr(shared, "jobs", None):  # another job's flag; a trainer flag stays everyone's
        mark_job_flag(shared, group)


def available_jobs() -> Dict[str, Type[Job]]:
    """Every Job subclass defined in this package's modules, by name."""
    jobs: Dict[str, Type[Job]] = {}
    for module in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{module.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, Job) and obj is not Job and obj.name:
                jobs[obj.name] = obj
    return jobs
