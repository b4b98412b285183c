"""`clipcompress reinforce`: store a frozen teacher's embeddings beside the data, once (MobileCLIP's dataset
reinforcement), so distillation and KD pruning read them instead of running the teacher every step.

    python -m utils.reinforce --teacher-model ViT-L-14 --teacher-pretrained weights/ViT-L-14.pt \\
        --train-data cc3m/train.tsv --views 10 --out cc3m-reinforced
    torchrun --nproc_per_node 8 -m utils.reinforce ...            # each rank a share of the shards
    python -m training.main --job distill --train-data "cc3m-reinforced/{000000..003317}.tar" ...

Writes webdataset shards to --out whose samples keep their image and caption and gain the teacher's image
embedding of each of K views (open_clip's training crop, drawn from (--seed, key, view)) with the view's crop
box, and the teacher's caption embedding; plus reinforce.json, the teacher's text tower, sizes.json
(training.data.reinforced describes the layout). Input shards keep their names (and their samples' order); a
TSV becomes `--shard-size`-row shards named 000000.tar, ... Bad samples are skipped and counted as the trainer
counts them (the same checks).

Resumable: every output shard is written to a temporary file and renamed when whole, and a shard that is
already there is not written again, so running the same command after an interruption (a kill, a crash, a
preempted job) finishes the set, and the shards are byte for byte those of an uninterrupted run: a shard's
bytes depend on its input, the teacher and the settings only (not on the ranks, workers or what ran before).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from compress.models.pretrained import create_clip
from compress.models.registry import get_tokenizer
from compress.models.spec import SpecError, integer, list_of, record, text, validate
from foundation.checkpoint import atomic_write_bytes, remove_stale_temp_files
from foundation.errors import UserError
from foundation.files import open_regular
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from foundation.logs import quiet_open_clip
from foundation.progress import Progress
from training.accel import autocast
from training.data import infer_dataset_type
from training.data.csv_dataset import CsvDataset
from training.data.reinforced import (
    COUNTS_DIR,
    DEFAULT_CROP_RATIO,
    DEFAULT_CROP_SCALE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    IMAGE_EMBEDDING_MEMBER,
    MAX_VIEWS,
    REINFORCE_FILE,
    REINFORCE_SCHEMA,
    TEXT_EMBEDDING_MEMBER,
    TEXT_TOWER_FILE,
    VIEWS_MEMBER,
    ReinforceError,
    Reinforcement,
    ViewMaker,
    array_bytes,
    draw_views,
    file_sha256,
    header_bytes,
    read_reinforcement,
    weights_identity,
)
from training.data.samples import BadSample
from training.data.shards import (
    IMAGE_MEMBERS,
    MAX_IMAGE_MEMBER_BYTES,
    decode_shard_sample,
    expand_urls,
    shard_samples,
    shard_sizes,
)
from training.distributed import barrier, init_distributed

# USTAR, the tar format webdataset's TarWriter writes, holds member names of at most 100 bytes
MAX_MEMBER_NAME_BYTES = 100
# bad samples whose reason is logged (each shard's first ones are also kept in counts/SHARD.json)
LOGGED_REASONS = 20
KEPT_REASONS = 5
COUNTS_FILE_BYTES = 64 << 10
COUNTS_SCHEMA = record({"samples": integer(0, 1 << 48), "skipped": integer(0, 1 << 48),
                        "reasons": list_of(text(0, 10_000), 0, KEPT_REASONS)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcompress reinforce",
        description="Store a frozen CLIP teacher's embeddings of K augmented views of every image and of its "
                    "caption beside the data, as webdataset shards that --job distill (and --job prune --KD) "
                    "train from without running the teacher.")
    parser.add_argument("--teacher-model", default=None,
                        help="teacher: open_clip model config name (any teacher --job distill accepts)")
    parser.add_argument("--teacher-pretrained", required=True,
                        help="teacher weights: a local file (one of our clip-job checkpoints works), hf:DIR or an "
                             "open_clip tag")
    parser.add_argument("--train-data", required=True,
                        help="TSV/CSV file or webdataset shards (brace patterns, '::'-separated lists)")
    parser.add_argument("--out", required=True,
                        help="folder of the reinforced set (created; an interrupted run's folder is completed)")
    parser.add_argument("--views", type=int, default=5,
                        help=f"augmented views of each image the teacher embeds (1..{MAX_VIEWS}); a training step "
                             "draws one of them")
    parser.add_argument("--no-augment", action="store_true",
                        help="one view: the teacher's eval transform (resize, centre crop), what --job distill "
                             "trains on without stored embeddings; needs --views 1")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=list(DEFAULT_CROP_SCALE), metavar=("LO", "HI"),
                        help="area fraction of the image a view's crop covers (open_clip's training "
                             "RandomResizedCrop scale)")
    parser.add_argument("--flip-probability", type=float, default=0.0,
                        help="chance that a view is flipped left-right (0: never; captions that say left or "
                             "right would no longer match)")
    parser.add_argument("--seed", type=int, default=0, help="the views' seed (a view is drawn from seed, key, index)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES),
                        help="how the embeddings are stored (float16 halves the storage)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16"],
                        help="the teacher's forward: fp32, or autocast (amp: fp16 on GPU; amp_bf16)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per teacher forward (x --views images)")
    parser.add_argument("--workers", type=int, default=2, help="processes reading and cropping images")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard of a TSV/CSV input")
    parser.add_argument("--dataset-size", type=int, default=None,
                        help="reinforce only the first N samples (rows of a TSV; samples of the shards in the "
                             "order given, counted by their sizes.json)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: each rank its GPU)")
    data = parser.add_argument_group("input (as the trainer reads it)")
    data.add_argument("--csv-separator", default="\t", help="column separator of the TSV/CSV")
    data.add_argument("--csv-img-key", default="filepath", help="column with image paths")
    data.add_argument("--csv-caption-key", default="title", help="column with captions")
    data.add_argument("--csv-quoting", default="auto", choices=["auto", "csv", "none"],
                      help="how the TSV/CSV's fields are quoted (the trainer's --csv-quoting)")
    data.add_argument("--allow-empty-captions", action="store_true",
                      help="keep images whose caption is empty or missing (their caption embedding is the empty "
                           "text's); by default they are skipped as bad")
    data.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                      help="skip an image with more pixels than this as a bad sample (the trainer's flag)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="console log level; progress is a bar on a terminal, else a line every "
                             "$CLIPCOMPRESS_PROGRESS_SECONDS (default 30)")
    return parser


# --- what to write -----------------------------------------------------------------------------------


@dataclass
class Unit:
    """One output shard and its input: an input shard (`url`, the first `limit` samples) or TSV rows."""

    name: str
    url: Optional[str] = None
    rows: Optional[range] = None
    limit: Optional[int] = None
    expected: Optional[int] = None  # input samples it reads, when known (progress)


def plan_units(args, dataset: Optional[CsvDataset]) -> List[Unit]:
    if dataset is not None:
        rows = len(dataset) if args.dataset_size is None else args.dataset_size
        if rows > len(dataset):
            raise UserError(f"--dataset-size {args.dataset_size} but {args.train_data} has {len(dataset)} rows")
        return [Unit(f"{i // args.shard_size:06d}.tar", rows=range(i, min(i + args.shard_size, rows)),
                     expected=min(args.shard_size, rows - i)) for i in range(0, rows, args.shard_size)]
    urls = expand_urls(args.train_data)
    names = [os.path.basename(url).split(".tar", 1)[0] + ".tar" for url in urls]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise UserError(f"--train-data {args.train_data}: two shards are named {twice}; the output shards keep "
                        f"the input's names, so they must differ")
    sizes = [shard_sizes([url]) for url in urls]
    if args.dataset_size is not None and any(size is None for size in sizes):
        raise UserError("--dataset-size on shards counts their samples from sizes.json, which these shards lack")
    units, before = [], 0
    for name, url, size in zip(names, urls, sizes):
        limit = None
        if args.dataset_size is not None:
            if before >= args.dataset_size:
                break
            limit = min(size, args.dataset_size - before)
            before += size
        units.append(Unit(name, url=url, limit=limit, expected=limit if limit is not None else size))
    if args.dataset_size is not None and before < args.dataset_size:
        raise UserError(f"--dataset-size {args.dataset_size} but the shards hold {before} samples")
    return units


def check_args(args) -> None:
    if not 1 <= args.views <= MAX_VIEWS:
        raise UserError(f"--views {args.views}: must be in 1..{MAX_VIEWS}")
    if args.no_augment and args.views != 1:
        raise UserError(f"--no-augment gives every view the same image: pass --views 1, not {args.views}")
    lo, hi = args.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--crop-scale {lo} {hi}: need 0 < LO <= HI <= 1")
    if not 0 <= args.flip_probability <= 1:
        raise UserError(f"--flip-probability {args.flip_probability}: must be in [0, 1]")
    for flag, value, lowest in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                                ("--shard-size", args.shard_size, 1), ("--seed", args.seed, 0)):
        if value < lowest:
            raise UserError(f"{flag} {value}: must be at least {lowest}")
    if args.dataset_size is not None and args.dataset_size < 1:
        raise UserError(f"--dataset-size {args.dataset_size}: must be at least 1")
    for url in expand_urls(args.train_data) if not args.train_data.endswith((".csv", ".tsv")) else [args.train_data]:
        if os.path.realpath(os.path.dirname(url) or ".") == os.path.realpath(args.out):
            raise UserError(f"--out {args.out} holds the input {url}: the output shards would overwrite it")


# --- reading and cropping (in the loader's workers) ------------------------------------------------------


class UnitSamples(torch.utils.data.IterableDataset):
    """This rank's units, dealt out to the loader's workers unit by unit; per unit, in input order, each sample
    ready for the teacher (its members, caption and view tensors) or {"bad": why}, then None when it ends."""

    def __init__(self, units: List[Unit], dataset: Optional[CsvDataset], maker: ViewMaker, args):
        self.units, self.dataset, self.maker = units, dataset, maker
        self.views, self.seed = args.views, args.seed
        self.augment = None if args.no_augment else augment_settings(args)
        self.allow_empty, self.max_pixels = args.allow_empty_captions, args.max_image_pixels or None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, unit in enumerate(self.units):
            if index % workers == worker:
                for sample in self.read(unit):
                    yield index, sample
                yield index, None

    def read(self, unit: Unit) -> Iterator[Dict[str, Any]]:
        if unit.rows is not None:
            for row in unit.rows:
                yield self.prepare_row(row)
            return
        for count, sample in enumerate(shard_samples([{"url": unit.url}])):
            if unit.limit is not None and count >= unit.limit:
                return
            yield self.prepare(sample)

    def prepare_row(self, row: int) -> Dict[str, Any]:
        """A TSV row as the trainer's checks see it (CsvDataset.load_row), its image file's bytes kept."""
        try:
            loaded = self.dataset.load_row(row)
            path = self.dataset.paths[row]
            with open_regular(path) as f:
                data = f.read(MAX_IMAGE_MEMBER_BYTES + 1)
            if len(data) > MAX_IMAGE_MEMBER_BYTES:
                raise BadSample(f"row {row} ({path}): over {MAX_IMAGE_MEMBER_BYTES:,} bytes")
        except BadSample as error:
            return {"bad": str(error)}
        except OSError as error:  # changed since it was decoded
            return {"bad": f"row {row} ({self.dataset.paths[row]}): {error.strerror or error}"}
        suffix = os.path.splitext(path)[1][1:].lower()
        return self.finish(f"{row:09d}", loaded["image"], loaded["caption"], row,
                           (suffix, data) if suffix in IMAGE_MEMBERS else None)

    def prepare(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        """A shard sample through the trainer's own decoding (decode_shard_sample), its image bytes kept."""
        decoded = decode_shard_sample(sample, _keep, self.allow_empty, self.max_pixels)
        if "bad" in decoded:
            return decoded
        suffix = next(k for k in IMAGE_MEMBERS if k in sample)
        return self.finish(str(sample["__key__"]), decoded["image"], decoded["caption"], decoded["index"],
                           (suffix, sample[suffix]))

    def finish(self, key: str, image, caption: str, index: int, stored) -> Dict[str, Any]:
        longest = max((TEXT_EMBEDDING_MEMBER, IMAGE_EMBEDDING_MEMBER, VIEWS_MEMBER, "jpeg", "webp"), key=len)
        if len(f"{key}.{longest}".encode("utf-8")) > MAX_MEMBER_NAME_BYTES:
            return {"bad": f"sample {key[:80]!r}: key too long for a tar member name"}
        if stored is None:  # a format the shard reader does not take: the same pixels, as PNG
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            stored = ("png", buffer.getvalue())
        members = {stored[0]: stored[1], "txt": caption.encode("utf-8")}
        if index >= 0:
            members["idx"] = str(index).encode("ascii")
        if self.augment is None:
            params, views = None, self.maker(image).unsqueeze(0)
        else:
            params = draw_views(self.seed, key, self.views, image.width, image.height, self.augment)
            views = torch.stack([self.maker(image, row) for row in params])
        return {"key": key, "members": members, "caption": caption, "params": params, "views": views}


