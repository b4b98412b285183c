"""Generate a small, deterministic, captioned-picture corpus for offline CLIP work.

Why this exists
---------------
The real pipeline trains on CC3M, evaluates retrieval on COCO captions and
zero-shot classification on ImageFolder datasets. None of that is reachable
offline, and a real CLIP would not learn anything in two CPU minutes anyway.
This module draws a synthetic stand-in with the *same on-disk layout*, whose
content is simple enough that a tiny CLIP trained for ~2 minutes on a CPU gets
zero-shot and retrieval numbers far above chance.

What a picture is
-----------------
Each picture shows 1-3 objects of one visual class "<colour> <shape>"
(6 colours x 6 shapes = 36 classes, see ``COLOURS`` and ``SHAPES``), drawn with
PIL. Besides the class, a scene varies in:

* size: small or large objects;
* position (single objects only): a 3x3 grid (top left ... centre ... bottom right);
* count: one, two or three objects of the class, scattered without overlap;
* background: white, grey, black, noisy grey or a grey gradient.

Mild jitter (position, radius, a few degrees of rotation, colour, pixel noise,
JPEG quality 85-95) keeps two pictures of the same description from being
identical.

What a caption is
-----------------
Captions come from templates with paraphrases and a small synonym set
("two large red circles on a grey background", "a picture showing 2 big red
circles", "red circles, two of them, large"), so a caption is not a lookup key.
Every caption names the colour and the shape (canonical word most of the time,
a synonym otherwise) and usually some of size, count, position and background.
Colour and shape vocabularies never overlap with background words, so the
class words in a caption are unambiguous.

Output layout (other code reads it, keep it exact)
--------------------------------------------------
::

    DIR/train.tsv                       filepath<TAB>title, filepath relative to DIR
    DIR/images/train/000000123.jpg      training images
    DIR/shards/000000.tar ...           the same training samples as webdataset
                                        shards: <key>.jpg, <key>.txt, <key>.idx
                                        (key = 9-digit row index in train.tsv)
    DIR/shards/sizes.json               shard file name -> sample count (open_clip)
    DIR/eval/coco2017/val2017/<12-digit id>.jpg
    DIR/eval/coco2017/annotations/captions_val2017.json   COCO captions format,
                                        5 different captions per image
    DIR/eval/shapes/{train,test}/<colour>_<shape>/<n>.jpg  ImageFolder set
    DIR/corpus.json                     summary: sizes, seed, classes, version

Determinism
-----------
Every sample is generated from ``np.random.default_rng([seed, split_id,
index, stream])`` alone, so the output is byte-identical whatever the number of
workers or the order of generation. Each split (train, COCO eval, ImageFolder
train/test) has its own split id, so eval pictures never repeat train ones.
Scene content, layout jitter and caption wording use separate streams, so
editing the caption templates does not change any image.

Usage
-----
``clipcompress corpus --out DIR [--train-size 20000] [--eval-size 1000]
[--image-size 64] [--seed 0] [--shard-size 1000] [--workers 1]``

The corpus is built in a sibling temporary directory and renamed into place at
the end, so a crash never leaves a half-written corpus behind.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset
from PIL import Image, ImageDraw
from tqdm import tqdm

CORPUS_VERSION = 1

# Split ids are part of every sample's RNG seed; distinct ids keep the splits
# disjoint. Never renumber them: that would silently change every corpus.
SPLIT_IDS = {"train": 0, "coco": 1, "shapes_train": 2, "shapes_test": 3, "distinct": 4}

# RNG streams inside one sample, so that e.g. caption edits leave images alone.
STREAM_SCENE, STREAM_LAYOUT, STREAM_CAPTION = 0, 1, 2

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

# Saturated, hue-separated colours (roughly 0, 30, 55, 130, 225, 280 degrees);
# none is grey-ish, so none can be confused with a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 10),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (150, 50, 200),
}
# Used for a minority of captions only: the zero-shot prompts use the
# canonical word, so it must stay the dominant one.
COLOUR_SYNONYMS: dict[str, list[str]] = {
    "red": ["scarlet"],
    "purple": ["violet"],
}

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
# (singular, plural) for the canonical word first, then synonyms.
SHAPE_WORDS: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("disc", "discs"), ("dot", "dots")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
}
SYNONYM_PROBABILITY = 0.15

CLASS_NAMES = [f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES]

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
COUNT_WORDS = {1: ["a", "one", "a single"], 2: ["two", "2", "a pair of"], 3: ["three", "3", "a group of three"]}
COUNT_ALONE = {2: ["two", "2"], 3: ["three", "3"]}

# Rows and columns of the 3x3 position grid, as fractions of the image side.
GRID_FRACTIONS = (0.23, 0.5, 0.77)
ROWS = ["top", "middle", "bottom"]
COLUMNS = ["left", "centre", "right"]
VERTICAL_WORDS = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}


@dataclass(frozen=True)
class Background:
    name: str
    grey_range: tuple[int, int]  # base grey level, drawn uniformly
    texture: str  # "plain", "noise" or "gradient"
    adjectives: tuple[str, ...]


# "plain" is there because zero-shot prompts say "a {} on a plain background".
BACKGROUNDS = [
    Background("white", (225, 250), "plain", ("white", "light", "plain", "plain white")),
    Background("grey", (110, 150), "plain", ("grey", "gray", "plain", "plain grey")),
    Background("black", (5, 35), "plain", ("black", "dark", "plain", "plain black")),
    Background("noisy", (90, 170), "noise", ("noisy", "speckled", "grainy")),
    Background("gradient", (40, 220), "gradient", ("gradient", "shaded", "fading")),
]

# --------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """The description of one picture: what the captions are allowed to say."""

    colour: str
    shape: str
    count: int
    size: str  # "small" | "large"
    position: tuple[str, str] | None  # (row, column); None when count > 1
    background: Background

    @property
    def class_name(self) -> str:
        return f"{self.colour}_{self.shape}"


def sample_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index, stream])


def sample_scene(rng: np.random.Generator, class_index: int | None = None) -> Scene:
    """Draw a scene description; ``class_index`` pins the class (ImageFolder set)."""
    if class_index is None:
        class_index = int(rng.integers(len(CLASS_NAMES)))
    colour, shape = CLASS_NAMES[class_index].split("_")
    # Half the pictures hold a single object: singular class names are what
    # zero-shot prompts use ("a photo of a red circle").
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.25, 0.25]))
    size = "small" if rng.random() < 0.5 else "large"
    position = None
    if count == 1:
        position = (ROWS[int(rng.integers(3))], COLUMNS[int(rng.integers(3))])
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(colour, shape, count, size, position, background)


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------

# Draw at twice the resolution and downsample: anti-aliased edges for free.
SUPERSAMPLE = 2
# Object radius as a fraction of the image side.
RADIUS_FRACTION = {"small": (0.07, 0.09), "large": (0.15, 0.18)}
# Shapes reach up to this multiple of their nominal radius (triangle, star).
BOUNDING_FACTOR = 1.2
MAX_ROTATION_DEGREES = 10  # small, so a square never looks like a diamond


def _regular_star(points: int, outer: float, inner: float) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    return vertices


def _plus(half_width: float, arm: float) -> list[tuple[float, float]]:
    w, a = half_width, arm
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]


# Unit polygons (y grows downwards, like PIL), sized so the shapes have
# similar visual weight at the same nominal radius.
UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    # Elongated, so it differs from a (slightly rotated) square at any size.
    "diamond": [(0.0, -1.15), (0.72, 0.0), (0.0, 1.15), (-0.72, 0.0)],
    "triangle": [(0.0, -1.2), (1.04, 0.6), (-1.04, 0.6)],
    "star": _regular_star(5, outer=1.2, inner=0.5),
    "cross": _plus(half_width=0.34, arm=1.0),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        return
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    vertices = [
        (cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a))
        for x, y in UNIT_POLYGONS[shape]
    ]
    draw.polygon(vertices, fill=255)


def _layout(scene: Scene, image_size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Object centres and radii (pixels): the grid cell for one object,
    non-overlapping random spots for several."""
    low, high = RADIUS_FRACTION[scene.size]
    radii = [rng.uniform(low, high) * image_size for _ in range(scene.count)]
    if scene.count == 1:
        row, column = scene.position
        jitter = 0.04 * image_size
        cx = GRID_FRACTIONS[COLUMNS.index(column)] * image_size + rng.uniform(-jitter, jitter)
        cy = GRID_FRACTIONS[ROWS.index(row)] * image_size + rng.uniform(-jitter, jitter)
        reach = radii[0] * BOUNDING_FACTOR + 1
        cx = min(max(cx, reach), image_size - reach)
        cy = min(max(cy, reach), image_size - reach)
        return [(cx, cy, radii[0])]

    # Rejection sampling; three large objects may not fit, so shrink and retry
    # rather than let them overlap (the count must stay visible).
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            radius = radii[len(placed)]
            reach = radius * BOUNDING_FACTOR + 1
            cx, cy = rng.uniform(reach, image_size - reach, size=2)
            if all(math.hypot(cx - x, cy - y) >= reach + r * BOUNDING_FACTOR + 1 for x, y, r in placed):
                placed.append((float(cx), float(cy), radius))
                if len(placed) == scene.count:
                    return placed
        radii = [r * 0.9 for r in radii]


