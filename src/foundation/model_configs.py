"""The project's small open_clip model configs (JSON files beside this module).

`clipc-vit-t2-64`  64-px, 2-layer ViT CLIP (width 128) — the demo and most tests.
`clipc-vit-s4-64`  64-px, 4-layer ViT CLIP (width 256) — a bigger demo model, worth pruning.
`clipc-vit-t2-32`  32-px, 2-layer ViT CLIP (width 64) — the fastest, for distributed/resume tests.

They are registered into open_clip's config registry, so `open_clip.create_model(name)` and every
open_clip tool accept these names like their own.

A config may carry its image preprocessing beside the architecture: `"preprocess_cfg": {"mean": [...],
"std": [...], "interpolation": "bicubic", "resize_mode": "squash"}` (open_clip's PreprocessCfg keys, the key
open_clip's own hub configs put beside `model_cfg`); `config_preprocess_cfg(name)` reads it.
"""
from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_registered = False


def register_model_configs() -> None:
    """Add our JSON configs to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    if _INLINE:  # open_clip rebuilds its registry from files whenever a config path is added: re-add ours
        from open_clip import factory

        for name, config in _INLINE.items():
            factory._MODEL_CONFIGS.setdefault(name, config)
    _move_preprocess_cfgs()


# open_clip's model classes take only architecture keys, so a config's `preprocess_cfg` leaves the registry
# (again after every rescan of the config files, which open_clip.add_model_config does) and is kept here.
_PREPROCESS: dict = {}


def _move_preprocess_cfgs() -> None:
    from open_clip import factory

    for name, config in factory._MODEL_CONFIGS.items():
        if "preprocess_cfg" in config:
            _PREPROCESS[name] = config.pop("preprocess_cfg")


def config_preprocess_cfg(name: str) -> dict:
    """The image preprocessing that config `name` itself carries ({} when it carries none)."""
    import copy

    register_model_configs()
    return copy.deepcopy(_PREPROCESS.get(name, {}))


# --- configs that come with a checkpoint or a Hugging Face folder, not with a file of ours --------------
# A model converted from a Hugging Face CLIPModel folder may have an architecture no config file describes.
# Its config is registered under a name derived from its content ("hf-clip-" + hash), so a name always
# means one architecture and no spec can redefine a config that exists; checkpoints carry the config itself
# (`model_cfg` in the spec) and register it again when loaded (compress.models.spec).

INLINE_PREFIX = "hf-clip-"
_INLINE: dict = {}


def inline_config_name(config: dict) -> str:
    """The registry name of an open_clip config that no file describes: its content's hash."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()
    return INLINE_PREFIX + digest[:12]


def register_inline_config(config: dict) -> str:
    """Add `config` to open_clip's registry under `inline_config_name(config)` (idempotent); the name."""
    import copy

    from open_clip import factory

    register_model_configs()
    name = inline_config_name(config)
    _INLINE[name] = copy.deepcopy(config)
    factory._MODEL_CONFIGS[name] = copy.deepcopy(config)
    return name


def inline_config(name: str):
    """The config registered under an inline name (None for a name of a config file)."""
    import copy

    return copy.deepcopy(_INLINE.get(name))
