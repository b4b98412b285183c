"""Prompt templates and class names for zero-shot classification.

A template is a format string with one `{}` (or `{c}`) for the class name. The ImageNet templates and class
names are CLIP's (80 templates, 1000 curated names), as shipped in open_clip's wheel. The zero-shot sets of
ProtoCLIP's eval layout (CLOOB's copies: birdsnap, country211, flowers102, gtsrb, stanford_cars, ucf101) have
their class names, in class-index order, and CLIP's templates for them in `zeroshot_sets.json` beside this
file (data, not code).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

# CLIP's 80 ImageNet templates (open_clip stores them as lambdas; we keep plain format strings).
IMAGENET_TEMPLATES: List[str] = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]

# CLIP's CIFAR-10 / CIFAR-100 templates (CLIP repo, data/prompts.md).
CIFAR_TEMPLATES: List[str] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]

# CIFAR's class names in class-index order, as CLIP published them with its templates (torchvision's names with
# `_` as a space): an image folder of CIFAR (cifar100/test/<class>/) gets the names a pickle-read set gets.
CIFAR10_CLASSNAMES: List[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                 "truck"]
CIFAR100_CLASSNAMES: List[str] = [
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange",
    "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
]

# CLIP's STL-10 templates.
STL10_TEMPLATES: List[str] = ["a photo of a {}.", "a photo of the {}."]

# The generated corpus (shapes on plain backgrounds); also the default for any other ImageFolder set.
SHAPES_TEMPLATES: List[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a {} on a plain background.",
    "{}s.",
    "an image with a {}.",
]

# {dataset: {"classnames": [...], "templates": [...]}} of ProtoCLIP's zero-shot sets
ZEROSHOT_SETS: Dict[str, Dict[str, List[str]]] = {
    name: entry for name, entry in json.loads((Path(__file__).with_name("zeroshot_sets.json")).read_text(
        encoding="utf-8")).items() if not name.startswith("_")}

TEMPLATES_BY_DATASET: Dict[str, List[str]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "cifar10": CIFAR_TEMPLATES,
    "cifar100": CIFAR_TEMPLATES,
    "stl10": STL10_TEMPLATES,
    "shapes": SHAPES_TEMPLATES,
    **{name: entry["templates"] for name, entry in ZEROSHOT_SETS.items()},
}
DEFAULT_TEMPLATES = SHAPES_TEMPLATES


def templates_for(dataset_name: str) -> List[str]:
    return TEMPLATES_BY_DATASET.get(dataset_name, DEFAULT_TEMPLATES)


def classnames_for(dataset_name: str) -> Optional[List[str]]:
    """The built-in class names of a known set, in class-index order (ImageNet: sorted-wnid order); None
    for any other set."""
    if dataset_name == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    if dataset_name in ("cifar10", "cifar100"):
        return list(CIFAR10_CLASSNAMES if dataset_name == "cifar10" else CIFAR100_CLASSNAMES)
    entry = ZEROSHOT_SETS.get(dataset_name)
    return list(entry["classnames"]) if entry else None


def fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", "{}").format(classname)


__all__ = [
    "CIFAR100_CLASSNAMES",
    "CIFAR10_CLASSNAMES",
    "CIFAR_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "IMAGENET_CLASSNAMES",
    "IMAGENET_TEMPLATES",
    "SHAPES_TEMPLATES",
    "STL10_TEMPLATES",
    "ZEROSHOT_SETS",
    "classnames_for",
    "fill_template",
    "templates_for",
]