def _background(background: Background, image_size: int, rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(*background.grey_range)
    if background.texture == "plain":
        pixels = np.full((image_size, image_size, 3), grey, dtype=np.float32)
    elif background.texture == "noise":
        pixels = grey + rng.normal(0.0, 22.0, (image_size, image_size, 3)).astype(np.float32)
    else:  # gradient: a linear grey ramp in a random direction
        other = rng.uniform(*background.grey_range)
        angle = rng.uniform(0, 2 * math.pi)
        coords = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
        ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None] + 0.5
        ramp = np.clip(ramp, 0.0, 1.0)
        pixels = np.repeat((grey + (other - grey) * ramp)[:, :, None], 3, axis=2)
    # A faint warm/cool tint per picture, so backgrounds are not pure greys.
    return pixels + rng.uniform(-6, 6, size=3).astype(np.float32)


def render_jpeg(scene: Scene, image_size: int, rng: np.random.Generator) -> bytes:
    """Draw ``scene`` and return JPEG bytes."""
    big = image_size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    max_angle = math.radians(MAX_ROTATION_DEGREES)
    for cx, cy, radius in _layout(scene, image_size, rng):
        angle = rng.uniform(-max_angle, max_angle)
        _draw_shape(draw, scene.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE, angle)
    alpha = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32)[:, :, None] / 255.0

    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)
    pixels = _background(scene.background, image_size, rng) * (1.0 - alpha) + colour * alpha
    pixels += rng.normal(0.0, 3.0, pixels.shape).astype(np.float32)  # sensor-like noise
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(85, 96)))
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _colour_word(colour: str, rng: np.random.Generator) -> str:
    synonyms = COLOUR_SYNONYMS.get(colour, [])
    if synonyms and rng.random() < SYNONYM_PROBABILITY:
        return _choice(rng, synonyms)
    return colour


