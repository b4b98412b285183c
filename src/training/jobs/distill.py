"""`--job distill`: distil a frozen open_clip CLIP's image tower into a small student (casCLIP, CLIP-KD, TinyCLIP).

The trainable model is a `student_clip` (compress/models/students.py): student image tower + the teacher's text
tower (copied from the teacher and frozen, unless `--student-text` gives the student its own). Its
checkpoint rebuilds with `compress.load`, so the monitor and eval score it like any CLIP.

Losses (`--distill-loss`, comma-separated, each scaled by its `--<name>-weight`):
cosine and fd compare image embeddings only (no captions needed); icl, crd and affinity use the batch's
captions through the teacher's text tower (and the student's, when it has one).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from compress.models.image_teachers import is_image_teacher_arch
from compress.models.pretrained import create_clip
from compress.models.registry import build_model, get_tokenizer
from compress.models.students import (
    copy_teacher_text_tower,
    default_inherited_layers,
    inherit_vit_from_teacher,
    load_torchvision_weights,
    student_clip_spec,
    student_image_spec,
)
from compress.ops.distill_losses import LOSSES, DistillFeatures
from foundation.errors import UserError
from training.jobs import Job, add_argument_once
from training.jobs.batchnorm import BatchNormRecalibration, add_recalibration_flag


def parse_loss_names(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        raise UserError(f"--distill-loss {text!r}: choose from {', '.join(LOSSES)} (comma-separated)")
    return names


class DistillJob(Job):
    name = "distill"
    help = "distil a frozen open_clip CLIP's image tower into a small student (cosine/FD/CRD/ICL/affinity)"

    @staticmethod
    def add_arguments(group) -> None:
        add_argument_once(group, "--teacher-model", default=None,
                          help="teacher: open_clip model config name (frozen); --job protorkd also takes a "
                               "torchvision architecture (resnet50, ...) or SwAV's resnet50w2/w4/w5 with a "
                               "self-supervised checkpoint as --teacher-pretrained: an image teacher")
        add_argument_once(group, "--teacher-pretrained", default=None,
                          help="teacher weights: a local file (one of our clip-job checkpoints works), "
                               "hf:DIR (a local Hugging Face CLIPModel folder) or an open_clip tag")
        add_argument_once(group, "--student", default="mobilenet_v3_small",
                          help="student image tower: a torchvision architecture (mobilenet_v3_small, resnet18, …), "
                               "an open_clip ViT config name, or 'teacher' (the teacher's ViT config, to shrink "
                               "with --student-width/--student-layers)")
        add_argument_once(group, "--student-pretrained", default=None,
                          help="local weights for a torchvision student's backbone: torchvision's state dict or a "
                               "MoCo/SimCLR/SwAV checkpoint (prefixes stripped, heads and queues left out)")
        group.add_argument("--student-image-size", type=int, default=None,
                           help="side the student sees (it resizes the teacher's preprocessed images); "
                                "default: the teacher's (ViT students: their config's)")
        group.add_argument("--student-width", type=int, default=None, help="width of an open_clip ViT student")
        group.add_argument("--student-layers", type=int, default=None, help="depth of an open_clip ViT student")
        group.add_argument("--student-text", default=None,
                           help="give the student its own trainable text tower of this open_clip config "
                                "(default: the teacher's text tower, frozen)")
        group.add_argument("--freeze-backbone", action="store_true",
                           help="train only the student's projection head (casCLIP's setting)")
        group.add_argument("--inherit-from-teacher", action="store_true",
                           help="initialise an open_clip ViT student from the teacher's image tower (TinyCLIP "
                                "manual inheritance: chosen layers, leading heads and dims)")
        group.add_argument("--inherit-layers", default=None,
                           help="comma-separated teacher layer indices the student's blocks inherit "
                                "(default: every (teacher/student)-th layer)")
        group.add_argument("--distill-loss", default="cosine",
                           help=f"comma-separated losses from {', '.join(LOSSES)}")
        for loss_name, entry in LOSSES.items():
            group.add_argument(f"--{loss_name}-weight", type=float, default=entry.default_weight,
                               help=f"weight of the {loss_name} loss")
        add_recalibration_flag(group)

    # --- models -------------------------------------------------------------------------------------

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        args = self.args
        if not args.teacher_model:
            raise UserError("--job distill needs --teacher-model (and usually --teacher-pretrained)")
        if is_image_teacher_arch(args.teacher_model):
            raise UserError(f"--teacher-model {args.teacher_model}: --job distill distils an open_clip CLIP; an "
                            f"image teacher of a torchvision architecture is --job protorkd's")
        self.loss_names = parse_loss_names(args.distill_loss)
        self.needs_text = any(LOSSES[name].needs_text for name in self.loss_names)
        if self.needs_text and args.allow_empty_captions:
            raise UserError("--allow-empty-captions keeps caption-less images, which only the image losses "
                            "(cosine, fd) can use; drop it or the caption losses")
        teacher = create_clip(args.teacher_model, args.teacher_pretrained)
        teacher.eval().requires_grad_(False)
        # pure-bf16 runs feed bf16 images: the teacher must take them too
        self.teacher = teacher.to(self.device, torch.bfloat16 if args.precision == "bf16" else None)
        self.teacher_tokenizer = get_tokenizer(teacher.model_spec)

        if resume_spec is not None:
            model = build_model(resume_spec)
        else:
            model = self._new_student(teacher)
        self.student_has_text = args.student_text is not None
        self.same_tokenizer = model.model_spec["tokenizer_model"] == args.teacher_model
        # the temperature only matters to the caption losses; a parameter without gradient would trip DDP
        model.logit_scale.requires_grad_(self.needs_text)
        model.text.requires_grad_(self.student_has_text and self.needs_text)
        if args.student_text is not None and not self.needs_text:
            raise UserError("--student-text trains a text tower, which needs a caption loss (icl, crd or affinity)")
        self.batchnorm = BatchNormRecalibration(args, self.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logging.info("distill: teacher %s, student %s (%d trainable parameters), losses %s",
                     args.teacher_model, args.student, trainable, ",".join(self.loss_names))
        return model

    def _new_student(self, teacher):
        args = self.args
        try:
            image_spec = student_image_spec(args.student, args.teacher_model, args.student_image_size,
                                            args.student_width, args.student_layers, args.freeze_backbone)
            spec = student_clip_spec(image_spec, args.teacher_model, args.student_text)
            model = build_model(spec)
            if args.student_pretrained:
                logging.info("student backbone from --student-pretrained: %s",
                             load_torchvision_weights(model.visual, args.student_pretrained))
            if args.inherit_from_teacher:
                if image_spec["type"] != "open_clip_vit":
                    raise ValueError("--inherit-from-teacher needs an open_clip ViT student (e.g. --student teacher "
                                     "--student-layers 1 --student-width 64)")
                student_layers = len(model.visual.net.transformer.resblocks)
                layers = ([int(i) for i in args.inherit_layers.split(",")] if args.inherit_layers
                          else default_inherited_layers(len(teacher.visual.transformer.resblocks), student_layers))
                inherit_vit_from_teacher(model.visual.net, teacher.visual, layers)
                logging.info("student ViT inherits teacher layers %s", layers)
        except (ValueError, FileNotFoundError) as error:
            raise UserError(str(error))
        if args.student_text is None:
            copy_teacher_text_tower(model, teacher)
        else:
            with torch.no_grad():
                model.logit_scale.copy_(teacher.logit_scale.detach().reshape(()))
        return model

    # --- run ----------------------------------------------------------------------------------------

    def on_train_start(self, ctx) -> None:
        self.batchnorm.on_train_start(ctx, ctx.unwrapped_model)

    def on_epoch_end(self, epoch: int, ctx) -> None:
        # the epoch checkpoint follows: a BatchNorm student must work in eval mode, where scoring uses it
        model = ctx.unwrapped_model
        self.batchnorm.before_save(ctx, model, model.encode_image)

    # --- step ---------------------------------------------------------------------------------------

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        images = batch["image"]
        self.batchnorm.observe(images)
        with torch.no_grad():
            teacher_image = self.teacher.encode_image(images, normalize=True)
            teacher_scale = self.teacher.logit_scale.exp()
            teacher_text = None
            if self.needs_text:
                tokens = (batch["text"] if self.same_tokenizer
                          else self.teacher_tokenizer(batch["caption"]).to(images.device))
                teacher_text = self.teacher.encode_text(tokens, normalize=True)
        own_text = self.needs_text and self.student_has_text
        out = model(images, batch["text"] if own_text else None)
        features = DistillFeatures(
            student_image=out["image_features"], teacher_image=teacher_image,
            # with the teacher's (frozen) text tower the student's text features *are* the teacher's
            student_text=out["text_features"] if own_text else teacher_text, teacher_text=teacher_text,
            logit_scale=out["logit_scale"], teacher_logit_scale=teacher_scale, student_has_text=own_text)
        parts: Dict[str, torch.Tensor] = {
            f"{name}_loss": getattr(self.args, f"{name}_weight") * LOSSES[name].compute(features)
            for name in self.loss_names}
        total = sum(parts.values())
        with torch.no_grad():
            parts["teacher_cosine"] = F.cosine_similarity(features.student_image, teacher_image, dim=-1).mean()
        return {"loss": total, **parts}
