"""`--job distill`: distil a frozen open_clip CLIP's image tower into a small student (casCLIP, CLIP-KD, TinyCLIP).

The trainable model is a `student_clip` (compress/models/students.py): student image tower + the teacher's text
tower (copied from the teacher and frozen, unless `--student-text` gives the student its own). Its
checkpoint rebuilds with `compress.load`, so the monitor and eval score it like any CLIP.

Losses (`--distill-loss`, comma-separated, each scaled by its `--<name>-weight`):
cosine and fd compare image embeddings only (no captions needed); icl, crd and affinity use the batch's
captions through the teacher's text tower (and the student's, when it has one).

SigLIP's sigmoid loss (`--siglip`, or by itself for a teacher with a logit bias: a SigLIP CLIP): the student gets
a learnable logit bias (the teacher's value, or open_clip_train's −10 at temperature 10 for a teacher without one),
icl is open_clip's SigLipLoss of student image ↔ teacher caption features across ranks (the shared
`Job.contrastive_loss`), and crd and affinity compare the two models' sigmoid pair logits
(compress.ops.distill_losses). cosine and fd are unchanged; `--siglip` with only those is refused.

On a reinforced set (`clipcompress reinforce`, training.data.reinforced: shards whose folder holds
reinforce.json) no teacher is built: each step trains on one of the K stored views of each image and reads the
teacher's embeddings of that view and of the caption from the shards; the student's text tower and temperature
come from the set's teacher_text.safetensors. `--teacher-model`/`--teacher-pretrained` may still be given, and
must then name the set's teacher; `--ignore-stored-embeddings` runs that teacher online on the same views.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from compress.models.backbones import open_clip_model_config
from compress.models.image_teachers import is_image_teacher_arch
from compress.models.pretrained import create_clip
from compress.models.registry import build_model, get_tokenizer
from compress.models.students import (
    copy_teacher_text_tower,
    default_inherited_layers,
    inherit_vit_from_teacher,
    load_text_tower,
    load_torchvision_weights,
    student_clip_spec,
    student_image_spec,
)
from compress.ops.distill_losses import LOSSES, DistillFeatures
from foundation.errors import UserError
from training.data.reinforced import Reinforcement, StoredViews, check_teacher, find_reinforcement
from training.jobs import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, Job, add_argument_once
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
    sigmoid_loss = True

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
        add_stored_embeddings_flag(group)
        add_recalibration_flag(group)

    # --- models -------------------------------------------------------------------------------------

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        args = self.args
        self.reinforcement, self.stored = stored_embeddings(args, "--teacher-model/--teacher-pretrained",
                                                            args.teacher_model, args.teacher_pretrained)
        if self.stored is None and not args.teacher_model:
            raise UserError("--job distill needs --teacher-model (and usually --teacher-pretrained), or shards "
                            "reinforced with a teacher (clipcompress reinforce)")
        if is_image_teacher_arch(args.teacher_model):
            raise UserError(f"--teacher-model {args.teacher_model}: --job distill distils an open_clip CLIP; an "
                            f"image teacher of a torchvision architecture is --job protorkd's")
        self.teacher_model = self.stored.teacher_name if self.stored is not None else args.teacher_model
        inheriting = args.inherit_from_teacher and resume_spec is None
        if self.stored is not None and inheriting and not args.teacher_pretrained:
            raise UserError("--inherit-from-teacher copies the teacher's weights into the student: give "
                            "--teacher-pretrained, the weights of the teacher the shards store the embeddings of")
        self.loss_names = parse_loss_names(args.distill_loss)
        self.needs_text = any(LOSSES[name].needs_text for name in self.loss_names)
        if args.siglip and not self.needs_text:
            raise UserError(f"--siglip: the sigmoid loss is a caption loss and --distill-loss {args.distill_loss} "
                            f"compares image features only; add icl, crd or affinity, or drop --siglip")
        if self.needs_text and args.allow_empty_captions:
            raise UserError("--allow-empty-captions keeps caption-less images, which only the image losses "
                            "(cosine, fd) can use; drop it or the caption losses")
        teacher = None
        if self.stored is None or inheriting:
            # with stored embeddings the teacher is only read to initialise an inheriting student. Its build
            # draws its random init (then overwritten) from a forked generator: the student's init is the same
            # whether a teacher was built or not, so a run on stored embeddings starts from the online run's student
            with torch.random.fork_rng(devices=[]):
                teacher = create_clip(self.teacher_model, args.teacher_pretrained)
            teacher.eval().requires_grad_(False)
        self.teacher = None
        if self.stored is None:
            # pure-bf16 runs feed bf16 images: the teacher must take them too
            self.teacher = teacher.to(self.device, torch.bfloat16 if args.precision == "bf16" else None)
            self.teacher_tokenizer = get_tokenizer(teacher.model_spec)
        self.teacher_logit_bias = self._teacher_logit_bias(teacher)

        if resume_spec is not None:
            model = build_model(resume_spec)
        else:
            model = self._new_student(teacher)
        self.student_has_text = args.student_text is not None
        self.same_tokenizer = model.model_spec["tokenizer_model"] == self.teacher_model
        # the temperature (and bias) only matter to the caption losses; a parameter without gradient would trip DDP
        model.logit_scale.requires_grad_(self.needs_text)
        if model.logit_bias is not None:
            model.logit_bias.requires_grad_(self.needs_text)
        self.clip_loss = self.make_clip_loss(model)  # sets self.siglip: --siglip, or a student with a logit bias
        relational = [name for name in self.loss_names if name in ("crd", "affinity")]
        if self.siglip and relational and self.teacher_logit_bias is None:
            reason = ("the reinforced set stores none (--ignore-stored-embeddings runs the teacher online)"
                      if self.stored is not None else f"the teacher {self.teacher_model} has none")
            raise UserError(f"--distill-loss {','.join(relational)} under the sigmoid loss compares the teacher's "
                            f"sigmoid pair logits, which need its logit bias: {reason}; use icl")
        model.text.requires_grad_(self.student_has_text and self.needs_text)
        if args.student_text is not None and not self.needs_text:
            raise UserError("--student-text trains a text tower, which needs a caption loss (icl, crd or affinity)")
        self.batchnorm = BatchNormRecalibration(args, self.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logging.info("distill: teacher %s, student %s (%d trainable parameters), losses %s",
                     self.teacher_model, args.student, trainable, ",".join(self.loss_names))
        return model

    def _teacher_logit_bias(self, teacher) -> Optional[torch.Tensor]:
        """The teacher's logit bias (0-d, on the device): a SigLIP teacher's; None for a teacher without one
        and for one read only from a reinforced set's stored embeddings (which hold no bias)."""
        if teacher is None or getattr(teacher, "logit_bias", None) is None:
            return None
        return teacher.logit_bias.detach().float().reshape(()).to(self.device)

    def _initial_logit_bias(self, teacher) -> Tuple[Optional[float], bool]:
        """(where a new student's logit bias starts, None for no bias; whether it is open_clip_train's fresh
        one). A SigLIP teacher gives its own, or the one its config starts from when only its stored embeddings
        are read; --siglip from a teacher without one: open_clip_train's −10 (at temperature 10, set by the
        caller)."""
        if self.teacher_logit_bias is not None:
            return float(self.teacher_logit_bias), False
        configured = open_clip_model_config(self.teacher_model).get("init_logit_bias") if teacher is None else None
        if configured is not None:
            return float(configured), False
        return (SIGLIP_INIT_LOGIT_BIAS, True) if self.args.siglip else (None, False)

    def _new_student(self, teacher):
        args = self.args
        try:
            image_spec = student_image_spec(args.student, self.teacher_model, args.student_image_size,
                                            args.student_width, args.student_layers, args.freeze_backbone)
            bias, fresh_bias = self._initial_logit_bias(teacher)
            spec = student_clip_spec(image_spec, self.teacher_model, args.student_text, init_logit_bias=bias)
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
            if args.student_text is None and self.stored is not None:
                load_text_tower(model, self.stored.text_tower())
            elif args.student_text is None:
                copy_teacher_text_tower(model, teacher)
        except (ValueError, FileNotFoundError) as error:
            raise UserError(str(error))
        if args.student_text is not None:
            scale = teacher.logit_scale.detach() if teacher is not None else torch.tensor(self.stored.logit_scale)
            with torch.no_grad():
                model.logit_scale.copy_(scale.reshape(()))
        if fresh_bias:  # the sigmoid loss from a softmax teacher: open_clip_train's starting temperature too
            with torch.no_grad():
                model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        return model

    def data_transforms(self, model):
        """On a reinforced set: its stored views (and, unless they are computed online, their embeddings)."""
        transform, tokenizer = super().data_transforms(model)
        if self.reinforcement is not None:
            transform = StoredViews(self.reinforcement, embeddings=self.stored is not None)
        return transform, tokenizer

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
            teacher_text = None
            if self.stored is not None:  # the shards' embeddings of this batch's views and captions
                teacher_image, teacher_text, teacher_scale = stored_features(batch, self.stored, images,
                                                                             self.needs_text)
            else:
                teacher_image = self.teacher.encode_image(images, normalize=True)
                teacher_scale = self.teacher.logit_scale.exp()
            if self.needs_text and self.stored is None:
                tokens = (batch["text"] if self.same_tokenizer
                          else self.teacher_tokenizer(batch["caption"]).to(images.device))
                teacher_text = self.teacher.encode_text(tokens, normalize=True)
        own_text = self.needs_text and self.student_has_text
        out = model(images, batch["text"] if own_text else None)
        sigmoid = {}
        if self.siglip:  # open_clip's SigLipLoss at the student's temperature and bias, across ranks
            def contrastive(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
                return self.contrastive_loss({"image_features": image, "text_features": text,
                                              "logit_scale": out["logit_scale"], "logit_bias": out["logit_bias"]})
            sigmoid = {"contrastive": contrastive, "logit_bias": out["logit_bias"],
                       "teacher_logit_bias": self.teacher_logit_bias}
        features = DistillFeatures(
            student_image=out["image_features"], teacher_image=teacher_image,
            # with the teacher's (frozen) text tower the student's text features *are* the teacher's
            student_text=out["text_features"] if own_text else teacher_text, teacher_text=teacher_text,
            logit_scale=out["logit_scale"], teacher_logit_scale=teacher_scale, student_has_text=own_text, **sigmoid)
        parts: Dict[str, torch.Tensor] = {
            f"{name}_loss": getattr(self.args, f"{name}_weight") * LOSSES[name].compute(features)
            for name in self.loss_names}
        total = sum(parts.values())
        with torch.no_grad():
            parts["teacher_cosine"] = F.cosine_similarity(features.student_image, teacher_image, dim=-1).mean()
        return {"loss": total, **parts}


# --- stored teacher embeddings (a reinforced set) ---------------------------------------------------------


def add_stored_embeddings_flag(group) -> None:
    add_argument_once(group, "--ignore-stored-embeddings", action="store_true",
                      help="on shards reinforced with a teacher (clipcompress reinforce): run the teacher online "
                           "on the same stored views instead of reading its stored embeddings")


def stored_embeddings(args, flags: str, teacher_model: Optional[str], teacher_pretrained: Optional[str]
                      ) -> Tuple[Optional[Reinforcement], Optional[Reinforcement]]:
    """(the reinforced set --train-data names, or None; the same when its stored embeddings are used, None when
    --ignore-stored-embeddings computes them online). The teacher `flags` name must be the set's (one line
    otherwise); the log says whose embeddings are used."""
    reinforcement = find_reinforcement(args.train_data)
    if reinforcement is None:
        if args.ignore_stored_embeddings:
            raise UserError(f"--ignore-stored-embeddings: --train-data {args.train_data} stores no teacher "
                            f"embeddings (no reinforce.json beside the shards); drop the flag")
        return None, None
    if args.ignore_stored_embeddings:
        logging.info("--ignore-stored-embeddings: the teacher runs online on the stored views of %s (which hold "
                     "the embeddings of %s)", reinforcement.folder, reinforcement.describe())
        return reinforcement, None
    check_teacher(reinforcement, teacher_model, teacher_pretrained, flags)
    logging.info("using stored teacher embeddings from %s (%s, %d view(s) per image)", reinforcement.describe(),
                 reinforcement.folder, reinforcement.views)
    return reinforcement, reinforcement


def stored_features(batch: Dict[str, Any], stored: Reinforcement, like: torch.Tensor, with_text: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(image, caption embeddings, normalised, on the device and in the dtype of `like`; exp of the teacher's
    temperature) of a batch read from a reinforced set: what the teacher's forward would give."""
    def normalised(name: str) -> torch.Tensor:
        return F.normalize(batch[name].to(like.device, torch.float32), dim=-1).to(like.dtype)

    scale = torch.tensor(stored.logit_scale, dtype=torch.float32, device=like.device).exp()
    return normalised("teacher_image"), normalised("teacher_text") if with_text else None, scale