def _shape_word(shape: str, plural: bool, rng: np.random.Generator) -> str:
    words = SHAPE_WORDS[shape]
    chosen = words[0]
    if len(words) > 1 and rng.random() < SYNONYM_PROBABILITY:
        chosen = words[1 + int(rng.integers(len(words) - 1))]
    return chosen[1] if plural else chosen[0]


def _position_phrase(position: tuple[str, str], rng: np.random.Generator, bare: bool) -> str:
    """'in the upper left corner' (bare=False) or 'upper left' (bare=True)."""
    row, column = position
    if column == "centre":
        column_word = _choice(rng, ["centre", "center", "middle"])
    else:
        column_word = column
    if row == "middle" and column == "centre":
        return _choice(rng, ["centre", "center", "middle"] if bare else
                       ["in the centre", "in the center", "in the middle", "centered"])
    if row == "middle":
        return _choice(rng, [column, f"{column} side"] if bare else
                       [f"on the {column}", f"on the {column} side", f"at the {column}"])
    vertical = _choice(rng, VERTICAL_WORDS[row])
    if column == "centre":
        # "top"/"bottom" only here: "near the upper" is not English.
        return _choice(rng, [row, f"{vertical} {column_word}"] if bare else
                       [f"at the {row}", f"near the {row}", f"along the {row} edge", f"at the {row} {column_word}"])
    return _choice(rng, [f"{vertical} {column}", f"{vertical} {column} corner"] if bare else
                   [f"in the {vertical} {column} corner", f"in the {vertical} {column}", f"at the {vertical} {column}"])


