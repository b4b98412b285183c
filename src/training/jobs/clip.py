"""`--job clip`: contrastive training of an open_clip CLIP (open_clip's ClipLoss semantics)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from compress.models.pretrained import create_clip
from compress.models.registry import build_model
from training.jobs import Job


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


def lock_towers(model: nn.Module, args) -> None:
    """`--lock-image` / `--lock-text` freeze a tower (LiT). Works on a standard CLIP without extra flags:
    open_clip_train asserts there unless --lock-text-freeze-layer-norm is also given."""
    if getattr(args, "lock_image", False):
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if getattr(args, "lock_text", False):
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers, freeze_layer_norm=True)
