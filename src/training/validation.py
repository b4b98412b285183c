"""--val-data / --val-frequency: open_clip_train's contrastive validation loss on a held-out set.

Every --val-frequency epochs (and after the last) rank 0 runs the model in eval mode over the held-out set, one
pass, each batch's contrastive loss computed on that batch alone (open_clip_train's `clip_val_loss`: its
ClipLoss or SigLipLoss on one process, whatever the run's ranks), and logs the sample-weighted mean as
val/contrastive_loss, with val/num_samples. The other ranks wait outside any collective (compute_on_master).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, Optional

import torch

from foundation.errors import UserError
from training.accel import autocast
from training.distributed import DistInfo, compute_on_master


def make_val_data(args, transform: Callable, tokenizer: Optional[Callable], job, dist_info: DistInfo) -> Any:
    """The held-out loader (rank 0's; None on the other ranks and without --val-data): --val-data read as
    --train-data is (its full batches, shuffled by --seed), without the token cache (rank 0 reads it alone)."""
    if not getattr(args, "val_data", None):
        return None
    if tokenizer is None or getattr(job, "clip_loss", None) is None:
        raise UserError(f"--val-data: --job {args.job} trains no contrastive loss of images and captions to "
                        f"validate")
    if not dist_info.is_master:
        return None
    from training.data import get_data

    val_args = copy.copy(args)
    val_args.train_data, val_args.dataset_type = args.val_data, "auto"
    val_args.train_num_samples = args.val_num_samples
    val_args.dataset_resampled, val_args.dataset_size, val_args.episode_size = False, None, 0
    val_args.no_token_cache = True
    return get_data(val_args, transform, tokenizer, rank=0, world_size=1, device=dist_info.device)


def validation_loss(model, data, job, precision: str, device: torch.device) -> Dict[str, float]:
    """Sample-weighted mean over the held-out batches of each batch's contrastive loss, in eval mode."""
    from open_clip.loss import ClipLoss, SigLipLoss

    loss = SigLipLoss() if job.siglip else ClipLoss()
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            data.set_epoch(0)
            for batch in data.batches():
                images = batch["image"].to(device)
                if precision == "bf16":
                    images = images.to(torch.bfloat16)
                with autocast(precision, device):
                    out = model(images, batch["text"].to(device))
                    extra = (out["logit_bias"],) if job.siglip else ()
                    value = loss(out["image_features"], out["text_features"], out["logit_scale"], *extra)
                total += value.float().item() * len(images)
                count += len(images)
    finally:
        model.train(was_training)
    return {"contrastive_loss": total / max(count, 1), "num_samples": count}


def validate_in_loop(ctx, job) -> None:
    """The validation loss after every --val-frequency-th epoch and the last, logged as val/*."""
    args = ctx.args
    if not getattr(args, "val_data", None) or ctx.stopped_by or not args.val_frequency:
        return
    if ctx.epoch % args.val_frequency and ctx.epoch != args.epochs:
        return

    def score() -> Dict[str, float]:
        metrics = validation_loss(ctx.unwrapped_model, ctx.val_data, job, args.precision, ctx.dist.device)
        ctx.log_scalars({f"val/{k}": v for k, v in metrics.items()})
        logging.info("validation at epoch %d: contrastive loss %.4f over %d samples", ctx.epoch,
                     metrics["contrastive_loss"], metrics["num_samples"])
        return metrics

    compute_on_master(score, f"validation at epoch {ctx.epoch}")
