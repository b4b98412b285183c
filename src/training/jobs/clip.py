"""`--job clip`: contrastive training of an open_clip CLIP (open_clip's ClipLoss semantics)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from compress.models.registry import build_model
from training.jobs import Job
from training.models import create_clip, lock_towers


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
        self.clip_loss = self.make_clip_loss()
        return model

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        out = model(batch["image"], batch["text"])
        loss = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        return {"loss": loss, "contrastive_loss": loss}
