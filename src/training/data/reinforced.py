"""Reinforced shards (MobileCLIP's dataset reinforcement): webdataset shards whose samples carry, beside their
image and caption, a frozen teacher's embeddings of K augmented views of the image and of the caption, so a
distillation reads the teacher's outputs instead of running it (`clipcompress reinforce` writes them:
utils/reinforce.py). This module is the format, for the writer and the readers alike.

A sample of a reinforced shard (`KEY` as in the input; every member but the image's is fixed-size):

    KEY.jpg (.png/.jpeg/.webp)  the input's image bytes, unchanged (an image of another format: PNG)
    KEY.txt                     the caption, UTF-8
    KEY.idx                     the row index (a TSV's row, or the input shard's idx), when the input has one
    KEY.views.npy               int32 (K, 5): each view's crop box top, left, height, width in the image's
                                pixels and 1 for a horizontal flip (absent with --no-augment: the one view
                                is the teacher's eval transform)
    KEY.image_emb.npy           float16/float32 (K, D): the teacher's image embedding of each view, as
                                `encode_image` gives it (not normalised)
    KEY.text_emb.npy            float16/float32 (D,): the teacher's embedding of the caption (not normalised)

and the folder holds `reinforce.json` (`read_reinforcement`: the teacher's spec and weights checksum, K, the
seed, the augmentation, the dtype; untrusted data, validated against `REINFORCE_SCHEMA` and never executed),
`teacher_text.safetensors` (the teacher's text tower and temperature: a student that keeps the teacher's
text tower gets it without the teacher), `sizes.json` (samples per shard, open_clip's format) and
`counts/SHARD.json` (the samples each shard kept and skipped).

A view is a pure function of (seed, sample key, view index) (`draw_views`): open_clip's training crop
(RandomResizedCrop, bicubic, then the teacher's normalisation) with an optional flip. `ViewMaker` replays a
stored view exactly, so the student sees the pixels the teacher embedded. A training run draws one of the K
views per sample and epoch from (--seed, epoch, key) (`view_index`), so the draw survives resumes and does
not depend on the loader's workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from compress.models import spec as schema
from foundation.errors import DataError, UserError
from foundation.files import open_regular, read_json
from foundation.images import DEFAULT_MAX_IMAGE_PIXELS
from training.data.samples import MAX_CAPTION_BYTES, BadSample
from training.data.shards import (
    ARRAY_MEMBERS,
    MAX_ARRAY_MEMBER_BYTES,
    EpochSeeded,
    MemberTooLarge,
    _BoundedTarInfo,
    _sample_index,
    _split_name,
    decode_shard_sample,
    expand_urls,
)

FORMAT = "clipcompress-reinforce"
FORMAT_VERSION = 1
REINFORCE_FILE = "reinforce.json"
TEXT_TOWER_FILE = "teacher_text.safetensors"
COUNTS_DIR = "counts"
VIEWS_MEMBER, IMAGE_EMBEDDING_MEMBER, TEXT_EMBEDDING_MEMBER = ARRAY_MEMBERS  # the shard reader reads these
# reinforce.json holds a model spec (a converted Hugging Face config at most: a few KB) and a few numbers
MAX_REINFORCE_FILE_BYTES = 1 << 20
# MobileCLIP stores 30 views; an embedding is at most a few thousand wide (shards.MAX_ARRAY_MEMBER_BYTES holds
# the largest member these allow)
MAX_VIEWS = 256
MAX_EMBED_DIM = 1 << 14
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
VIEW_FIELDS = ("top", "left", "height", "width", "flip")
VIEWS_DTYPE = np.dtype("<i4")
# open_clip's training crop (open_clip.transform.AugmentationCfg, RandomResizedCrop's defaults)
DEFAULT_CROP_SCALE = (0.9, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)
# tries of RandomResizedCrop's rejection sampling before its centre-crop fallback (torchvision's number)
CROP_TRIES = 10
_HASH_CHUNK = 1 << 20


class ReinforceError(DataError):
    """A reinforced set that cannot be used as asked: its reinforce.json refused, another teacher, unfinished."""


# --- reinforce.json ------------------------------------------------------------------------------------


def _sha256_hex(value: Any, path: str, ctx: schema.Context) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise schema.SpecError(f"{path}: expected a sha256 as 64 lowercase hex digits", path,
                               "expected a sha256 as 64 lowercase hex digits")
    return value


def _teacher_spec(value: Any, path: str, ctx: schema.Context) -> Dict[str, Any]:
    """An open_clip CLIP's model spec, checked by the model specs' own schema (compress.models.spec)."""
    try:
        checked = schema.validate_spec(value)
    except schema.SpecError as error:
        raise schema.SpecError(f"{path}: {error}", path, str(error)) from None
    if checked["kind"] != "open_clip":
        raise schema.SpecError(f"{path}.kind: {checked['kind']!r} is not an open_clip CLIP", path, "not open_clip")
    return checked


WEIGHTS_SCHEMA = schema.tagged("source", {
    "file": schema.record({"source": schema.literal("file"), "sha256": _sha256_hex}),
    "hf_folder": schema.record({"source": schema.literal("hf_folder"), "sha256": _sha256_hex}),
    "tag": schema.record({"source": schema.literal("tag"), "tag": schema.text(1, 200)}),
})
COUNT = schema.integer(0, 1 << 48)
REINFORCE_SCHEMA = schema.record({
    "format": schema.literal(FORMAT),
    "version": schema.literal(FORMAT_VERSION),
    "complete": schema.boolean,
    "teacher": schema.record({
        "spec": _teacher_spec,
        "weights": WEIGHTS_SCHEMA,
        "embed_dim": schema.integer(1, MAX_EMBED_DIM),
        "logit_scale": schema.number(-100.0, 100.0),
        "text_tower_sha256": _sha256_hex,
    }),
    "views": schema.integer(1, MAX_VIEWS),
    "augment": schema.optional(schema.record({
        "crop_scale": schema.list_of(schema.number(1e-6, 1.0), 2, 2),
        "crop_ratio": schema.list_of(schema.number(1e-3, 1e3), 2, 2),
        "flip": schema.number(0.0, 1.0),
    })),
    "seed": schema.integer(0, (1 << 63) - 1),
    "dtype": schema.choice(*DTYPES),
    "precision": schema.choice("fp32", "amp", "amp_bf16"),
    "source": schema.record({"data": schema.text(0, 1000), "samples": COUNT, "skipped": COUNT}),
}, unknown="unknown key (not part of reinforce.json)")


@dataclass(frozen=True)
class Reinforcement:
    """A reinforced set's reinforce.json, validated (`read_reinforcement`), and the folder it describes."""

    folder: Path
    header: Dict[str, Any]

    @property
    def teacher_spec(self) -> Dict[str, Any]:
        return self.header["teacher"]["spec"]

    @property
    def teacher_name(self) -> str:
        return self.teacher_spec["model"]

    @property
    def weights(self) -> Dict[str, Any]:
        return self.header["teacher"]["weights"]

    @property
    def embed_dim(self) -> int:
        return self.header["teacher"]["embed_dim"]

    @property
    def logit_scale(self) -> float:
        return self.header["teacher"]["logit_scale"]

    @property
    def views(self) -> int:
        return self.header["views"]

    @property
    def augment(self) -> Optional[Dict[str, Any]]:
        return self.header["augment"]

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.header["dtype"]]

    def describe(self) -> str:
        """The teacher as a log line names it: `clipc-vit-t2-32, sha256 9f2c1a0b3d4e`."""
        weights = self.weights
        which = f"sha256 {weights['sha256'][:12]}" if "sha256" in weights else f"open_clip tag {weights['tag']}"
        return f"{self.teacher_name}, {which}"

    def settings(self) -> Dict[str, Any]:
        """What the writer's flags and teacher determine (the header without its progress and counts): a resumed
        run must have the same."""
        return {key: value for key, value in self.header.items() if key not in ("complete", "source")}

    def text_tower(self) -> Dict[str, torch.Tensor]:
        """The teacher's text tower and `logit_scale` (teacher_text.safetensors), checked against the checksum
        reinforce.json gives and read as untrusted safetensors (foundation.weights)."""
        from foundation.weights import load_safetensors

        path = self.folder / TEXT_TOWER_FILE
        try:
            digest = file_sha256(path)
        except OSError as error:
            raise ReinforceError(f"{path} cannot be read ({error.strerror or error})") from None
        if digest != self.header["teacher"]["text_tower_sha256"]:
            raise ReinforceError(f"{path} is not the file {REINFORCE_FILE} names (sha256 {digest[:12]}, expected "
                                 f"{self.header['teacher']['text_tower_sha256'][:12]})")
        return load_safetensors(path)