def _keep(item):
    """The identity: the loader's items and the decoders' images pass through unchanged (picklable, unlike a
    lambda, for loader workers)."""
    return item


def augment_settings(args) -> Dict[str, Any]:
    return {"crop_scale": [float(v) for v in args.crop_scale], "crop_ratio": [float(v) for v in DEFAULT_CROP_RATIO],
            "flip": float(args.flip_probability)}


# --- the teacher and the shards --------------------------------------------------------------------------


class TeacherEncoder:
    """The teacher's embeddings of a batch of prepared samples: (B, K, D) of their views and (B, D) of their
    captions, float32 as `encode_image`/`encode_text` give them (not normalised)."""

    def __init__(self, teacher, tokenizer, device: torch.device, precision: str):
        self.teacher, self.tokenizer, self.device, self.precision = teacher, tokenizer, device, precision

    @torch.no_grad()
    def __call__(self, items: List[Dict[str, Any]]):
        views = torch.stack([item["views"] for item in items]).to(self.device)
        tokens = self.tokenizer([item["caption"] for item in items]).to(self.device)
        with autocast(self.precision, self.device):
            # normalize=False said explicitly: CoCa's encoders normalise unless told not to, every other CLIP's not
            image = self.teacher.encode_image(views.flatten(0, 1), normalize=False).float()
            caption = self.teacher.encode_text(tokens, normalize=False).float()
        return image.reshape(len(items), views.shape[1], -1).cpu().numpy(), caption.cpu().numpy()


