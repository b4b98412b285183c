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
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

import torch
from torch import nn

from foundation.errors import UserError

# CLIP clamps its learnable temperature at 100 (logit_scale = log τ⁻¹ ≤ log 100): past it training is unstable
MAX_LOGIT_SCALE = math.log(100)
# --siglip on a model without a logit bias: open_clip_train's initial temperature and bias (the SigLIP paper's)
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


class Job:
    name: str = ""
    help: str = ""
    temperatures: Tuple[str, ...] = ("logit_scale",)
    """Attributes of the trainable model holding a learnable log-temperature; the base `on_step_end`
    clamps each to [0, MAX_LOGIT_SCALE] after every step. Every model trained here is CLIP-like and has
    `logit_scale`; a job whose model has another (or none) says so."""
    caches_features: bool = False
    """Whether `--accum-freq N` caches features (open_clip_train): the job defines `features(model, batch)` (the
    model's output dict: per-sample tensors plus 0-d `logit_scale` / `logit_bias`) and `features_loss(out)` (the
    loss dict of such a dict), and the trainer computes the loss of each micro-batch's features with gradients
    concatenated with the other N − 1 micro-batches' cached ones. Otherwise N micro-batches accumulate gradients
    (the same for a per-sample loss)."""
    siglip: bool = False  # the contrastive loss is SigLIP's sigmoid loss (set by make_clip_loss)
    sigmoid_loss: bool = False  # whether the job trains with SigLIP's loss under --siglip (else it refuses it)

    def __init__(self, args: argparse.Namespace, dist_info):
        self.args = args
        self.dist = dist_info
        self.device = dist_info.device
        if getattr(args, "siglip", False) and not self.sigmoid_loss:
            jobs = sorted(name for name, job in available_jobs().items() if job.sigmoid_loss)
            raise UserError(f"--siglip: --job {self.name} does not train with the sigmoid loss (--job "
                            f"{' and --job '.join(jobs)} do)")

    # --- flags ------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this job's flags (use `add_argument_once` for flags another job may also define)."""

    # --- models -----------------------------------------------------------------------------------
    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None) -> nn.Module:
        """The trainable model. `resume_spec` is the checkpoint's model_spec when resuming (it may
        describe a changed architecture, e.g. after pruning surgery)."""
        raise NotImplementedError

    def resume_text_encoders(self) -> Iterable[str]:
        """Text-encoder names or files that this run's own flags name and a resumed checkpoint's spec may name
        too (compress.models.spec: a checkpoint never chooses what is loaded); none unless a job has a teacher."""
        return ()

    def data_transforms(self, model: nn.Module) -> Tuple[Callable, Callable]:
        """(image transform, tokenizer) for the training data; tokenizer None when the job reads only
        batch["caption"] (the batch then has no `text`)."""
        from compress.models.registry import get_tokenizer

        return train_preprocess(model, self.args), get_tokenizer(model.model_spec)

    def ddp_find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters without a gradient in a step (slower: a graph walk per
        step). True when some steps leave trainable parameters out of the loss, e.g. losses switched on
        and off by epoch; otherwise DDP waits for their gradients forever."""
        return False

    # --- step -------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def make_clip_loss(self, model: Optional[nn.Module] = None):
        """open_clip's contrastive loss over this run's ranks: its SigLipLoss (the sigmoid loss, text features
        passed between ranks as --loss-dist-impl says) with --siglip or for a `model` with a logit bias (a SigLIP
        config's init_logit_bias), else its ClipLoss distributed as --local-loss and --gather-with-grad ask.
        Sets `self.siglip`; `contrastive_loss` calls the loss either way. A job that passes no `model` trains
        with the softmax loss (and, without `sigmoid_loss`, has refused --siglip in __init__)."""
        from open_clip.loss import ClipLoss, SigLipLoss

        args = self.args
        self.siglip = model is not None and bool(getattr(args, "siglip", False)
                                                 or getattr(model, "logit_bias", None) is not None)
        if self.siglip:
            if getattr(model, "logit_bias", None) is None:
                raise UserError(f"--siglip: the {args.model} model has no logit bias to learn")
            return SigLipLoss(rank=self.dist.rank, world_size=self.dist.world_size, dist_impl=args.loss_dist_impl)
        return ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                        cache_labels=True, rank=self.dist.rank, world_size=self.dist.world_size)

    def contrastive_loss(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        """`self.clip_loss` (from make_clip_loss) of a CLIP's output dict: with its logit bias under SigLIP."""
        if self.siglip:
            return self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                  out["logit_bias"])
        return self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

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