def read_reinforcement(folder: str | os.PathLike) -> Reinforcement:
    """`folder`/reinforce.json, read within MAX_REINFORCE_FILE_BYTES from a regular file and validated against
    REINFORCE_SCHEMA; ReinforceError (one line naming the file and the key) otherwise."""
    path = Path(folder) / REINFORCE_FILE
    try:
        header = read_json(path, MAX_REINFORCE_FILE_BYTES, what=REINFORCE_FILE)
    except UserError as error:
        raise ReinforceError(str(error)) from None
    try:
        header = schema.validate(REINFORCE_SCHEMA, header, "reinforce.json")
    except schema.SpecError as error:
        raise ReinforceError(f"{path}: {error}") from None
    return Reinforcement(Path(folder), header)


def header_bytes(header: Mapping[str, Any]) -> bytes:
    """reinforce.json's bytes: keys sorted and indented, so the same settings always write the same file."""
    return (json.dumps(header, indent=2, sort_keys=True) + "\n").encode("utf-8")


def find_reinforcement(train_data: Optional[str]) -> Optional[Reinforcement]:
    """The reinforced set `--train-data` names: its shards' folder holds reinforce.json. None for a TSV, for
    synthetic data and for shards without one; ReinforceError for shards of several folders of which one is
    reinforced (one run reads one teacher's embeddings)."""
    if not train_data or train_data == "synthetic" or train_data.endswith((".csv", ".tsv")):
        return None
    folders = {os.path.dirname(url) for url in expand_urls(train_data) if "://" not in url
               and not url.startswith("pipe:")}
    reinforced = sorted(folder for folder in folders if os.path.exists(os.path.join(folder or ".", REINFORCE_FILE)))
    if not reinforced:
        return None
    if len(folders) > 1:
        raise ReinforceError(f"--train-data {train_data} mixes the reinforced shards of {reinforced[0] or '.'} with "
                             f"shards of other folders: train on one reinforced set at a time")
    reinforcement = read_reinforcement(reinforced[0] or ".")
    if not reinforcement.header["complete"]:
        raise ReinforceError(f"{reinforcement.folder} is an unfinished reinforced set (its run was interrupted): "
                             f"run the same clipcompress reinforce command again to complete it")
    return reinforcement