class ShardWriter:
    """One output shard, written to `.NAME.tmp.PID` (foundation.checkpoint's temp-file name, which a resume
    removes) and renamed to NAME when whole, after its counts/NAME.json."""

    def __init__(self, out: Path, name: str, encode: TeacherEncoder, batch_size: int, dtype: np.dtype):
        import webdataset

        self.out, self.name, self.encode, self.batch_size, self.dtype = out, name, encode, batch_size, dtype
        self.tmp = out / f".{name}.tmp.{os.getpid()}"
        self.file = open(self.tmp, "wb")
        # mtime, owner and mode fixed: the bytes depend on the samples only
        self.tar = webdataset.TarWriter(self.file, encoder=False, mtime=0, user="", group="")
        self.pending: List[Dict[str, Any]] = []
        self.kept, self.skipped, self.reasons = 0, 0, []

    def add(self, item: Dict[str, Any]) -> List[str]:
        """Queue `item`; a full batch goes through the teacher and into the shard (its bad samples' reasons)."""
        self.pending.append(item)
        return self.flush() if len(self.pending) >= self.batch_size else []

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < KEPT_REASONS:
            self.reasons.append(reason)

    def flush(self) -> List[str]:
        if not self.pending:
            return []
        image, caption = self.encode(self.pending)
        image, caption = image.astype(self.dtype), caption.astype(self.dtype)
        bad = []
        for item, image_embedding, caption_embedding in zip(self.pending, image, caption):
            if not (np.isfinite(image_embedding).all() and np.isfinite(caption_embedding).all()):
                reason = f"sample {item['key']}: the teacher's embedding is not finite in {self.dtype}"
                self.skip(reason)
                bad.append(reason)
                continue
            members = dict(item["members"])
            members[IMAGE_EMBEDDING_MEMBER] = array_bytes(image_embedding)
            members[TEXT_EMBEDDING_MEMBER] = array_bytes(caption_embedding)
            if item["params"] is not None:
                members[VIEWS_MEMBER] = array_bytes(item["params"])
            self.tar.write({"__key__": item["key"], **members})
            self.kept += 1
        self.pending = []
        return bad

    def finish(self) -> List[str]:
        bad = self.flush()
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        counts = {"samples": self.kept, "skipped": self.skipped, "reasons": self.reasons}
        atomic_write_bytes(self.out / COUNTS_DIR / f"{self.name}.json", header_bytes(counts))
        os.replace(self.tmp, self.out / self.name)
        return bad

    def abandon(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def done(out: Path, unit: Unit) -> bool:
    return (out / unit.name).is_file() and (out / COUNTS_DIR / f"{unit.name}.json").is_file()


def read_counts(out: Path, unit: Unit) -> Dict[str, Any]:
    path = out / COUNTS_DIR / f"{unit.name}.json"
    try:
        with open_regular(path) as f:
            return validate(COUNTS_SCHEMA, json.loads(f.read(COUNTS_FILE_BYTES).decode("utf-8")), str(path))
    except (OSError, ValueError, SpecError) as error:
        raise ReinforceError(f"{path} cannot be read ({error}): delete it and {unit.name}, and run again") from None


# --- the run ------------------------------------------------------------------------------------------------


def text_tower_bytes(teacher) -> bytes:
    """The teacher's text tower and temperature (every tensor but the image tower's), as safetensors."""
    import safetensors.torch

    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous()
               for name, tensor in teacher.state_dict().items() if not name.startswith("visual.")}
    return safetensors.torch.save(tensors)


