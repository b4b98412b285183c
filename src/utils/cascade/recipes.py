"""Cascade levels that say how they are made, built on first use and cached.

A level of an experiment config is one of

    {checkpoint = "student.pt"}                         one of our checkpoints (a distilled student, any CLIP)
    {model = "ViT-B-32", pretrained = "/models/b32.pt"} a stock open_clip model and its weights
    {token_mask = {drop = 0.5, seed = 0}}               FLIP token masking of the large model (casCLIP "flip")
    {head_sensitivity = {num_heads = 22}}               head pruning by sensitivity of the large model
    {head_sensitivity = {fraction = 0.153}}             … of this share of its heads (casCLIP's 22 of 144)
    {fisher = {mac_constraint = 0.65}}                  retraining-free Fisher pruning of the large model
    {distill = {student = "mobilenet_v3_small", epochs = 1}}   a student distilled from the large model by the
                                                        trainer's `--job distill` (casCLIP "distilling")

A recipe's parameters are checked with the schema language of compress.models.spec (`RECIPE_SCHEMAS`): a
bad one is one line that names it, shows the value and says what the parameter means.

The large model is the config's last level, which must be a checkpoint or a stock model. The pruning recipes
call the compress.ops functions on calibration batches (utils.posttrain.calibration_batches: a training TSV or a
COCO / Flickr30k eval root, `[calibration]`); the distill recipe runs `python -m training.main --job distill`
with the large model as teacher on `[distill] train_data`. Each result is a run folder under the cache
(`[cache] dir`, default logs/cascade_levels) named by the recipe kind and a key: the SHA-256 of the recipe
with its defaults filled in, of the source checkpoint's hash and of the data it reads, so changing any of
them builds anew and an unchanged recipe is reused. `recipe.json`, written last, marks a finished build.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from compress.models.spec import (
    Check,
    boolean,
    choice,
    explained,
    integer,
    list_of,
    number,
    optional,
    record,
    text,
    validate,
)
from foundation.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from foundation.errors import UserError
from utils.cascade.search import LevelSource, file_sha256

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "logs/cascade_levels"
RECIPE_FILE = "recipe.json"


@dataclass
class Param:
    default: Any  # REQUIRED: must be given
    check: Check  # in compress.models.spec's schema language
    meaning: str  # said when the value is missing or refused


REQUIRED = object()
TOWERS = list_of(choice("image", "text"), 1)

# every recipe's parameters: default, check, meaning
RECIPES: Dict[str, Dict[str, Param]] = {
    "token_mask": {
        "drop": Param(REQUIRED, number(0.0, 1.0, hi_excluded=True), "fraction of patch tokens dropped, 0 <= p < 1"),
        "seed": Param(0, integer(0), "seed of the per-image token choice"),
    },
    "head_sensitivity": {
        "num_heads": Param(None, optional(integer(0)), "heads to remove (or give fraction)"),
        "fraction": Param(None, optional(number(0.0, 1.0)), "share of the chosen towers' heads to remove"),
        "heads_per_round": Param(1, integer(1), "heads removed before the scores are recomputed"),
        "towers": Param(["image"], TOWERS, "towers whose heads are pruned (image, text)"),
        "normalize_per_layer": Param(True, boolean, "rank per-layer L2-normalised scores"),
    },
    "fisher": {
        "mac_constraint": Param(REQUIRED, number(0.0, 1.0), "share of the chosen blocks' head+MLP MACs kept"),
        "towers": Param(["image"], TOWERS, "towers whose blocks are pruned (image, text)"),
        "rearrange": Param(True, boolean, "rearrange the masks within each layer"),
        "rescale": Param(True, boolean, "least-squares rescaling of the kept units"),
        "damping": Param(1e-4, number(0.0, 1.0), "ridge damping of the rescaling"),
    },
    "distill": {
        "student": Param(REQUIRED, text(1), "the student: a torchvision architecture or an open_clip ViT config"),
        "epochs": Param(1, integer(1), "epochs of the distill run"),
        "batch_size": Param(64, integer(1), "batch size"),
        "lr": Param(1e-3, number(0.0, 10.0), "peak learning rate"),
        "warmup": Param(20, integer(0), "warm-up steps"),
        "loss": Param("cosine", text(1), "--distill-loss (casCLIP: cosine)"),
        "dataset_size": Param(None, optional(integer(1)), "use only the first N rows of the training data"),
        "student_image_size": Param(None, optional(integer(1)), "side the student sees"),
        "freeze_backbone": Param(False, boolean, "train only the projection head (casCLIP)"),
        "student_pretrained": Param(None, optional(text(1)), "a local torchvision state dict for the backbone"),
        "workers": Param(1, integer(0), "data loader workers"),
        "seed": Param(0, integer(0), "the trainer's --seed"),
        "args": Param([], list_of(text()), "more trainer flags, as a list of strings"),
    },
}


def _schema(params: Dict[str, Param]) -> Check:
    """A recipe's table: its parameters, each refusal saying what the parameter means."""
    checks = {name: explained(param.check, param.meaning) for name, param in params.items()}
    return record({name: check for name, check in checks.items() if params[name].default is REQUIRED},
                  {name: check for name, check in checks.items() if params[name].default is not REQUIRED},
                  unknown=f"unknown parameter (known: {', '.join(params)})")


