"""`--job protorkd`: distil a frozen text teacher into an image student, with episodic training (ProtoRKD /
ProtoCLIP).

Student: an image backbone (open_clip config's image tower, or a torchvision architecture) + projection
head (compress/models/text_students.py). Teacher: a frozen sentence-transformers model (`--pretrained-text`,
default all-MiniLM-L6-v2, bundled offline) or an open_clip CLIP's text tower (`--teacher-model`), of any family:
the CLIP's own tokenizer and text tower (compress.models.text_students.FrozenTextEncoder: a CustomTextCLIP's `text.`,
CoCa's, SigLIP's with its Hugging Face tokenizer). The teacher's caption embeddings are computed once per corpus
(training/row_cache.py) and looked up by the batch's row index.

Losses (`--distiller`, comma list): mse (SimReg), rkd (distance + angle), infonce (student image ↔
teacher text, learnable temperature), proto (ProtoCLIP: InfoNCE + prototype losses against per-episode
k-means prototypes of the teacher embeddings, optionally back-translated into the image space, plus
external-teacher prototypes). The losses live in compress/ops/distill_losses.py, the clustering in
training/proto.py.

Episodes: each epoch is an episode of `--episode-size` row indices drawn with replacement from the first
`--dataset-size` rows (`--episode-size 0`: every row once, shuffled). The mapping is a pure function of
(seed, epoch) (`training.data.csv_dataset.episode_indices`, the one the trainer's sampler walks): every rank computes
it, and a resume recomputes it, so it is neither sent nor saved. Rank 0 clusters; the prototypes and
labels reach the other ranks through torch.distributed (no files) and are saved in the checkpoint's
job_state, so a resume continues the episode with the same prototypes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

from compress.ops import distill_losses
from foundation.dependencies import FAISS_INSTALL, require
from foundation.errors import CheckpointRefused, UserError
from foundation.progress import Progress
from training import proto
from training.accel import autocast, autocast_dtype
from training.data.loaders import run_loader
from training.distributed import compute_on_master, is_distributed
from training.jobs import Job, add_argument_once
from training.jobs.batchnorm import BatchNormRecalibration, add_recalibration_flag

DISTILLERS = ("mse", "rkd", "infonce", "proto")

# the loss weights: (flag, default, what it weighs)
LOSS_WEIGHTS = (
    ("--w-simreg", 1.0, "the mse (SimReg) loss"),
    ("--w-rkd-d", 0.5, "the RKD distance term"),
    ("--w-rkd-a", 1.0, "the RKD angle term (0 skips its O(B³) cost)"),
    ("--w-clip", 1.0, "InfoNCE (infonce and proto)"),
    ("--w-proto", 1.0, "the prototype loss"),
    ("--w-proto-external", 0.0, "the external-prototype loss"),
)


class ProtoRKDJob(Job):
    name = "protorkd"
    help = "distil a frozen text teacher into an image student (SimReg/RKD/InfoNCE/ProtoCLIP), episodic"
    temperatures = ("logit_scale", "logit_scale_proto")

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--distiller", default="mse",
                           help=f"comma list of losses: {', '.join(DISTILLERS)} "
                                "(proto = ProtoCLIP: InfoNCE + prototypes)")
        group.add_argument("--pretrained-text", default="all-MiniLM-L6-v2",
                           help="frozen sentence-transformers teacher: a name in your cache or a local folder "
                                "(all-MiniLM-L6-v2 resolves offline to the bundled copy)")
        add_argument_once(group, "--teacher-model", default=None,
                          help="use this open_clip CLIP's text tower as the teacher instead of --pretrained-text; "
                               "a torchvision architecture (resnet50, ...) or resnet50w2/w4/w5 is an image teacher")
        add_argument_once(group, "--teacher-pretrained", default=None,
                          help="weights of --teacher-model (a local file or an open_clip tag; an image teacher: a "
                               "MoCo/SimCLR/SwAV checkpoint or torchvision state dict)")
        group.add_argument("--teacher-features", default="pooled", choices=["pooled", "head"],
                           help="an image teacher's features: its pooled backbone output, or the checkpoint's "
                                "projection MLP on it (MoCo v2 fc, SwAV projection_head)")
        group.add_argument("--teacher-image-size", type=int, default=224,
                           help="an image teacher's input side (its eval transform: resize to 256/224 of it, centre "
                                "crop, ImageNet mean/std)")
        group.add_argument("--teacher-cache-dir", default=None,
                           help="where the teacher-embedding memmap lives (default: <logs>/<name>/cache)")
        group.add_argument("--teacher-batch-size", type=int, default=256, help="captions per teacher forward")
        group.add_argument("--stored-embeddings", default=None,
                           help="a folder reinforced from this --train-data with the --teacher-model/"
                                "--teacher-pretrained CLIP (clipcompress reinforce): the teacher cache takes its "
                                "stored caption embeddings by row (the samples' idx); the teacher embeds only the "
                                "rows it lacks")
        group.add_argument("--add-projection-head", action="store_true",
                           help="put a Linear-BN-ReLU projection head on the image backbone")
        group.add_argument("--projection-dim", type=int, default=None,
                           help="student output width (default: the teacher's width)")
        group.add_argument("--projection-hidden-dim", type=int, default=2048, help="hidden width of the head")
        group.add_argument("--projection-n-layers", type=int, default=1,
                           help="Linear-BN-ReLU blocks before the head's last Linear (0: one Linear)")
        add_argument_once(group, "--force-image-size", type=int, default=None,
                          help="student input size (torchvision default 224; open_clip: its config)")
        group.add_argument("--clustering-frequency", type=int, default=1, help="re-cluster every N episodes")
        group.add_argument("--k", type=int, default=20000, help="k-means clusters (prototypes) per episode")
        group.add_argument("--kmeans-max-iter", type=int, default=20, help="k-means iterations")
        group.add_argument("--kmeans-nredo", type=int, default=1, help="k-means restarts (best kept)")
        group.add_argument("--kmeans-max-points-per-centroid", type=int,
                           default=proto.DEFAULT_MAX_POINTS_PER_CENTROID,
                           help="k-means trains on at most this many sampled points per cluster (faiss's default, "
                                "as ProtoCLIP's faiss.Kmeans); every episode row is then labelled by its nearest "
                                "centroid")
        group.add_argument("--PBT", action="store_true",
                           help="Prototypical Back Translation: image-space prototypes = "
                                "mean image feature per teacher cluster")
        group.add_argument("--target-temperature", type=float, default=-1.0,
                           help="soft proto targets softmax(C[y]Cᵀ/T); -1: hard labels")
        group.add_argument("--external-teacher", default=None,
                           help=".npy of per-row embeddings (rows = TSV rows) whose clusters give the external "
                                "prototypes (default: the teacher's embeddings)")
        for flag, default, weighed in LOSS_WEIGHTS:
            group.add_argument(flag, type=float, default=default, help=f"weight of {weighed}")
        group.add_argument("--infonce-warmup-epoch", type=int, default=0,
                           help="proto: InfoNCE only for the first N episodes")
        group.add_argument("--lit-start-epoch", type=int, default=-1,
                           help="from this episode on, freeze the backbone and train the head "
                                "with InfoNCE only (-1: never)")
        add_recalibration_flag(group)

    def __init__(self, args, dist_info):
        super().__init__(args, dist_info)
        self.distillers = [d.strip() for d in args.distiller.split(",") if d.strip()]
        unknown = [d for d in self.distillers if d not in DISTILLERS]
        if unknown or not self.distillers:
            raise UserError(f"--distiller {args.distiller!r}: choose a comma list of {', '.join(DISTILLERS)}")
        self.uses_infonce = "infonce" in self.distillers or "proto" in self.distillers
        self.uses_proto = "proto" in self.distillers
        if self.uses_proto:  # faiss k-means: checked before the teacher embeds every caption
            require("--distiller proto (k-means prototypes)", ["faiss"], FAISS_INSTALL)
        if args.lit_start_epoch >= 0 and not self.uses_infonce:
            raise UserError("--lit-start-epoch trains the head with InfoNCE only: "
                            "add infonce (or proto) to --distiller")
        self.uses_external = self.uses_proto and args.w_proto_external > 0
        # episode state (all ranks hold the same values; saved in job_state, except the mapping, which
        # every rank recomputes from (seed, episode))
        self.episode = -1
        self.mapping: Optional[torch.Tensor] = None
        self.prototypes: Dict[str, torch.Tensor] = {}
        self.clustered_episode = -1
        self.teacher_features = None
        self.external_features = None
        self.label_of_row: Dict[str, torch.Tensor] = {}

    # --- models ---------------------------------------------------------------------------------------

    def uses_image_teacher(self) -> bool:
        from compress.models.image_teachers import is_image_teacher_arch

        return is_image_teacher_arch(self.args.teacher_model)

    def text_encoder_spec(self) -> Optional[Dict[str, Any]]:
        """The student's text side: the text teacher's spec; None under an image teacher (no text side)."""
        args = self.args
        if args.teacher_model:
            if not args.teacher_pretrained:
                raise UserError(f"--teacher-model {args.teacher_model} needs --teacher-pretrained (a weights file"
                                f"{'' if self.uses_image_teacher() else ' or tag'}): a randomly initialised "
                                f"teacher teaches nothing")
            if self.uses_image_teacher():
                return None
            return {"type": "open_clip", "model": args.teacher_model, "pretrained": args.teacher_pretrained}
        return {"type": "sentence_transformers", "name": args.pretrained_text}

    @staticmethod
    def allowed_text_encoders(text_spec: Optional[Dict[str, Any]]) -> List[str]:
        """The teacher this run's own flags name: the one a resumed spec may name too."""
        return [value for value in (text_spec.get("name"), text_spec.get("pretrained")) if value] if text_spec else []

    def resume_text_encoders(self) -> List[str]:
        return self.allowed_text_encoders(self.text_encoder_spec())

    def build_teacher(self, text_spec: Optional[Dict[str, Any]]):
        """The frozen teacher of this run's flags: a text encoder, or an image network (MoCo/SimCLR/SwAV...)."""
        from compress.models.image_teachers import FrozenImageTeacher
        from compress.models.text_students import FrozenTextEncoder

        args = self.args
        try:
            if text_spec is None:
                teacher = FrozenImageTeacher(args.teacher_model, args.teacher_pretrained, args.teacher_features,
                                             args.teacher_image_size)
                logging.info("image teacher %s from %s: %s", args.teacher_model, args.teacher_pretrained,
                             teacher.description)
                return teacher
            return FrozenTextEncoder(text_spec)
        except Exception as error:
            # a weights file that is no checkpoint (UnpicklingError, IndexError), one of another architecture
            # (RuntimeError, open_clip's AssertionError), a missing model (OSError): one line, no traceback
            reason = str(error).splitlines()[0][:300] if str(error) else ""
            what = f"image teacher {args.teacher_model}" if text_spec is None else f"text teacher {text_spec}"
            raise UserError(f"cannot load the {what} ({type(error).__name__}: {reason})")

    def build_model(self, resume_spec: Optional[Dict[str, Any]] = None):
        from compress.models.spec import validate_spec
        from compress.models.text_students import ImageStudent, image_student_spec

        args = self.args
        # the teacher always comes from this run's flags, never from a name or path written in the checkpoint
        text_spec = self.text_encoder_spec()
        if resume_spec is not None and resume_spec.get("text_encoder") != text_spec:
            raise UserError(f"the checkpoint's student was distilled from {resume_spec.get('text_encoder')}, not "
                            f"{text_spec}: resume with the same --pretrained-text / --teacher-model flags")
        teacher = self.build_teacher(text_spec)
        if resume_spec is None:
            embed_dim = args.projection_dim or teacher.dim
            try:
                spec = image_student_spec(args.model, text_spec, embed_dim, args.add_projection_head,
                                          args.projection_hidden_dim, args.projection_n_layers,
                                          image_size=args.force_image_size[0] if isinstance(args.force_image_size, list)
                                          else args.force_image_size)
            except ValueError as error:
                raise UserError(str(error))
        else:  # the student is built here, not by build_model: validate the checkpoint's spec the same way
            spec = validate_spec(resume_spec, allowed_text_encoders=self.allowed_text_encoders(text_spec))
        needs_same_width = [d for d in self.distillers if d in ("mse", "infonce", "proto")]
        if needs_same_width and spec["embed_dim"] != teacher.dim:
            raise UserError(f"--distiller {','.join(needs_same_width)} compares student and teacher features: "
                            f"--projection-dim {spec['embed_dim']} must equal the teacher's width {teacher.dim} "
                            f"(or use rkd alone)")
        model = ImageStudent(spec, text_encoder=teacher if text_spec is not None else None)
        model.model_spec = spec
        if resume_spec is None and args.pretrained:
            self.load_pretrained_backbone(model)
        # temperatures train only when a loss uses them (an unused parameter would stall DDP)
        model.logit_scale.requires_grad_(self.uses_infonce)
        model.logit_scale_proto.requires_grad_(self.uses_proto)
        self.teacher = teacher
        self.clip_loss = self.make_clip_loss()
        self.batchnorm = BatchNormRecalibration(args, self.device)
        return model

    def load_pretrained_backbone(self, model) -> None:
        """--pretrained FILE: the student's backbone from a torchvision weights file, a self-supervised
        checkpoint or one of our checkpoints (an image_student's or a CLIP's `visual.*`); the head keeps its
        fresh init. A resume takes the weights from the checkpoint instead."""
        from compress.models.backbones import load_backbone_weights

        path = self.args.pretrained
        if not os.path.isfile(path):
            raise UserError(f"--pretrained {path}: --job protorkd takes a local weights file for the student's "
                            f"backbone (torchvision's, a MoCo/SimCLR/SwAV checkpoint, or one of our checkpoints)")
        try:
            fitted = load_backbone_weights(model.visual, path, f"--pretrained ({self.args.model})")
        except ValueError as error:
            raise UserError(str(error))
        logging.info("student backbone from --pretrained %s: %s", path, fitted.describe())

    def ddp_find_unused_parameters(self) -> bool:
        # losses switched on/off by episode (warm-up, LiT) leave parameters without gradient in some steps
        return self.uses_proto or self.args.lit_start_epoch >= 0

    def data_transforms(self, model):
        from compress.models.registry import get_preprocess

        # the teacher reads captions (batch["caption"]) and its embeddings are cached: no tokens needed
        return get_preprocess(model.model_spec), None

    # --- run start: teacher cache ---------------------------------------------------------------------

    def on_train_start(self, ctx) -> None:
        from training.row_cache import cache_key, load_or_build_row_cache

        args = self.args
        dataset = ctx.data.dataset
        if not hasattr(dataset, "captions"):
            raise UserError("--job protorkd reads its captions from a TSV/CSV --train-data (row index = "
                            "teacher-cache key); webdataset shards and synthetic data are not supported")
        num_rows = len(dataset)  # the trainer already cut the table to --dataset-size rows
        self.dataset_size = num_rows
        self.episode_size = args.episode_size or self.dataset_size
        self.batchnorm.on_train_start(ctx, ctx.unwrapped_model)
        if self.uses_proto and args.k > self.episode_size:
            raise UserError(f"--k {args.k} prototypes need at least as many episode samples; the episode has "
                            f"{self.episode_size} (lower --k)")
        if self.uses_external and args.external_teacher:  # read before the teacher's pass over every row
            try:
                self.external_features = np.load(args.external_teacher, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise UserError(f"--external-teacher {args.external_teacher}: cannot read it as .npy ({error})")
            if self.external_features.ndim != 2 or len(self.external_features) < self.dataset_size:
                raise UserError(f"--external-teacher {args.external_teacher} has shape "
                                f"{self.external_features.shape}; need (rows >= {self.dataset_size}, dim)")

        cache_dir = args.teacher_cache_dir or Path(args.logs) / args.name / "cache"
        # the cache is built under the run's autocast, like the training steps; features so computed differ
        # from fp32 ones in their last bits, so the autocast dtype is part of what the cache is keyed on
        dtype = autocast_dtype(args.precision, self.device)
        key = cache_key(self.teacher.spec if dtype is None else {**self.teacher.spec, "autocast": str(dtype)},
                        args.train_data, num_rows)
        self.teacher.to(self.device)
        stored = None
        if self.uses_image_teacher():  # the teacher embeds each row's image (its eval transform) instead
            encode, rows = TeacherImageRows(dataset, self.teacher, args, self.dist).encode, range(num_rows)
        elif args.stored_embeddings:
            stored = StoredTeacherRows(self.stored_embeddings(), dataset.captions, self.teacher,
                                       args.teacher_batch_size)
            encode, rows = stored.encode, range(num_rows)
            key = cache_key({**self.teacher.spec, "autocast": str(dtype), "stored": stored.identity()},
                            args.train_data, num_rows)
        else:
            encode, rows = (lambda texts: self.teacher.encode(texts, batch_size=args.teacher_batch_size),
                            dataset.captions)
        with autocast(args.precision, self.device):
            self.teacher_features = load_or_build_row_cache(
                encode, rows, self.teacher.dim, cache_dir, key, batch_size=args.teacher_batch_size,
                device=self.device, show_progress=self.dist.is_master and args.log_level != "warning",
                local_rank=self.dist.local_rank)
        if stored is not None:
            stored.report()
        if self.uses_external and not args.external_teacher:
            self.external_features = self.teacher_features

    def stored_embeddings(self):
        """--stored-embeddings, checked: a complete reinforced set whose teacher is this run's CLIP teacher."""
        from training.data.reinforced import check_teacher, read_reinforcement

        args = self.args
        if not args.teacher_model or self.uses_image_teacher():
            raise UserError("--stored-embeddings holds an open_clip CLIP's caption embeddings: the teacher must be "
                            "that CLIP (--teacher-model and --teacher-pretrained)")
        reinforcement = read_reinforcement(args.stored_embeddings)
        if not reinforcement.header["complete"]:
            raise UserError(f"--stored-embeddings {args.stored_embeddings} is an unfinished reinforced set: run its "
                            f"clipcompress reinforce command again to complete it")
        check_teacher(reinforcement, args.teacher_model, args.teacher_pretrained)
        if reinforcement.embed_dim != self.teacher.dim:
            raise UserError(f"--stored-embeddings {args.stored_embeddings} holds {reinforcement.embed_dim}-wide "
                            f"embeddings; the teacher's are {self.teacher.dim} wide")
        return reinforcement

    # --- episodes -------------------------------------------------------------------------------------

    def episode_indices(self, episode: int, ctx) -> torch.Tensor:
        """Row indices of `episode`, as the trainer's sampler walks them: a pure function of seed and
        episode (training/data/csv_dataset.py), so every rank computes the same rows without being sent them."""
        mapping = ctx.data.episode_indices(episode)
        # a full pass (no --episode-size): the trainer shuffles; the prototypes cover every row
        return mapping if mapping is not None else torch.arange(self.dataset_size)

    def proto_active(self, episode: int) -> bool:
        return self.uses_proto and episode >= self.args.infonce_warmup_epoch and not self.lit_phase(episode)

    def lit_phase(self, episode: int) -> bool:
        return 0 <= self.args.lit_start_epoch <= episode

    def on_epoch_start(self, epoch: int, ctx):
        # recomputed on every rank and at every start, a resume mid-episode included (it is not saved)
        self.mapping = self.episode_indices(epoch, ctx)
        if self.proto_active(epoch):
            due = (not self.prototypes or self.clustered_episode < 0
                   or epoch - self.clustered_episode >= self.args.clustering_frequency)
            if self.episode != epoch and due:
                self.cluster(ctx, epoch)
            elif self.episode != epoch:
                self.assign_labels()
            self._build_label_lookup()
        self.episode = epoch
        return None

    def _episode_rows(self) -> np.ndarray:
        return self.mapping.numpy()

    def _normalised_rows(self, features: np.ndarray) -> torch.Tensor:
        return F.normalize(torch.from_numpy(np.asarray(features[self._episode_rows()], dtype=np.float32)), dim=1)

    def cluster(self, ctx, epoch: int) -> None:
        """k-means of the episode's teacher (and external) embeddings on rank 0; image-space prototypes by
        back-translation of the episode's student image features gathered to rank 0. The other ranks wait for
        the result outside any collective (k-means of millions of rows may outlast --dist-timeout-minutes)."""
        args = self.args
        need_images = args.PBT or self.uses_external
        image_features = self.episode_image_features(ctx) if need_images else None  # collective; rank 0 holds it
        rows, dim, gpu = len(self.mapping), self.teacher.dim, proto.faiss_gpu(self.device)
        spaces = 2 if self.uses_external else 1
        what = f"episode {epoch}'s k-means of {rows} x {dim} teacher embeddings into {args.k} prototypes"
        logging.info("%s on rank 0 (%s; %d iterations on at most %d sampled points%s; ~%.1f GiB of features); "
                     "the other ranks wait for it", what, f"GPU {gpu}" if gpu is not None else "CPU",
                     args.kmeans_max_iter, min(rows, args.k * args.kmeans_max_points_per_centroid),
                     ", twice: teacher and external" if spaces == 2 else "", spaces * rows * dim * 4 / 2**30)

        def compute() -> Dict[str, torch.Tensor]:
            started = time.perf_counter()
            seed = args.seed + epoch
            text = self._normalised_rows(self.teacher_features)
            centroids, labels = self._kmeans(text, seed, gpu, f"episode {epoch} k-means")
            result = {"text_centroids": centroids, "text_labels": labels,
                      "image_prototypes": proto.translate_prototypes(image_features, labels, args.k)
                      if args.PBT else centroids}
            if self.uses_external:
                ext_centroids, ext_labels = self._kmeans(self._normalised_rows(self.external_features), seed + 1, gpu,
                                                         f"episode {epoch} external k-means")
                result.update(external_centroids=ext_centroids, external_labels=ext_labels,
                              image_prototypes_external=proto.translate_prototypes(image_features, ext_labels, args.k))
            logging.info("episode %d: clustered %d teacher embeddings into %d prototypes in %.1f s", epoch, rows,
                         args.k, time.perf_counter() - started)
            return result

        self.prototypes = compute_on_master(compute, what)
        self.clustered_episode = epoch

    def _kmeans(self, features: torch.Tensor, seed: int, gpu: Optional[int], desc: str):
        args = self.args
        return proto.kmeans(features, args.k, args.kmeans_max_iter, args.kmeans_nredo, seed, gpu=gpu,
                            max_points_per_centroid=args.kmeans_max_points_per_centroid, desc=desc,
                            show_progress=getattr(args, "log_level", "info") != "warning")

    def assign_labels(self) -> None:
        """A new episode between clusterings: label its rows by the nearest existing centroid (rank 0)."""
        gpu = proto.faiss_gpu(self.device)

        def compute() -> Dict[str, torch.Tensor]:
            started = time.perf_counter()
            result = dict(self.prototypes)
            with Progress(total=len(self.mapping), desc="episode rows by nearest centroid", unit="row",
                          enabled=getattr(self.args, "log_level", "info") != "warning") as progress:
                result["text_labels"] = proto.assign_to_centroids(
                    self._normalised_rows(self.teacher_features), self.prototypes["text_centroids"], gpu=gpu,
                    progress=progress.update)
            if "external_centroids" in self.prototypes:
                result["external_labels"] = proto.assign_to_centroids(
                    self._normalised_rows(self.external_features), self.prototypes["external_centroids"], gpu=gpu)
            logging.info("labelled %d episode rows by their nearest centroid in %.1f s", len(self.mapping),
                         time.perf_counter() - started)
            return result

        self.prototypes = compute_on_master(compute, f"labelling {len(self.mapping)} episode rows by nearest centroid")

    def _build_label_lookup(self) -> None:
        num_rows = len(self.teacher_features)
        self.label_of_row = {}
        for name in ("text_labels", "external_labels"):
            if name in self.prototypes:
                lookup = torch.full((num_rows,), -1, dtype=torch.long)
                lookup[self.mapping] = self.prototypes[name]
                self.label_of_row[name] = lookup

    @torch.no_grad()
    def episode_image_features(self, ctx) -> Optional[torch.Tensor]:
        """L2-normalised student image features of every episode position, in mapping order, on rank 0 (the
        one that clusters; None elsewhere). Each rank embeds an equal contiguous share (eval mode), then a
        gather to rank 0: the other ranks never hold the episode's features."""
        from training.data.samples import image_collator

        args, world_size, rank = self.args, self.dist.world_size, self.dist.rank
        model = ctx.unwrapped_model
        was_training = model.training
        model.eval()
        per_rank = math.ceil(len(self.mapping) / world_size)
        mine = self.mapping[rank * per_rank:(rank + 1) * per_rank].tolist()
        logging.info("embedding the episode's %d images with the student (%d on this rank)", len(self.mapping),
                     len(mine))
        loader = run_loader(ctx.data.dataset, batch_size=args.batch_size, sampler=mine,
                            num_workers=args.workers, collate_fn=image_collator(ctx.data.dataset))
        dtype = next(model.parameters()).dtype
        with autocast(args.precision, self.device):  # as fast as the training steps (TF32/bf16 GEMMs)
            pieces = [F.normalize(model.encode_image(b["image"].to(self.device, dtype)).float(), dim=1)
                      for b in loader]
        features = torch.zeros(per_rank, self.teacher.dim if not pieces else pieces[0].shape[1], device=self.device)
        if pieces:
            local = torch.cat(pieces)
            features[:len(local)] = local
        model.train(was_training)
        if is_distributed():
            gathered = [torch.empty_like(features) for _ in range(world_size)] if rank == 0 else None
            dist.gather(features, gathered, dst=0)
            if rank != 0:
                return None
            features = torch.cat(gathered)
        return features[:len(self.mapping)].cpu()

    def on_epoch_end(self, epoch: int, ctx) -> None:
        # the episode checkpoint follows: a BatchNorm image student must work in eval mode, where it is scored
        model = ctx.unwrapped_model
        self.batchnorm.before_save(ctx, model, model.encode_image)

    # --- step -----------------------------------------------------------------------------------------

    def loss(self, model, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        args = self.args
        lit = self.lit_phase(self.episode)
        proto_now = self.proto_active(self.episode)
        scales = ["logit_scale"] * self.uses_infonce + ["logit_scale_proto"] * proto_now
        out = model(batch["image"], backbone_grad=not lit, scales=scales)
        student = out["image_features"].float()
        rows = batch["index"].cpu().numpy()
        teacher = torch.from_numpy(np.asarray(self.teacher_features[rows], dtype=np.float32)).to(student.device)
        losses: Dict[str, torch.Tensor] = {}
        if not lit:
            if "mse" in self.distillers:
                losses["simreg_loss"] = args.w_simreg * distill_losses.simreg_loss(student, teacher)
            if "rkd" in self.distillers:
                losses["rkd_distance_loss"] = args.w_rkd_d * distill_losses.rkd_distance_loss(student, teacher)
                if args.w_rkd_a > 0:
                    losses["rkd_angle_loss"] = args.w_rkd_a * distill_losses.rkd_angle_loss(student, teacher)
        if self.uses_infonce:
            losses["infonce_loss"] = args.w_clip * self.clip_loss(
                F.normalize(student, dim=-1), F.normalize(teacher, dim=-1), out["logit_scale"])
        if proto_now:
            # ProtoCLIP averages image→text and text→image terms; with a frozen teacher the text→* terms
            # carry no gradient to the student, so only the image→* halves remain (same weight meaning)
            index = batch["index"].cpu()
            losses["proto_loss"] = args.w_proto * 0.5 * distill_losses.proto_loss(
                student, self.prototypes["image_prototypes"].to(student.device),
                self.prototypes["text_centroids"].to(student.device),
                self.label_of_row["text_labels"][index].to(student.device), out["logit_scale_proto"],
                args.target_temperature)
            if self.uses_external:
                losses["proto_external_loss"] = args.w_proto_external * 0.5 * distill_losses.proto_loss(
                    student, self.prototypes["image_prototypes_external"].to(student.device),
                    self.prototypes["external_centroids"].to(student.device),
                    self.label_of_row["external_labels"][index].to(student.device), out["logit_scale_proto"], -1)
        losses["loss"] = sum(losses.values())
        return losses

    # --- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"episode": self.episode, "clustered_episode": self.clustered_episode}
        if self.prototypes:
            state["prototypes"] = dict(self.prototypes)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """The episode state from a checkpoint (what `state_dict` writes), checked before it is used: episode
        numbers, and prototypes of --k rows (labels, indices into them, within [0, k))."""
        for key in ("episode", "clustered_episode"):
            value = state.get(key, -1)
            if type(value) is not int or value < -1:
                raise CheckpointRefused(f"job_state.{key}: expected an integer >= -1, got {repr(value)[:40]}")
        prototypes = state.get("prototypes") or {}
        if not isinstance(prototypes, dict):
            raise CheckpointRefused(f"job_state.prototypes: expected a mapping, got {type(prototypes).__name__}")
        for name, value in prototypes.items():
            where = f"job_state.prototypes.{str(name)[:40]}"
            labels = name in PROTOTYPE_LABELS
            if name not in PROTOTYPE_LABELS + PROTOTYPE_TABLES or not isinstance(value, torch.Tensor):
                raise CheckpointRefused(f"{where}: not a prototype tensor this job keeps")
            if labels and not (value.dtype == torch.int64 and value.dim() == 1
                               and bool(((value >= 0) & (value < self.args.k)).all())):
                raise CheckpointRefused(f"{where}: expected a vector of labels in [0, --k {self.args.k})")
            if not labels and not (value.is_floating_point() and value.dim() == 2 and len(value) == self.args.k):
                raise CheckpointRefused(f"{where}: expected a float table of --k {self.args.k} rows, got "
                                        f"{value.dtype} {list(value.shape)}")
        self.episode, self.clustered_episode = state.get("episode", -1), state.get("clustered_episode", -1)
        # a "mapping" in the state is ignored: every rank recomputes an episode's rows from (seed, episode)
        self.prototypes = dict(prototypes)


# what `cluster` keeps in `prototypes`: each row's prototype (labels), and the prototypes (a row each)
PROTOTYPE_LABELS = ("text_labels", "external_labels")
PROTOTYPE_TABLES = ("text_centroids", "image_prototypes", "external_centroids", "image_prototypes_external")


class TeacherImageRows(Dataset):
    """An image teacher's input for each training row, for its row cache: the row's image through the
    teacher's own eval transform (no augmentation, so the feature is a function of the row alone). Rows are
    read by a DataLoader (--workers) in exactly the order the cache build asks for them on this rank
    (row_cache.round_rows), so `encode` takes the next prefetched batch. A bad or malformed row gets zeros:
    the loader replaces such a row by the next good one, whose own index the loss then looks up."""

    def __init__(self, dataset, teacher, args, dist_info):
        from training.row_cache import num_rounds, round_rows

        self.dataset, self.teacher, self.workers = dataset, teacher, args.workers
        self.transform, self.image_size = teacher.transform, teacher.image_size
        num_rows, batch_size = len(dataset), args.teacher_batch_size
        self.batches = [list(round_rows(r, dist_info.rank, num_rows, batch_size, dist_info.world_size))
                        for r in range(num_rounds(num_rows, batch_size, dist_info.world_size))]
        self.loader = None  # started at the first encode: a cache that is already there reads no image

    def __getstate__(self):
        # what a loader worker needs: the rows' paths and the transform, not the teacher or the loader
        return {key: value for key, value in self.__dict__.items() if key not in ("teacher", "loader")}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        from training.data.samples import BadSample, load_image

        size = self.image_size
        if row in self.dataset.malformed:
            return row, torch.zeros(3, size, size), False
        try:
            image = load_image(self.dataset.paths[row], lambda: f"row {row} ({self.dataset.paths[row]})",
                               self.dataset.max_pixels)
        except BadSample:
            return row, torch.zeros(3, size, size), False
        return row, self.transform(image), True

    def encode(self, rows: List[int]) -> torch.Tensor:
        if self.loader is None:
            self.loader = iter(run_loader(self, batch_sampler=[b for b in self.batches if b],
                                          num_workers=self.workers))
        loaded, images, good = next(self.loader)
        if loaded.tolist() != list(rows):  # the cache build and this loader walk the same rows
            raise RuntimeError(f"image teacher cache: expected rows {rows[:3]}..., the loader gave {loaded[:3]}...")
        features = self.teacher.encode(images)
        return features * good.to(features.device, features.dtype).unsqueeze(1)



class StoredTeacherRows:
    """The teacher cache's rows from a reinforced set's stored caption embeddings (what the same CLIP's
    `encode_text` gave, training.data.reinforced.StoredCaptionRows), looked up by row; a row the set lacks, or
    whose caption there is not this TSV's, is embedded by the teacher."""

    def __init__(self, reinforcement, captions, teacher, batch_size: int):
        from training.data.reinforced import StoredCaptionRows

        self.reinforcement, self.captions, self.teacher, self.batch_size = reinforcement, captions, teacher, batch_size
        self.rows = StoredCaptionRows(reinforcement)
        self.read = self.computed = self.differing = 0

    def identity(self) -> Dict[str, Any]:
        """What the rows depend on beyond the teacher: part of the cache's key."""
        header = self.reinforcement.header
        return {"folder": str(self.reinforcement.folder.resolve()), "weights": header["teacher"]["weights"],
                "dtype": header["dtype"], "precision": header["precision"]}

    def encode(self, rows: List[int]) -> torch.Tensor:
        found = [self.rows.lookup(row) for row in rows]
        same = [entry is not None and entry[0] == self.captions[row] for row, entry in zip(rows, found)]
        self.differing += sum(entry is not None and not match for entry, match in zip(found, same))
        out = torch.empty(len(rows), self.reinforcement.embed_dim)
        for position, (entry, match) in enumerate(zip(found, same)):
            if match:
                out[position] = torch.from_numpy(entry[1])
        missing = [position for position, match in enumerate(same) if not match]
        if missing:
            computed = self.teacher.encode([self.captions[rows[p]] for p in missing], batch_size=self.batch_size)
            out[missing] = computed.to("cpu", torch.float32)
        self.read += len(rows) - len(missing)
        self.computed += len(missing)
        return out

    def report(self) -> None:
        """This rank's share: rows read, rows the teacher embedded (rows whose caption differed among them)."""
        if self.read or self.computed:
            logging.info("teacher cache: %d row(s) from the stored embeddings of %s (%s), %d embedded by the "
                         "teacher%s", self.read, self.reinforcement.folder, self.reinforcement.describe(),
                         self.computed, f" ({self.differing} whose caption is not the set's)" if self.differing
                         else "")