def start_header(args, teacher, out: Path, rank: int) -> Dict[str, Any]:
    """reinforce.json for this command's teacher and settings (rank 0 writes it, with the text tower, or checks
    that an interrupted run's has the same settings); every rank returns it."""
    tower = text_tower_bytes(teacher)
    with torch.no_grad():
        dim = int(teacher.encode_text(get_tokenizer(teacher.model_spec)(["a"])).shape[-1])
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
        "teacher": {"spec": teacher.model_spec, "weights": weights_identity(args.teacher_pretrained),
                    "embed_dim": dim, "logit_scale": float(teacher.logit_scale.detach().float().reshape(())),
                    "text_tower_sha256": hashlib.sha256(tower).hexdigest()},
        "views": args.views, "augment": None if args.no_augment else augment_settings(args), "seed": args.seed,
        "dtype": args.dtype, "precision": args.precision,
        "source": {"data": args.train_data[:1000], "samples": 0, "skipped": 0},
    }
    header = validate(REINFORCE_SCHEMA, header, "reinforce.json")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / REINFORCE_FILE).exists():
            existing = read_reinforcement(out)
            if existing.settings() != {k: v for k, v in header.items() if k not in ("complete", "source")}:
                raise UserError(f"--out {out} holds a reinforced set of other settings ({existing.describe()}, "
                                f"{existing.views} view(s), seed {existing.header['seed']}, "
                                f"{existing.header['dtype']}): choose another --out, or repeat its own command")
            header = existing.header
        else:
            atomic_write_bytes(out / REINFORCE_FILE, header_bytes(header))
        if not (out / TEXT_TOWER_FILE).is_file() or file_sha256(out / TEXT_TOWER_FILE) != \
                header["teacher"]["text_tower_sha256"]:
            atomic_write_bytes(out / TEXT_TOWER_FILE, tower)
        for path, size in remove_stale_temp_files(out):  # what a killed run was writing
            logging.info("removed %s (%d bytes), an unfinished shard of an interrupted run", path.name, size)
    return header