def _background_phrase(background: Background, rng: np.random.Generator, bare: bool, complete: bool = False) -> str:
    """'on a grey background' (bare=False) or 'grey background'; `complete`: never the bare 'plain', which fits
    the white, grey and black backgrounds alike."""
    adjective = _choice(rng, [a for a in background.adjectives if not (complete and a == "plain")])
    noun = _choice(rng, ["background", "background", "backdrop"])
    if bare:
        return f"{adjective} {noun}"
    return f"{_choice(rng, ['on', 'against', 'over'])} a {adjective} {noun}"


def _sentence_caption(scene: Scene, rng: np.random.Generator, complete: bool = False) -> str:
    words = [_choice(rng, COUNT_WORDS[scene.count])]
    if complete or rng.random() < 0.75:
        words.append(_choice(rng, SIZE_WORDS[scene.size]))
    words.append(_colour_word(scene.colour, rng))
    words.append(_shape_word(scene.shape, scene.count > 1, rng))
    noun_phrase = " ".join(words)

    extras = []
    if scene.position is not None and (complete or rng.random() < 0.7):
        extras.append(_position_phrase(scene.position, rng, bare=False))
    if scene.position is None and rng.random() < 0.25:
        extras.append(_choice(rng, ["scattered around", "spread across the picture", "side by side"]))
    if complete or rng.random() < 0.6:
        extras.append(_background_phrase(scene.background, rng, bare=False, complete=complete))
    rng.shuffle(extras)
    separator = _choice(rng, [" ", ", "])
    tail = "".join(separator + extra for extra in extras)

    # "there is a pair of ...", "there are two ...": agree with the determiner.
    is_are = "is" if scene.count == 1 or noun_phrase.startswith("a ") else "are"
    frame = _choice(rng, [
        "{}", "{}", "a picture of {}", "a picture showing {}", "an image of {}",
        "a photo of {}", "a simple drawing of {}", f"there {is_are} {{}}",
        "this image contains {}", "an illustration with {}", "an image with {}",
    ])
    return frame.format(noun_phrase + tail)


def _list_caption(scene: Scene, rng: np.random.Generator, complete: bool = False) -> str:
    """Telegraphic style: 'red circles, two of them, large'."""
    head = f"{_colour_word(scene.colour, rng)} {_shape_word(scene.shape, scene.count > 1, rng)}"
    attributes = []
    if scene.count > 1 and (complete or rng.random() < 0.8):
        number = _choice(rng, COUNT_ALONE[scene.count])
        attributes.append(_choice(rng, [f"{number} of them", f"{number} in total", f"{number} shapes"]))
    if complete or rng.random() < 0.7:
        attributes.append(_choice(rng, SIZE_WORDS[scene.size]))
    if scene.position is not None and (complete or rng.random() < 0.6):
        attributes.append(_position_phrase(scene.position, rng, bare=True))
    if complete or rng.random() < 0.5:
        attributes.append(_background_phrase(scene.background, rng, bare=True, complete=complete))
    rng.shuffle(attributes)
    return ", ".join([head] + attributes)


_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