RECIPE_SCHEMAS: Dict[str, Check] = {kind: _schema(params) for kind, params in RECIPES.items()}


def recipe_kind(entry: Dict[str, Any]) -> Optional[str]:
    kinds = [kind for kind in RECIPES if kind in entry]
    if len(kinds) > 1:
        raise UserError(f"a level names several recipes ({', '.join(kinds)}): one per level")
    return kinds[0] if kinds else None


def normalize_recipe(kind: str, given: Any) -> Dict[str, Any]:
    """The recipe's parameters with defaults filled in; one line naming the parameter otherwise."""
    if not isinstance(given, dict):
        raise UserError(f"{kind}: expected a table of parameters, e.g. {kind} = {{...}}")
    given = validate(RECIPE_SCHEMAS[kind], given, kind)
    params = {name: given.get(name, param.default) for name, param in RECIPES[kind].items()}
    if kind == "head_sensitivity" and (params["num_heads"] is None) == (params["fraction"] is None):
        raise UserError("head_sensitivity: give exactly one of num_heads and fraction")
    return params


def describe(kind: str, params: Dict[str, Any]) -> str:
    """A short name for tables: "token_mask drop=0.5", "distill mobilenet_v3_small", …"""
    main = {"token_mask": f"drop={params.get('drop')}",
            "head_sensitivity": (f"{params.get('num_heads')} heads" if params.get("num_heads") is not None
                                 else f"{params.get('fraction')} of heads"),
            "fisher": f"mac={params.get('mac_constraint')}",
            "distill": str(params.get("student"))}[kind]
    return f"{kind} {main}"