# --- the teacher's identity ----------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(pretrained: str) -> Dict[str, str]:
    """What names a teacher's weights in reinforce.json: the sha256 of a local file; of a Hugging Face folder
    (hf:DIR), the sha256 of the names and checksums of its files (config, weights, index); else the open_clip
    tag."""
    from compress.models.hf_clip import hf_folder, is_hf_source

    if is_hf_source(pretrained):
        folder = hf_folder(pretrained)
        digest = hashlib.sha256()
        for path in sorted(path for path in folder.iterdir() if path.is_file()):
            digest.update(f"{path.name}\0{file_sha256(path)}\n".encode("utf-8"))
        return {"source": "hf_folder", "sha256": digest.hexdigest()}
    if os.path.exists(pretrained):
        return {"source": "file", "sha256": file_sha256(pretrained)}
    return {"source": "tag", "tag": pretrained}


def check_teacher(reinforcement: Reinforcement, model_name: Optional[str], pretrained: Optional[str],
                  flags: str = "--teacher-model/--teacher-pretrained") -> None:
    """Refuse (one line) a run whose teacher flags name another teacher than the one whose embeddings the set
    stores: another config name, or with weights, other weights (their checksum, or their tag)."""
    stored = reinforcement.describe()
    advice = ("pass --ignore-stored-embeddings to compute this teacher's embeddings online, or train on shards "
              "reinforced with it")
    if model_name and model_name != reinforcement.teacher_name:
        raise ReinforceError(f"{flags} name teacher {model_name}, but {reinforcement.folder} stores the embeddings "
                             f"of {stored}: {advice}")
    if pretrained:
        try:
            given = weights_identity(pretrained)
        except OSError as error:
            raise UserError(f"{pretrained} cannot be read ({error.strerror or error})") from None
        if given != reinforcement.weights:
            which = f"sha256 {given['sha256'][:12]}" if "sha256" in given else f"tag {given['tag']}"
            raise ReinforceError(f"{flags} name weights {pretrained} ({which}), but {reinforcement.folder} stores "
                                 f"the embeddings of {stored}: {advice}")


# --- views ---------------------------------------------------------------------------------------------


def _key_words(key: str) -> List[int]:
    return list(np.frombuffer(hashlib.sha256(key.encode("utf-8")).digest()[:16], dtype="<u4").tolist())