def make_caption(scene: Scene, rng: np.random.Generator, complete: bool = False) -> str:
    """One caption of `scene`; `complete` ones name every attribute (count, size, colour, shape, position of a
    single object, background), so they describe this scene and no other."""
    caption = (_list_caption(scene, rng, complete) if rng.random() < 0.25
               else _sentence_caption(scene, rng, complete))
    caption = _ARTICLE_BEFORE_VOWEL.sub("an ", caption)  # "an orange star"
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.3:
        caption += "."
    return caption


def make_captions(scene: Scene, rng: np.random.Generator, how_many: int, complete: bool = False) -> list[str]:
    """``how_many`` distinct paraphrases (COCO has 5 different captions per image)."""
    captions: list[str] = []
    for _ in range(50 * how_many):
        caption = make_caption(scene, rng, complete)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == how_many:
                break
    while len(captions) < how_many:  # practically unreachable; keeps the count exact
        captions.append(make_caption(scene, rng, complete))
    return captions


# --------------------------------------------------------------------------
# One sample (the unit of work for the worker pool)
# --------------------------------------------------------------------------


def generate_sample(
    index: int, *, seed: int, split: str, image_size: int, num_captions: int, class_index: int | None = None
) -> tuple[bytes, list[str]]:
    """JPEG bytes and captions of sample ``index``; depends on its arguments only."""
    scene = sample_scene(sample_rng(seed, split, index, STREAM_SCENE), class_index)
    jpeg = render_jpeg(scene, image_size, sample_rng(seed, split, index, STREAM_LAYOUT))
    captions = make_captions(scene, sample_rng(seed, split, index, STREAM_CAPTION), num_captions)
    return jpeg, captions


def _generate_imagefolder_sample(index: int, *, seed: int, split: str, image_size: int) -> tuple[bytes, list[str]]:
    # Classes interleave (0, 1, ..., 35, 0, 1, ...) so every class gets the same count.
    return generate_sample(
        index, seed=seed, split=split, image_size=image_size, num_captions=0, class_index=index % len(CLASS_NAMES)
    )


def _generate_all(
    function, count: int, pool: multiprocessing.pool.Pool | None, description: str
) -> Iterator[tuple[bytes, list[str]]]:
    """Yield ``function(i)`` for i in 0..count-1 in order, in the pool if any."""
    indices = range(count)
    results: Iterable = pool.imap(function, indices, chunksize=64) if pool else map(function, indices)
    yield from tqdm(results, total=count, desc=description, unit="img", disable=None)


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------


def _write_train(root: str, samples: Iterable[tuple[bytes, list[str]]], shard_size: int) -> dict[str, int]:
    """images/train + train.tsv + shards/*.tar; returns the shard sizes."""
    image_dir = os.path.join(root, "images", "train")
    shard_dir = os.path.join(root, "shards")
    os.makedirs(image_dir)
    os.makedirs(shard_dir)
    shard_sizes: dict[str, int] = {}
    writer = shard_file = None
    tsv_tmp = os.path.join(root, "train.tsv.tmp")
    try:
        with open(tsv_tmp, "w", encoding="utf-8", newline="\n") as tsv:
            tsv.write("filepath\ttitle\n")
            for index, (jpeg, (caption,)) in enumerate(samples):
                relative_path = f"images/train/{index:09d}.jpg"
                with open(os.path.join(root, relative_path), "wb") as f:
                    f.write(jpeg)
                tsv.write(f"{relative_path}\t{caption}\n")

                if index % shard_size == 0:
                    if writer is not None:
                        writer.close()
                        shard_file.close()
                    shard_name = f"{index // shard_size:06d}.tar"
                    shard_file = open(os.path.join(shard_dir, shard_name), "wb")
                    # mtime fixed: otherwise tar headers carry the wall clock
                    # and the shards are not reproducible.
                    writer = webdataset.TarWriter(shard_file, encoder=False, mtime=0, user="", group="")
                    shard_sizes[shard_name] = 0
                key = f"{index:09d}"
                writer.write({"__key__": key, "jpg": jpeg, "txt": caption.encode("utf-8"), "idx": str(index).encode()})
                shard_sizes[shard_name] += 1
    finally:
        if writer is not None:
            writer.close()
            shard_file.close()
    os.replace(tsv_tmp, os.path.join(root, "train.tsv"))
    with open(os.path.join(shard_dir, "sizes.json"), "w", encoding="utf-8") as f:
        json.dump(shard_sizes, f, indent=2)
    return shard_sizes


