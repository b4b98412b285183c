"""`--job clip`: contrastive training of an open_clip CLIP, with open_clip_train's losses: ClipLoss, or SigLipLoss
with --siglip and for SigLIP configs, DistillClipLoss with --distill-model/--distill-pretrained (a frozen CLIP
teacher's softmax similarities as extra targets, both towers). Under --accum-freq N the loss of each micro-batch
is computed against the cached features of all N (training.train), as open_clip_train, the teacher's included."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from compress.models.pretrained import create_clip
from compress.models.registry import build_model
from foundation.errors import UserError
from training.jobs import Job, add_siglip_bias, force_patch_dropout


class ClipJob(Job):
    name = "clip"
    help = "contrastive image-text training (CLIP / OpenCLIP)"
    caches_features = True
    sigmoid_loss = True
    teacher = None  # --distill-model's frozen CLIP (build_model)

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--force-patch-dropout", type=float, default=None,
                           help="drop this fraction of image patches in training (FLIP, open_clip's PatchDropout; "
                                "an open_clip ViT image tower); 0 turns a config's own patch dropout off, e.g. to "
                                "fine-tune without it at the end. Eval never drops patches")
        group.add_argument("--distill-model", default=None,
                           help="open_clip_train's CLIP-to-CLIP distillation: the teacher's open_clip config (with "
                                "--distill-pretrained); open_clip's DistillClipLoss adds the soft cross-entropy of "
                                "the student's image-text logits against the teacher's to the contrastive loss. The "
                                "teacher reads the student's images and tokens: same tokenizer and preprocessing")
        group.add_argument("--distill-pretrained", default=None,
                           help="the --distill-model teacher's weights (a file, or an open_clip tag when online)")

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
        self.teacher = self._distill_teacher(model)
        return model

    def _distill_teacher(self, model):
        """--distill-model/--distill-pretrained: the frozen teacher, with open_clip's DistillClipLoss in place
        of the contrastive loss (both flags or neither, as open_clip_train distils only with both)."""
        from open_clip.loss import DistillClipLoss

        args = self.args
        if args.distill_model is None and args.distill_pretrained is None:
            return None
        if args.distill_model is None or args.distill_pretrained is None:
            raise UserError("--distill-model and --distill-pretrained come together: the teacher's config and its "
                            "weights")
        if self.siglip:
            raise UserError("--distill-model: open_clip's DistillClipLoss is a softmax loss; it does not combine "
                            "with the sigmoid loss (--siglip, a SigLIP model)")
        teacher = create_clip(args.distill_model, args.distill_pretrained).to(self.device).eval()
        if args.precision == "bf16":  # pure-bf16 runs feed bf16 images
            teacher = teacher.to(torch.bfloat16)
        teacher.requires_grad_(False)
        teacher.output_dict = True
        if teacher.context_length != model.context_length or teacher.vocab_size != model.vocab_size:
            raise UserError(f"--distill-model {args.distill_model}: its tokens ({teacher.vocab_size} words, "
                            f"{teacher.context_length} long) are not the student's ({model.vocab_size}, "
                            f"{model.context_length}); the teacher reads the student's tokens")
        self.clip_loss = DistillClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                         cache_labels=True, rank=self.dist.rank, world_size=self.dist.world_size)
        return teacher

    def features(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        out = model(batch["image"], batch["text"])
        if self.teacher is not None:  # open_clip_train's names for the teacher's outputs
            with torch.no_grad():
                teacher = self.teacher(batch["image"], batch["text"])
            out = {**out, "dist_image_features": teacher["image_features"],
                   "dist_text_features": teacher["text_features"], "dist_logit_scale": teacher["logit_scale"]}
        return out

    def features_loss(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.teacher is not None:
            losses = self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                                    out["dist_image_features"], out["dist_text_features"], out["dist_logit_scale"],
                                    output_dict=True)
            return {"loss": losses["contrastive_loss"] + losses["distill_loss"], **losses}
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