def crop_box(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple:
    """(top, left, height, width) of a RandomResizedCrop of a `width` x `height` image: torchvision's
    rejection sampling (an area fraction in `scale`, a log-uniform aspect ratio in `ratio`, CROP_TRIES tries,
    then the centre crop of the nearest ratio) with numpy's `rng` instead of torch's global generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_views(seed: int, key: str, views: int, width: int, height: int,
               augment: Mapping[str, Any]) -> np.ndarray:
    """(views, 5) int32 of VIEW_FIELDS for the sample `key` of a `width` x `height` image: view v draws from
    numpy's generator seeded by (seed, key, v) alone, so any process, in any order, draws the same views."""
    rows = []
    for view in range(views):
        rng = np.random.default_rng([seed, *_key_words(key), view])
        top, left, h, w = crop_box(rng, width, height, augment["crop_scale"], augment["crop_ratio"])
        rows.append((top, left, h, w, int(rng.random() < augment["flip"])))
    return np.asarray(rows, dtype=VIEWS_DTYPE)


def view_index(seed: int, epoch: int, key: str, views: int) -> int:
    """Which of a sample's `views` a run with --seed `seed` trains on in `epoch`."""
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % views


class ViewMaker:
    """A view's pixels: with `augment`, a stored crop box of the image resized to the teacher's image size
    (bicubic, antialiased, as open_clip's training RandomResizedCrop), flipped when asked, then the teacher's
    normalisation; without, the teacher's eval transform (`get_preprocess` of its spec)."""

    def __init__(self, teacher_spec: Dict[str, Any], augment: Optional[Mapping[str, Any]]):
        from torchvision import transforms

        from compress.models.registry import get_preprocess, preprocess_config

        preprocess = preprocess_config(teacher_spec)
        size = preprocess["image_size"]
        self.size = [size, size] if isinstance(size, int) else list(size)
        self.eval_transform = get_preprocess(teacher_spec)
        self.normalize = transforms.Normalize(preprocess["mean"], preprocess["std"])
        self.augment = dict(augment) if augment is not None else None

    def __call__(self, image, params: Optional[np.ndarray] = None) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if params is None:
            return self.eval_transform(image)
        top, left, height, width, flip = (int(v) for v in params)
        if not (0 <= top and 0 <= left and height >= 1 and width >= 1 and top + height <= image.height
                and left + width <= image.width and flip in (0, 1)):
            raise BadSample(f"stored view {[top, left, height, width, flip]} is not a crop of the "
                            f"{image.width}x{image.height} image")
        crop = TF.resized_crop(image, top, left, height, width, self.size, InterpolationMode.BICUBIC,
                               antialias=True)
        if flip:
            crop = TF.hflip(crop)
        return self.normalize(TF.to_tensor(crop))


def array_bytes(array: np.ndarray) -> bytes:
    """A member's .npy bytes (np.save's: the same array always gives the same bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_array(sample: Dict[str, Any], member: str, dtype: np.dtype, shape: tuple,
               what: Callable[[], str]) -> np.ndarray:
    """The sample's .npy `member`, which must hold exactly `dtype` and `shape` (finite values); BadSample
    otherwise. np.load without pickles: the header is parsed as a literal, within the member's bound."""
    data = sample.get(member)
    if isinstance(data, MemberTooLarge):
        raise BadSample(f"{what()}: {data}")
    if data is None:
        raise BadSample(f"{what()}: no {member} member (not a sample of this reinforced set)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise BadSample(f"{what()}: {member} is not a .npy array ({str(error).splitlines()[0][:100]})") from None
    if array.dtype != dtype or array.shape != shape:
        raise BadSample(f"{what()}: {member} holds {array.dtype} {array.shape}, expected {dtype} {shape}")
    if not np.isfinite(array).all():
        raise BadSample(f"{what()}: {member} holds values that are not finite")
    return array


class StoredViews:
    """The trainer's image transform on a reinforced set (a job's `data_transforms` returns it; get_data then
    decodes shard samples with `decoder`): each sample's image becomes the view `view_index` draws for it, and
    with `embeddings` the sample carries that view's stored teacher embedding (`teacher_image`) and the
    caption's (`teacher_text`), float32 and not normalised, which BatchCollator stacks into the batch. Called
    on a plain image it is the teacher's eval transform."""

    def __init__(self, reinforcement: Reinforcement, embeddings: bool):
        self.reinforcement, self.embeddings = reinforcement, embeddings
        self.maker = ViewMaker(reinforcement.teacher_spec, reinforcement.augment)

    def __call__(self, image) -> torch.Tensor:
        return self.maker(image)

    def decoder(self, seed: int, rank: int, allow_empty_captions: bool = False,
                max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> "ViewDecoder":
        return ViewDecoder(self, seed, rank, allow_empty_captions, max_pixels)

    def decode(self, sample: Dict[str, Any], seed: int, epoch: int, allow_empty_captions: bool = False,
               max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS) -> Dict[str, Any]:
        """decode_shard_sample's result for the view drawn in `epoch`, plus the stored embeddings; {"bad": why}
        for a sample without them or whose members do not have the shapes reinforce.json says."""
        what = lambda: f"shard sample {sample.get('__key__')} ({sample.get('__url__')})"  # noqa: E731
        info = self.reinforcement
        views = info.views
        view = view_index(seed, epoch, str(sample.get("__key__")), views)
        try:
            params = (read_array(sample, VIEWS_MEMBER, VIEWS_DTYPE, (views, len(VIEW_FIELDS)), what)[view]
                      if info.augment is not None else None)
            if self.embeddings:
                image_embedding = read_array(sample, IMAGE_EMBEDDING_MEMBER, info.dtype, (views, info.embed_dim),
                                             what)[view]
                text_embedding = read_array(sample, TEXT_EMBEDDING_MEMBER, info.dtype, (info.embed_dim,), what)
        except BadSample as error:
            return {"bad": str(error)}
        decoded = decode_shard_sample(sample, lambda image: self.maker(image, params), allow_empty_captions,
                                      max_pixels)
        if "bad" not in decoded and self.embeddings:
            decoded["teacher_image"] = torch.from_numpy(image_embedding.astype(np.float32))
            decoded["teacher_text"] = torch.from_numpy(text_embedding.astype(np.float32))
        return decoded


class ViewDecoder(EpochSeeded):
    """The shard pipeline's decoding stage on a reinforced set: `StoredViews.decode` of each sample, in the
    epoch the pipeline's shared position says (the stage is seeded per epoch like the shuffles)."""

    def __init__(self, views: StoredViews, seed: int, rank: int, allow_empty_captions: bool,
                 max_pixels: Optional[int]):
        super().__init__(seed, rank, "reinforce-view")
        self.views, self.allow_empty_captions, self.max_pixels = views, allow_empty_captions, max_pixels

    def __call__(self, samples):
        epoch = self.epoch
        for sample in samples:
            yield self.views.decode(sample, self.seed, epoch, self.allow_empty_captions, self.max_pixels)


# --- caption embeddings by row (a teacher cache's rows) ------------------------------------------------


class StoredCaptionRows:
    """A reinforced set's caption embeddings by row index (each sample's `idx`), for a cache of the teacher's
    embeddings of a TSV's rows (ProtoRKD's): `lookup(row)` for rows asked in increasing order reads the shards
    forward, in name order (a TSV's reinforced shards hold its rows in order), and reads only the caption,
    idx and caption-embedding members (the images are seeked past). A row the set does not hold there (a bad
    sample it skipped, a row out of order) gives None: its caller computes it."""

    def __init__(self, reinforcement: Reinforcement):
        self.reinforcement = reinforcement
        self.shards = sorted(reinforcement.folder.glob("*.tar"))
        self._rows = self._read()
        self._current: Optional[Tuple[int, str, np.ndarray]] = None
        self._ended = False

    def lookup(self, row: int) -> Optional[Tuple[str, np.ndarray]]:
        """(caption, float32 embedding) of `row`, or None."""
        while not self._ended and (self._current is None or self._current[0] < row):
            self._current = next(self._rows, None)
            self._ended = self._current is None
        if self._current is not None and self._current[0] == row:
            return self._current[1], self._current[2]
        return None

    def _read(self) -> Iterator[Tuple[int, str, np.ndarray]]:
        wanted = {"txt": MAX_CAPTION_BYTES, "idx": 64, TEXT_EMBEDDING_MEMBER: MAX_ARRAY_MEMBER_BYTES}
        for path in self.shards:
            sample: Dict[str, Any] = {}
            with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:", tarinfo=_BoundedTarInfo) as tar:
                for member in tar:
                    tar.members = []  # the headers already read are not kept
                    key, suffix = _split_name(member.name)
                    if key != sample.get("__key__"):
                        yield from self._parsed(sample)
                        sample = {"__key__": key, "__url__": str(path)}
                    if member.isreg() and suffix in wanted and member.size <= wanted[suffix]:
                        sample[suffix] = tar.extractfile(member).read()
                yield from self._parsed(sample)

    def _parsed(self, sample: Dict[str, Any]) -> Iterator[Tuple[int, str, np.ndarray]]:
        if "idx" not in sample or "txt" not in sample:
            return
        what = lambda: f"shard sample {sample['__key__']} ({sample['__url__']})"  # noqa: E731
        try:
            row = _sample_index(sample, what)
            caption = sample["txt"].decode("utf-8")
            embedding = read_array(sample, TEXT_EMBEDDING_MEMBER, self.reinforcement.dtype,
                                   (self.reinforcement.embed_dim,), what)
        except (BadSample, UnicodeDecodeError):
            return  # its row is computed instead
        yield row, caption, embedding.astype(np.float32)
