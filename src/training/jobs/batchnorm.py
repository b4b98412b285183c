"""BatchNorm students that work in eval mode: the jobs that train a BatchNorm image network (distill, and
ProtoRKD's image student) re-estimate its statistics on training images before each epoch checkpoint
(compress.ops.batchnorm explains why the running averages alone do not do).

The images: `--bn-recalibration-batches` batches of a fixed, seeded choice of training rows for a TSV/CSV
(read with the training transform through a loader of its own, which draws nothing from the trainer's random
streams, so an interrupted and resumed run writes the same checkpoint); for webdataset shards, which have no
rows to pick, the last batches the job trained on. Layers a frozen backbone keeps in eval mode are left
alone (their statistics are the pretrained ones training never touches). Only the running statistics change:
train-mode BatchNorm normalises with each batch's own statistics, so the training that follows is the same.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import Subset

from compress.ops.batchnorm import recalibrate_batchnorm, trained_batchnorms
from training.data.loaders import run_loader
from training.jobs import add_argument_once

# batches of --batch-size images: ~1000 images at the default 64, enough for stable per-channel moments
DEFAULT_BATCHES = 16


def add_recalibration_flag(group) -> None:
    add_argument_once(group, "--bn-recalibration-batches", type=int, default=DEFAULT_BATCHES,
                      help="batches of training images the student's BatchNorm statistics are re-estimated on "
                           "before each epoch checkpoint, so it works in eval mode (0: keep the running averages)")


class BatchNormRecalibration:
    """One per job: `observe` the training batches (only kept for sources without rows), `before_save` at each
    epoch end."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.batches = int(args.bn_recalibration_batches)
        if self.batches < 0:
            from foundation.errors import UserError

            raise UserError(f"--bn-recalibration-batches {self.batches}: must be at least 0")
        self.recent: Optional[collections.deque] = None
        self.active = False

    def on_train_start(self, ctx, model: nn.Module) -> None:
        self.active = self.batches > 0 and bool(trained_batchnorms(model))
        if self.active and getattr(ctx.data, "dataset", None) is None:
            self.recent = collections.deque(maxlen=self.batches)

    def observe(self, images: torch.Tensor) -> None:
        if self.recent is not None:
            self.recent.append(images.detach().cpu())

    def _training_batches(self, ctx) -> Iterable[torch.Tensor]:
        dataset = getattr(ctx.data, "dataset", None)
        if dataset is None:
            return list(self.recent or [])
        from training.data.samples import image_collator

        count = min(len(dataset), self.batches * self.args.batch_size)
        rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.args.seed))[:count]
        logging.info("re-estimating the student's BatchNorm statistics on %d training images", count)
        loader = run_loader(Subset(dataset, rows.tolist()), batch_size=self.args.batch_size, shuffle=False,
                            num_workers=self.args.workers, collate_fn=image_collator(dataset),
                            generator=torch.Generator())
        return (batch["image"] for batch in loader)

    def before_save(self, ctx, model: nn.Module, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.active:
            return
        dtype = next(model.parameters()).dtype
        used = recalibrate_batchnorm(model, self._training_batches(ctx),
                                     lambda images: encode(images.to(self.device, dtype)))
        logging.info("BatchNorm statistics of the student re-estimated on %d batches of training images", used)