def reinforce(args) -> Dict[str, Any]:
    check_args(args)
    dist_info = init_distributed(args.device)
    rank, world = dist_info.rank, dist_info.world_size
    out = Path(args.out)
    dataset = None
    if infer_dataset_type(args.train_data) == "csv":
        dataset = CsvDataset(args.train_data, _keep, img_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, sep=args.csv_separator,
                             allow_empty_captions=args.allow_empty_captions, max_pixels=args.max_image_pixels or None,
                             quoting=args.csv_quoting)
    elif infer_dataset_type(args.train_data) != "webdataset":
        raise UserError(f"--train-data {args.train_data}: reinforce reads a TSV/CSV or webdataset shards")
    units = plan_units(args, dataset)
    if args.teacher_model is None and not args.teacher_pretrained.startswith("hf:"):
        raise UserError("--teacher-model names the teacher's config (only an hf:DIR teacher may leave it out)")
    teacher = create_clip(args.teacher_model, args.teacher_pretrained).to(dist_info.device).eval()
    teacher.requires_grad_(False)
    header = start_header(args, teacher, out, rank)
    barrier()  # reinforce.json and the text tower are there, the stale temp files gone
    (out / COUNTS_DIR).mkdir(parents=True, exist_ok=True)

    mine = [unit for index, unit in enumerate(units) if index % world == rank]
    todo = [unit for unit in mine if not done(out, unit)]
    logging.info("reinforce: teacher %s, %d view(s) per image, %s; %d of this rank's %d shard(s) to write "
                 "(%d process(es))", Reinforcement(out, header).describe(), args.views, args.dtype, len(todo),
                 len(mine), world)
    maker = ViewMaker(header["teacher"]["spec"], header["augment"])
    encode = TeacherEncoder(teacher, get_tokenizer(teacher.model_spec), dist_info.device, args.precision)
    write_units(todo, dataset, maker, encode, out, args)
    barrier()
    if rank == 0:
        return finish_set(units, out, header)
    return {}


