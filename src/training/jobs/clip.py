"""`--job clip`: contrastive training of an open_clip CLIP, with open_clip_train's losses: ClipLoss, or SigLipLoss
with --siglip and for SigLIP configs. Under --accum-freq N the loss of each micro-batch is computed against the
cached features of all N (training.train), as open_clip_train."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from compress.models.pretrained import create_clip
from compress.models.registry import build_model
from training.jobs import Job, add_siglip_bias, force_patch_dropout


class ClipJob(Job):
    name = "clip"
    help = "contrastive image-text training (CLIP / OpenCLIP)"
    caches_features = True

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--force-patch-dropout", type=float, default=None,
                           help="drop this fraction of image patches in training (FLIP, open_clip's PatchDropout; "
                                "an open_clip ViT image tower); 0 turns a config's own patch dropout off, e.g. to "
                                "fine-tune without it at the end. Eval never drops patches")

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        args = self.args
        if resume_spec is not None:
            model = build_model(resume_spec)
        else:
            model = create_clip(args.model, args.pretrained)
        model.output_dict = True
        add_siglip_bias(model, args)
        force_patch_dropout(model, args)
        lock_towers(model, args)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.clip_loss = self.make_clip_loss(model)
        return model

    def features(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return model(batch["image"], batch["text"])

    def features_loss(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        loss = self.contrastive_loss(out)
        return {"loss": loss, "contrastive_loss": loss}

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return self.features_loss(self.features(model, batch))


def lock_towers(model: nn.Module, args) -> None:
    """`--lock-image` / `--lock-text` freeze a tower (LiT). Works on a standard CLIP without extra flags:
    open_clip_train asserts there unless --lock-text-freeze-layer-norm is also given."""
    if getattr(args, "lock_image", False):
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if getattr(args, "lock_text", False):
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers, freeze_layer_norm=True)