# --- open_clip_train's model and preprocessing flags -------------------------------------------------------


def add_siglip_bias(model: nn.Module, args) -> None:
    """--siglip on an open_clip CLIP without a logit bias: give it one, as open_clip_train builds it
    (init_logit_bias −10; a randomly initialised model also starts at temperature 10), recorded in the spec's
    model_kwargs so the checkpoint rebuilds with it."""
    if not getattr(args, "siglip", False) or getattr(model, "logit_bias", None) is not None:
        return
    spec = model.model_spec
    if spec.get("kind") != "open_clip":
        raise UserError(f"--siglip: a {spec.get('kind')} model without a logit bias cannot be given one")
    kwargs = spec.setdefault("model_kwargs", {})
    kwargs["init_logit_bias"] = SIGLIP_INIT_LOGIT_BIAS
    parameter = model.logit_scale
    model.logit_bias = nn.Parameter(torch.full((), SIGLIP_INIT_LOGIT_BIAS, dtype=parameter.dtype,
                                               device=parameter.device))
    if not args.pretrained:
        kwargs["init_logit_scale"] = SIGLIP_INIT_LOGIT_SCALE
        with torch.no_grad():
            parameter.fill_(SIGLIP_INIT_LOGIT_SCALE)


def force_patch_dropout(model: nn.Module, args) -> None:
    """--force-patch-dropout P: the image tower drops fraction P of its patch tokens in training (FLIP; open_clip's
    PatchDropout, inactive in eval mode), recorded in an open_clip spec's model_kwargs as open_clip builds it."""
    fraction = getattr(args, "force_patch_dropout", None)
    if fraction is None:
        return
    from open_clip.transformer import PatchDropout

    visual = getattr(model, "visual", None)
    if not isinstance(getattr(visual, "patch_dropout", None), nn.Module):
        raise UserError(f"--force-patch-dropout: the image tower of {args.model} is not an open_clip ViT "
                        f"({type(visual).__name__}), which is what drops patches")
    visual.patch_dropout = PatchDropout(fraction) if fraction > 0 else nn.Identity()
    from compress.models.registry import input_spec

    spec = input_spec(model.model_spec)
    if spec.get("kind") == "open_clip":
        spec.setdefault("model_kwargs", {})["force_patch_dropout"] = fraction


def image_preprocess_overrides(args) -> Dict[str, Any]:
    """--image-mean/--image-std/--image-interpolation/--image-resize-mode as a spec's `preprocess` entries (a
    single mean or std value holds for every channel, as open_clip_train)."""
    overrides: Dict[str, Any] = {}
    for flag in ("image_mean", "image_std"):
        values = getattr(args, flag, None)
        if values is not None:
            overrides[flag[len("image_"):]] = list(values) * 3 if len(values) == 1 else list(values)
    for flag in ("image_interpolation", "image_resize_mode"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag[len("image_"):]] = value
    return overrides


def train_preprocess(model: nn.Module, args) -> Callable:
    """The training images' transform: the spec's preprocessing (open_clip's image_transform_v2) with the
    --image-* overrides, which are written into the spec so the checkpoint is scored and exported with them;
    open_clip's train transform with --aug-cfg given, else the eval transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from compress.models.registry import input_spec, preprocess_config, to_preprocess_cfg

    config = dict(preprocess_config(model.model_spec))
    overrides = image_preprocess_overrides(args)
    if overrides:
        config.update(overrides)
        input_spec(model.model_spec)["preprocess"] = config
    aug_cfg = getattr(args, "aug_cfg", None)
    augment = aug_cfg is not None
    try:
        return image_transform_v2(PreprocessCfg(**to_preprocess_cfg(config)), is_train=augment,
                                  aug_cfg=dict(aug_cfg) if augment else None)
    except (TypeError, ValueError, AssertionError) as error:
        raise UserError(f"--aug-cfg {aug_cfg}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


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
