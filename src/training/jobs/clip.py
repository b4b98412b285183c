"""`--job clip`: contrastive training of an open_clip CLIP (open_clip's ClipLoss semantics)."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from open_clip.loss import ClipLoss

from compress.models.registry import build_model, open_clip_spec
from training.jobs import Job
from training.models import create_clip, lock_towers

# open_clip clamps the learnable temperature at 100 (CLIP paper)
MAX_LOGIT_SCALE = math.log(100)


class ClipJob(Job):
    name = "clip"
    help = "contrastive image-text training (CLIP / OpenCLIP)"

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        args = self.args
        if resume_spec is not None:
            model = build_model(resume_spec)
        else:
            model = create_clip(args.model, args.pretrained)
        model.output_dict = True
        lock_towers(model, args)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.clip_loss = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                  cache_labels=True, rank=self.dist.rank, world_size=self.dist.world_size)
        return model

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        out = model(batch["image"], batch["text"])
        loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        return {"loss": loss, "contrastive_loss": loss}

    def on_step_end(self, ctx) -> None:
        with torch.no_grad():
            ctx.unwrapped_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