def write_units(units: List[Unit], dataset, maker: ViewMaker, encode: TeacherEncoder, out: Path, args) -> None:
    samples = UnitSamples(units, dataset, maker, args)
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=min(args.workers, len(units)),
                                         collate_fn=_keep)
    expected = [unit.expected for unit in units]
    total = sum(expected) if None not in expected else None
    writers: Dict[int, ShardWriter] = {}
    logged = 0
    try:
        with Progress(total=total, desc="reinforce", unit="sample",
                      enabled=args.log_level != "warning") as progress:
            for index, item in loader:
                writer = writers.get(index)
                if writer is None:
                    writer = writers[index] = ShardWriter(out, units[index].name, encode, args.batch_size,
                                                          DTYPES[args.dtype])
                if item is None:
                    bad = writers.pop(index).finish()
                elif "bad" in item:
                    writer.skip(item["bad"])
                    bad = [item["bad"]]
                else:
                    bad = writer.add(item)
                if item is not None:
                    progress.update(1)
                for reason in bad[: max(0, LOGGED_REASONS - logged)]:
                    logging.warning("bad sample skipped: %s", reason)
                logged += len(bad)
    finally:
        for writer in writers.values():  # an error or a stop: nothing half-written stays
            writer.abandon()


def finish_set(units: List[Unit], out: Path, header: Dict[str, Any]) -> Dict[str, Any]:
    """sizes.json and the completed reinforce.json, once every shard is there (rank 0, after all ranks)."""
    missing = [unit.name for unit in units if not done(out, unit)]
    if missing:
        raise ReinforceError(f"{len(missing)} shard(s) of {out} were not written (first: {missing[0]}); run the "
                             f"same command again")
    counts = {unit.name: read_counts(out, unit) for unit in units}
    sizes = {name: entry["samples"] for name, entry in counts.items()}
    atomic_write_bytes(out / "sizes.json", header_bytes(sizes))
    samples, skipped = sum(sizes.values()), sum(entry["skipped"] for entry in counts.values())
    header = {**header, "complete": True,
              "source": {**header["source"], "samples": samples, "skipped": skipped}}
    atomic_write_bytes(out / REINFORCE_FILE, header_bytes(validate(REINFORCE_SCHEMA, header, "reinforce.json")))
    shard_bytes = sum((out / unit.name).stat().st_size for unit in units)
    first = next((entry["reasons"][0] for entry in counts.values() if entry["reasons"]), None)
    logging.info("reinforced %d sample(s) into %d shard(s) of %s, %.1f KB per sample; %d bad sample(s) skipped%s",
                 samples, len(units), out, shard_bytes / max(samples, 1) / 1024, skipped,
                 f" (first: {first})" if first else "")
    return {"samples": samples, "skipped": skipped, "shards": len(units), "bytes": shard_bytes}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s | %(levelname)s | %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_open_clip()
    started = time.perf_counter()
    try:
        reinforce(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    logging.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
