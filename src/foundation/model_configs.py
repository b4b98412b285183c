"""The project's small open_clip model configs (JSON files beside this module).

`clipc-vit-t2-64`  64-px, 2-layer ViT CLIP (width 128) — the demo and most tests.
`clipc-vit-s4-64`  64-px, 4-layer ViT CLIP (width 256) — a bigger demo model, worth pruning.
`clipc-vit-t2-32`  32-px, 2-layer ViT CLIP (width 64) — the fastest, for distributed/resume tests.

They are registered into open_clip's config registry, so `open_clip.create_model(name)` and every
open_clip tool accept these names like their own.
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