def data_identity(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """What a recipe's data is, for its key: a table's path and hash, or an eval folder's path and the hash of
    the caption file it is read from."""
    if path is None:
        return None
    from eval.data import find_coco_root, find_flickr_root

    source = Path(path)
    if source.is_file():
        return {"path": str(source.resolve()), "sha256": file_sha256(source)}
    coco, flickr = find_coco_root(source), find_flickr_root(source)
    if coco is not None:
        index_file = coco / "annotations" / "captions_val2017.json"
    elif flickr is not None:
        karpathy = [p for p in [flickr / "dataset_flickr30k.json", *sorted(flickr.glob("*karpathy*.json"))]
                    if p.is_file()]
        index_file = karpathy[0] if karpathy else flickr / "results.csv"
    else:
        raise UserError(f"{path}: neither a TSV/CSV nor an eval folder with coco2017/ or flickr30k/ (flickr30/)")
    return {"path": str(source.resolve()), "index": str(index_file.resolve()), "sha256": file_sha256(index_file)}


@dataclass
class BuildSettings:
    """What a recipe build reads besides its parameters (the config's [calibration], [distill], [cache])."""

    cache_dir: str = DEFAULT_CACHE_DIR
    calib_data: Optional[str] = None
    calib_batches: int = 8
    calib_batch_size: int = 32
    calib_seed: int = 0
    train_data: Optional[str] = None
    device: str = "cpu"
    quiet: bool = True
    built: List[str] = field(default_factory=list)  # run folders built by this process (not taken from the cache)


def _calibration(kind: str, settings: BuildSettings) -> Optional[Dict[str, Any]]:
    if kind not in ("head_sensitivity", "fisher"):
        return None
    if not settings.calib_data:
        raise UserError(f"the {kind} recipe needs calibration data: [calibration] data = TRAIN.tsv or an eval "
                        "root (or --calib-data)")
    return {"data": data_identity(settings.calib_data), "batches": settings.calib_batches,
            "batch_size": settings.calib_batch_size, "seed": settings.calib_seed}


def recipe_key(kind: str, params: Dict[str, Any], large: LevelSource, settings: BuildSettings) -> str:
    data: Any = _calibration(kind, settings)
    if kind == "distill":
        train_data = _train_data(settings)
        data = data_identity(train_data)
    material = {"kind": kind, "params": params, "source": large.identity(), "data": data}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def _train_data(settings: BuildSettings) -> str:
    if not settings.train_data:
        raise UserError("the distill recipe needs training images: [distill] train_data = TRAIN.tsv "
                        "(or --train-data)")
    return settings.train_data


def build_level(entry: Dict[str, Any], large: LevelSource, settings: BuildSettings) -> LevelSource:
    """The level `entry` describes: a recipe is built (or found in the cache) from `large`."""
    kind = recipe_kind(entry)
    if kind is None:
        return plain_level(entry)
    extra = sorted(set(entry) - {kind})
    if extra:
        raise UserError(f"a {kind} level takes no {extra[0]!r} (the recipe's parameters go inside {kind} = {{...}})")
    params = normalize_recipe(kind, entry[kind])
    key = recipe_key(kind, params, large, settings)
    folder = Path(settings.cache_dir) / f"{kind}-{key[:16]}"
    label = describe(kind, params)
    done = folder / RECIPE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        checkpoint = folder / record["checkpoint"]
        if record.get("key") == key and checkpoint.is_file():
            log.info("%s: cached in %s", label, folder)
            return LevelSource(checkpoint=str(checkpoint), label=label)
    started = time.perf_counter()
    log.warning("building level %s from %s into %s", label, large.name(), folder)
    builder = _build_distill if kind == "distill" else _build_transform
    checkpoint = builder(kind, params, large, settings, folder)
    record = {"kind": kind, "params": params, "key": key, "source": large.identity(),
              "checkpoint": str(checkpoint.relative_to(folder)), "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_bytes(done, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    settings.built.append(str(folder))
    return LevelSource(checkpoint=str(checkpoint), label=label)


def plain_level(entry: Dict[str, Any]) -> LevelSource:
    known = {"checkpoint", "model", "pretrained"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise UserError(f"level key {unknown[0]!r}: a level is checkpoint = …, model = … (+ pretrained = …), or one "
                        f"recipe of {', '.join(RECIPES)}")
    if entry.get("checkpoint"):
        if entry.get("model"):
            raise UserError("a level is checkpoint = … (ours) or model = … with pretrained = … (stock), not both")
        return LevelSource(checkpoint=str(entry["checkpoint"]))
    if entry.get("model"):
        return LevelSource(model=str(entry["model"]), pretrained=entry.get("pretrained"))
    raise UserError("a level needs checkpoint = …, model = … or a recipe")


# --- builds ----------------------------------------------------------------------------------------------


def _load_large(large: LevelSource):
    from utils.posttrain import load_input_model

    if large.checkpoint:
        return load_input_model(None, large.checkpoint)
    if not (large.pretrained and os.path.isfile(large.pretrained)):
        raise UserError(f"recipes need the large model's weights as a local file; {large.name()} has none")
    return load_input_model(large.model, large.pretrained)


def _build_transform(kind: str, params: Dict[str, Any], large: LevelSource, settings: BuildSettings,
                     folder: Path) -> Path:
    from compress.models.compact_clip import clone, compact_blocks
    from compress.ops.fisher_prune import fisher_prune
    from compress.ops.heads import prune_heads_by_sensitivity
    from compress.ops.token_mask import mask_tokens
    from utils.posttrain import calibration_batches

    model = _load_large(large).to(settings.device)
    try:
        if kind == "token_mask":
            result = mask_tokens(model, params["drop"], params["seed"])
        else:
            batches = calibration_batches(settings.calib_data, model.model_spec, settings.calib_batches,
                                          settings.calib_batch_size, seed=settings.calib_seed)
            if kind == "head_sensitivity":
                num_heads = params["num_heads"]
                if num_heads is None:
                    available = sum(block.attn.num_heads for _, block in compact_blocks(clone(model), params["towers"]))
                    num_heads = round(params["fraction"] * available)
                result = prune_heads_by_sensitivity(model, num_heads, batches, towers=params["towers"],
                                                    heads_per_round=params["heads_per_round"],
                                                    normalize_per_layer=params["normalize_per_layer"])
            else:
                result = fisher_prune(model, batches, params["mac_constraint"], towers=params["towers"],
                                      rearrange_masks=params["rearrange"], rescale=params["rescale"],
                                      damping=params["damping"])
    except ValueError as error:  # a parameter the model cannot satisfy (more heads than it has, …)
        raise UserError(f"{describe(kind, params)}: {error}") from None
    checkpoint = folder / "checkpoints" / "epoch_0.pt"
    save_checkpoint({"epoch": 0, "step": 0, "name": folder.name, "job": f"cascade recipe {kind}",
                     "model_spec": result.model_spec,
                     "state_dict": {k: v.detach().cpu() for k, v in result.state_dict().items()},
                     "recipe": {kind: params}, "source": large.identity()}, checkpoint)
    return checkpoint


def teacher_flags(large: LevelSource) -> List[str]:
    """--teacher-model / --teacher-pretrained for the large model: a dense open_clip CLIP."""
    if large.checkpoint:
        spec = load_checkpoint(large.checkpoint).get("model_spec") or {}
        if spec.get("kind") != "open_clip":
            raise UserError(f"the distill recipe's teacher (the large model, {large.name()}) must be a dense open_clip "
                            f"CLIP; it is a {spec.get('kind')!r}")
        return ["--teacher-model", spec["model"], "--teacher-pretrained", os.path.abspath(large.checkpoint)]
    return ["--teacher-model", str(large.model), "--teacher-pretrained", str(large.pretrained)]


def _build_distill(kind: str, params: Dict[str, Any], large: LevelSource, settings: BuildSettings,
                   folder: Path) -> Path:
    cmd = [sys.executable, "-m", "training.main", "--job", "distill", *teacher_flags(large),
           "--student", params["student"], "--distill-loss", params["loss"], "--train-data", _train_data(settings),
           "--epochs", str(params["epochs"]), "--batch-size", str(params["batch_size"]), "--lr", str(params["lr"]),
           "--warmup", str(params["warmup"]), "--workers", str(params["workers"]), "--seed", str(params["seed"]),
           "--device", settings.device, "--logs", str(folder.parent), "--name", folder.name, "--report-to", "none",
           "--log-level", "warning" if settings.quiet else "info"]
    for flag, name in (("--dataset-size", "dataset_size"), ("--student-image-size", "student_image_size"),
                       ("--student-pretrained", "student_pretrained")):
        if params[name] is not None:
            cmd += [flag, str(params[name])]
    if params["freeze_backbone"]:
        cmd.append("--freeze-backbone")
    if (folder / "params.txt").exists():  # an interrupted build: the trainer continues it
        cmd += ["--resume", "latest"]
    cmd += params["args"]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the trainer comes from this source tree
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log.info("distilling: %s", " ".join(cmd[1:]))
    result = subprocess.run(cmd, env=env)
    checkpoint = folder / "checkpoints" / f"epoch_{params['epochs']}.pt"
    if result.returncode != 0 or not checkpoint.is_file():
        raise UserError(f"the distill recipe's training run failed (exit {result.returncode}); its log: "
                        f"{folder / 'out.log'}")
    return checkpoint