def _write_coco(root: str, samples: Iterable[tuple[bytes, list[str]]], image_size: int) -> int:
    """eval/coco2017 in the real COCO captions layout; returns the image count."""
    coco_dir = os.path.join(root, "eval", "coco2017")
    image_dir = os.path.join(coco_dir, "val2017")
    os.makedirs(image_dir)
    os.makedirs(os.path.join(coco_dir, "annotations"))
    images, annotations = [], []
    for index, (jpeg, captions) in enumerate(samples):
        image_id = index + 1  # COCO ids start at 1
        file_name = f"{image_id:012d}.jpg"
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(jpeg)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size, "license": 0})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    document = {
        "info": {"description": "clipcompress synthetic shapes corpus (COCO captions stand-in)",
                 "version": str(CORPUS_VERSION), "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
    }
    with open(os.path.join(coco_dir, "annotations", "captions_val2017.json"), "w", encoding="utf-8") as f:
        json.dump(document, f)
    return len(images)


def _write_imagefolder(root: str, split: str, samples: Iterable[tuple[bytes, list[str]]]) -> None:
    split_dir = os.path.join(root, "eval", "shapes", split)
    for class_name in CLASS_NAMES:
        os.makedirs(os.path.join(split_dir, class_name))
    for index, (jpeg, _) in enumerate(samples):
        class_name = CLASS_NAMES[index % len(CLASS_NAMES)]
        with open(os.path.join(split_dir, class_name, f"{index // len(CLASS_NAMES):05d}.jpg"), "wb") as f:
            f.write(jpeg)


def _prepare_destination(out: str) -> None:
    """Refuse to clobber a directory that is not a previous corpus."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "corpus.json")):
        raise FileExistsError(f"{out} exists, is not empty and is not a corpus (no corpus.json); "
                              "refusing to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")


def _move_into_place(staging: str, out: str) -> None:
    if os.path.isdir(out):
        # A previous corpus (checked by _prepare_destination): move it aside
        # first, since rename() cannot replace a non-empty directory.
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def make_corpus(
    out: str,
    train_size: int = 20000,
    eval_size: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int = 1,
) -> dict:
    """Generate the corpus under ``out`` (see the module docstring); return its summary."""
    if min(train_size, eval_size, shard_size, workers) < 1:
        raise ValueError("train_size, eval_size, shard_size and workers must all be >= 1")
    if image_size < 16:
        raise ValueError("image_size must be at least 16 pixels for the shapes to be recognisable")
    started = time.perf_counter()
    out = os.path.abspath(out)
    _prepare_destination(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = f"{out}.partial-{os.getpid()}"
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)

    per_class_test = max(10, eval_size // len(CLASS_NAMES))
    per_class_train = 2 * per_class_test
    common = dict(seed=seed, image_size=image_size)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        shard_sizes = _write_train(
            staging,
            _generate_all(functools.partial(generate_sample, split="train", num_captions=1, **common),
                          train_size, pool, "train"),
            shard_size,
        )
        _write_coco(
            staging,
            _generate_all(functools.partial(generate_sample, split="coco", num_captions=5, **common),
                          eval_size, pool, "coco eval"),
            image_size,
        )
        for folder, split, per_class in (("train", "shapes_train", per_class_train),
                                         ("test", "shapes_test", per_class_test)):
            _write_imagefolder(
                staging, folder,
                _generate_all(functools.partial(_generate_imagefolder_sample, split=split, **common),
                              per_class * len(CLASS_NAMES), pool, f"shapes {folder}"),
            )
        summary = {
            "version": CORPUS_VERSION,
            "seed": seed,
            "image_size": image_size,
            "train_size": train_size,
            "eval_size": eval_size,
            "shard_size": shard_size,
            "num_shards": len(shard_sizes),
            "captions_per_eval_image": 5,
            "shapes_per_class": {"train": per_class_train, "test": per_class_test},
            "colours": list(COLOURS),
            "shapes": SHAPES,
            "classes": CLASS_NAMES,
            "split_ids": SPLIT_IDS,
        }
        with open(os.path.join(staging, "corpus.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        _move_into_place(staging, out)
    except BaseException:
        if pool is not None:
            pool.terminate()  # don't wait for workers drawing images nobody will write
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    # Not stored in corpus.json: that file must not depend on the run.
    return {**summary, "out": out, "seconds": round(time.perf_counter() - started, 2)}


NUM_SCENES = len(CLASS_NAMES) * len(SIZE_WORDS) * len(BACKGROUNDS) * (len(ROWS) * len(COLUMNS) + len(COUNT_ALONE))


def make_distinct_retrieval_set(out: str, size: int = 1000, image_size: int = 64, seed: int = 0,
                                captions_per_image: int = 5) -> int:
    """A retrieval set in which no two images share a scene and every caption is complete (`make_caption`'s
    `complete`), so each caption describes its own image and no other: a model can reach R@1 = 1, where the
    corpus's own retrieval set repeats scenes and its captions leave attributes out, so that several images
    fit one caption equally. Written as `out/eval/coco2017` (the corpus's COCO layout), built beside `out` and
    renamed into place; returns the image count. Its images come from their own split (`distinct`), so they
    repeat no training or other eval picture."""
    if not 1 <= size <= NUM_SCENES // 2:
        raise ValueError(f"size {size}: must be in [1, {NUM_SCENES // 2}] (half of the {NUM_SCENES} distinct scenes, "
                         "so drawing them without repeats stays quick)")
    out = os.path.abspath(out)
    _prepare_destination(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)

    def samples() -> Iterator[tuple[bytes, list[str]]]:
        seen: set[Scene] = set()
        index = 0
        while len(seen) < size:
            scene = sample_scene(sample_rng(seed, "distinct", index, STREAM_SCENE))
            if scene not in seen:
                seen.add(scene)
                yield (render_jpeg(scene, image_size, sample_rng(seed, "distinct", index, STREAM_LAYOUT)),
                       make_captions(scene, sample_rng(seed, "distinct", index, STREAM_CAPTION), captions_per_image,
                                     complete=True))
            index += 1

    try:
        count = _write_coco(staging, samples(), image_size)
        with open(os.path.join(staging, "corpus.json"), "w", encoding="utf-8") as f:
            json.dump({"version": CORPUS_VERSION, "seed": seed, "image_size": image_size, "eval_size": size,
                       "captions_per_eval_image": captions_per_image, "distinct_scenes": True}, f, indent=2)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipcompress corpus",
        description="Generate a deterministic synthetic captioned-shapes corpus (CC3M/COCO/ImageFolder stand-in).",
    )
    parser.add_argument("--out", required=True, help="output directory (replaced if it already holds a corpus)")
    parser.add_argument("--train-size", type=int, default=20000, help="number of captioned training samples")
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="number of COCO-style retrieval images (5 captions each); also sets the ImageFolder size")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed; same seed gives byte-identical output")
    parser.add_argument("--shard-size", type=int, default=1000, help="training samples per webdataset shard")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing images; the output does not depend on it")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns an exit status (console scripts sys.exit() it)."""
    args = parse_args(argv)
    summary = make_corpus(
        args.out,
        train_size=args.train_size,
        eval_size=args.eval_size,
        image_size=args.image_size,
        seed=args.seed,
        shard_size=args.shard_size,
        workers=args.workers,
    )
    print(
        f"wrote {summary['train_size']} train samples ({summary['num_shards']} shards), "
        f"{summary['eval_size']} COCO-style eval images, {len(CLASS_NAMES)} classes "
        f"to {summary['out']} in {summary['seconds']}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
