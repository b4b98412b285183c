"""Evaluation datasets, found by their layout under one root (ProtoCLIP's eval-data-dir layout):

    <root>/coco2017/val2017/*.jpg + annotations/captions_val2017.json     retrieval (COCO captions format)
    <root>/annotation/coco_karpathy_test.json + <root>/coco/              retrieval `coco_karpathy` (UPop/BLIP's
        Karpathy 5k test split: [{"image": path under coco/, "caption": [...]}])
    <root>/annotation/flickr30k_test.json + <root>/flickr30k/             retrieval `flickr30k_karpathy` (the same
        format, paths under flickr30k/)
    <root>/flickr30k/flickr30k_images/ + results.csv                       retrieval (all images), or the
        Karpathy test split when dataset_flickr30k.json / *karpathy*.json sits beside it
        (casCLIP's folder name <root>/flickr30/ is read the same way, as the dataset `flickr30k`)
    <root>/imagenet/val/<wnid>/ or imagenet/test/<wnid>/ (+ train/)       classification (test/: ProtoCLIP's tree)
    <root>/ucf101/testlist01/<class>/ (testlist02, 03 noted, not scored)   classification (CLOOB's frames)
    <root>/cifar10, cifar100, stl10                                        torchvision folders (download=False),
        or the same names as image folders, <root>/cifar100/test/<class>/ (+ train/): CLIP's class names
        and templates of the set either way
    <root>/<name>/test/<class>/ (+ train/<class>/)                         any ImageFolder set, e.g. `shapes`, and
        CLOOB's birdsnap, country211, flowers102, gtsrb, stanford_cars

Class names of an ImageFolder set: `<root>/<name>/classnames.txt` (one per line, in sorted folder order); else
the built-in names of a known set (eval/zeroshot_sets.json, ImageNet's from open_clip), by folder number when
the folders are numbered (CLOOB's `000`, `00001`), else by position; else the folder names with `_` → space.
Empty class folders are dropped with a note (CLOOB's birdsnap has nine). `templates.txt` beside
classnames.txt overrides the prompt templates. A folder under the root that is none of these is noted.

Image paths read from an annotation file stay under their image folder: an entry whose path is absolute or
climbs out with `..` is skipped and counted in one warning, never opened (foundation.annotations).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset

from eval.templates import classnames_for, templates_for
from foundation.annotations import confined_path, read_image_captions, skipped_note
from foundation.errors import DataError
from foundation.images import open_rgb

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], object]


@dataclass
class ClassificationSet:
    name: str
    classnames: List[str]
    templates: List[str]
    test: Dataset  # yields (image tensor, label)
    train: Optional[Dataset] = None  # for the linear probe


@dataclass
class RetrievalSet:
    name: str
    image_paths: List[Path]
    captions: List[str]
    text_to_image: List[int]  # caption j describes image text_to_image[j]

    def images(self, transform: Transform) -> Dataset:
        return ImageFiles(self.image_paths, transform)


@dataclass
class FoundDataset:
    """A dataset seen on disk; `build(transform)` opens it (cheap to find, built only when scored)."""

    name: str
    task: str  # "classification" or "retrieval"
    build: Callable[[Transform], object] = field(repr=False)


class ImageFiles(Dataset):
    """Images by path; yields (image tensor, index)."""

    def __init__(self, paths: List[Path], transform: Transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        # the training data's decoding rules (16-bit, transparency, size limit): scores compare like with like
        return self.transform(open_rgb(self.paths[index])), index


# --- discovery -----------------------------------------------------------------------------------------

UCF101_SPLITS = ("testlist01", "testlist02", "testlist03")

TORCHVISION_FOLDERS = {  # name -> the folder torchvision expects inside <root>/<name> with download=False
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}


def discover_datasets(root: str | Path) -> Tuple[Dict[str, FoundDataset], List[str]]:
    """Every evaluation dataset under `root`, and one note per folder that looks like one but is incomplete."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data dir not found: {root}")
    found: Dict[str, FoundDataset] = {}
    notes: List[str] = []

    coco = root / "coco2017"
    if (coco / "annotations" / "captions_val2017.json").is_file() and (coco / "val2017").is_dir():
        found["coco2017"] = FoundDataset("coco2017", "retrieval", lambda _t: load_coco_captions(coco))
    elif coco.exists():
        notes.append(f"coco2017: {coco} needs val2017/ and annotations/captions_val2017.json; skipped")

    karpathy_image_roots = []
    for name, (annotation, image_folder) in KARPATHY_SETS.items():
        annotation_file, image_root = root / KARPATHY_ANNOTATION_FOLDER / annotation, root / image_folder
        if annotation_file.is_file() and image_root.is_dir():
            found[name] = FoundDataset(name, "retrieval",
                                       lambda _t, a=annotation_file, i=image_root, n=name: load_karpathy(a, i, n))
            karpathy_image_roots.append(image_folder)
        elif annotation_file.is_file():
            notes.append(f"{name}: {annotation_file} needs its images under {image_root}/; skipped")

    flickr = find_flickr_root(root, nested_only=True)
    if flickr is not None:
        found["flickr30k"] = FoundDataset("flickr30k", "retrieval", lambda _t: load_flickr30k(flickr))
    for name in FLICKR_FOLDERS:
        if (root / name).is_dir() and flickr is None and name not in karpathy_image_roots:
            notes.append(f"flickr30k: {root / name} needs flickr30k_images/ and results.csv (or a Karpathy JSON); "
                         "skipped")

    for name, inner in TORCHVISION_FOLDERS.items():
        folder = _torchvision_folder(root, name)
        if folder is not None:
            found[name] = FoundDataset(name, "classification", _torchvision_builder(name, folder))
        elif _has_class_folders(root / name / "test"):  # the image-folder export of the set
            found[name] = FoundDataset(name, "classification",
                                       lambda t, f=root / name, n=name: image_folder_set(f, n, t))
        elif (root / name).exists():
            notes.append(f"{name}: {root / name} has neither {inner}/ (torchvision layout, download=False) nor "
                         f"test/<class>/ (image folders); skipped")

    # ImageNet's evaluation split is val/ here, test/ in ProtoCLIP's tree
    imagenet = root / "imagenet"
    imagenet_split = next((split for split in ("val", "test") if (imagenet / split).is_dir()), None)
    if imagenet_split is not None:
        found["imagenet"] = FoundDataset("imagenet", "classification",
                                         lambda t: image_folder_set(imagenet, "imagenet", t, test_split=imagenet_split))
    elif imagenet.is_dir():
        notes.append(f"imagenet: {imagenet} has neither val/ nor test/ (one folder per wnid); skipped")

    # UCF101 (CLOOB's frames) has three test splits, testlist01-03; ProtoCLIP scores the first
    ucf = root / "ucf101"
    if (ucf / UCF101_SPLITS[0]).is_dir():
        found["ucf101"] = FoundDataset("ucf101", "classification",
                                       lambda t: image_folder_set(ucf, "ucf101", t, test_split=UCF101_SPLITS[0]))
        others = [split for split in UCF101_SPLITS[1:] if (ucf / split).is_dir()]
        if others:
            notes.append(f"ucf101: {UCF101_SPLITS[0]} scored (ProtoCLIP's split); {', '.join(others)} not scored")
    elif ucf.is_dir():
        notes.append(f"ucf101: {ucf} has no {UCF101_SPLITS[0]}/; skipped")

    # Any other folder with test/<class>/ is an ImageFolder classification set (e.g. the generated `shapes`).
    reserved = {"coco2017", *FLICKR_FOLDERS, "imagenet", "ucf101", *TORCHVISION_FOLDERS, *karpathy_image_roots}
    if karpathy_image_roots or (root / KARPATHY_ANNOTATION_FOLDER).is_dir():
        reserved.add(KARPATHY_ANNOTATION_FOLDER)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in reserved):
        if _has_class_folders(folder / "test"):
            found[folder.name] = FoundDataset(
                folder.name, "classification", lambda t, f=folder: image_folder_set(f, f.name, t)
            )
        elif not _torchvision_folder_inside(folder):  # (cifar/stl files directly under the root are found above)
            notes.append(f"{folder.name}: {folder} is no evaluation set this eval knows (expected test/<class>/, "
                         f"or one of coco2017, flickr30k, imagenet, ucf101, cifar10, cifar100, stl10); ignored")
    return found, notes


def _has_class_folders(split: Path) -> bool:
    return split.is_dir() and any(p.is_dir() for p in split.iterdir())


def _torchvision_folder_inside(folder: Path) -> bool:
    """Whether `folder` is the inner folder of a torchvision set sitting directly under the root."""
    return folder.name in TORCHVISION_FOLDERS.values()


# --- classification sets -------------------------------------------------------------------------------


def image_folder_set(folder: Path, name: str, transform: Transform, test_split: str = "test") -> ClassificationSet:
    # loader: the training data's decoding rules, not torchvision's plain convert("RGB")
    test = _image_folder(folder / test_split, name, transform)
    train_dir = folder / "train"
    has_train = train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir())
    train = _image_folder(train_dir, name, transform) if has_train else None
    if train is not None and train.classes != test.classes:
        log.warning("%s: train and %s class folders differ; linear probe skipped", name, test_split)
        train = None
    return ClassificationSet(name, _classnames(folder, name, test.classes), _templates(folder, name), test, train)


def _image_folder(split: Path, name: str, transform: Transform):
    """torchvision's ImageFolder of `split` without its empty class folders: CLOOB's birdsnap has nine (046, 066,
    123, 299, 302, 351, 403, 436, 465), which ImageFolder refuses; like ProtoCLIP they are dropped, with a
    note, and the set is scored over the classes that have images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def has_image(directory: Path) -> bool:
        return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(directory) for f in files)

    class NonEmptyImageFolder(ImageFolder):
        def find_classes(self, directory):
            classes, _ = super().find_classes(directory)
            kept = [c for c in classes if has_image(Path(directory) / c)]
            if len(kept) < len(classes):
                dropped = sorted(set(classes) - set(kept))
                log.info("%s: %d empty class folder(s) in %s dropped (%s): scored over %d classes", name,
                         len(dropped), directory, ", ".join(dropped[:12]) + (" …" if len(dropped) > 12 else ""),
                         len(kept))
            return kept, {c: i for i, c in enumerate(kept)}

    return NonEmptyImageFolder(str(split), transform=transform, loader=open_rgb)


def _classnames(folder: Path, name: str, folder_names: List[str]) -> List[str]:
    """Class names for the class folders (sorted, empty ones dropped): classnames.txt; else a known set's
    built-in names, looked up by number when the folders are numbered (CLOOB's `000`, `00001`: folder n is
    class n, so dropped folders leave the others' names right) or by position when there is one folder per
    class (ImageNet's wnids, UCF101's names, in sorted order = class-index order); else the folder names."""
    listed = folder / "classnames.txt"
    if listed.is_file():
        classnames = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(classnames) == len(folder_names):
            return classnames
        log.warning("%s: classnames.txt lists %d names for %d folders; using folder names",
                    name, len(classnames), len(folder_names))
    builtin = classnames_for(name)
    if builtin is not None:
        if all(f.isdigit() for f in folder_names) and max(int(f) for f in folder_names) < len(builtin):
            return [builtin[int(f)] for f in folder_names]
        if len(folder_names) == len(builtin):
            return builtin
        log.warning("%s: %d class folders where the built-in list has %d classes and the folders are not numbered; "
                    "using folder names", name, len(folder_names), len(builtin))
    return [folder_name.replace("_", " ") for folder_name in folder_names]


def _templates(folder: Path, name: str) -> List[str]:
    listed = folder / "templates.txt"
    if listed.is_file():
        return [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    return templates_for(name)


def _torchvision_folder(root: Path, name: str) -> Optional[Path]:
    """`<root>/<name>` when it holds torchvision's files, or `<root>` itself when they sit there directly."""
    inner = TORCHVISION_FOLDERS[name]
    for candidate in (root / name, root):
        if (candidate / inner).is_dir():
            return candidate
    return None


def _torchvision_builder(name: str, folder: Path) -> Callable[[Transform], ClassificationSet]:
    def build(transform: Transform) -> ClassificationSet:
        from torchvision import datasets

        if name == "stl10":
            test = datasets.STL10(str(folder), split="test", transform=transform, download=False)
            train = datasets.STL10(str(folder), split="train", transform=transform, download=False)
        else:
            dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            test = dataset_class(str(folder), train=False, transform=transform, download=False)
            train = dataset_class(str(folder), train=True, transform=transform, download=False)
        classnames = [c.replace("_", " ") for c in test.classes]
        return ClassificationSet(name, classnames, templates_for(name), test, train)

    return build


# --- retrieval sets ------------------------------------------------------------------------------------


def find_coco_root(path: str | Path) -> Optional[Path]:
    """The coco2017 folder of an eval data root, or `path` itself when it is that folder: the first of the two
    with annotations/captions_val2017.json; None when neither has it."""
    path = Path(path)
    for candidate in (path, path / "coco2017"):
        if (candidate / "annotations" / "captions_val2017.json").is_file():
            return candidate
    return None


def load_coco_captions(coco_root: Path, split: str = "val2017") -> RetrievalSet:
    """All images of the split that have captions, with all their captions (5k images × ~25k for val2017).
    An image whose file_name would leave the split folder is skipped and counted."""
    annotations = json.loads((coco_root / "annotations" / f"captions_{split}.json").read_text())
    captions_by_image: Dict[int, List[str]] = {}
    for annotation in annotations["annotations"]:
        captions_by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    images = sorted((image for image in annotations["images"] if image["id"] in captions_by_image),
                    key=lambda image: image["id"])
    paths = [confined_path(coco_root / split, image["file_name"]) for image in images]
    outside = sum(path is None for path in paths)
    if outside:
        log.warning("coco2017: %d of %d images skipped: file_name outside %s (absolute or '..')",
                    outside, len(images), coco_root / split)
    return _retrieval_set("coco2017", [(path, captions_by_image[image["id"]])
                                       for path, image in zip(paths, images) if path is not None])


# UPop/BLIP's retrieval layout: <root>/annotation/<file> with the images under <root>/<folder>/
KARPATHY_ANNOTATION_FOLDER = "annotation"
KARPATHY_SETS = {"coco_karpathy": ("coco_karpathy_test.json", "coco"),
                 "flickr30k_karpathy": ("flickr30k_test.json", "flickr30k")}


def load_karpathy(annotation_file: Path, image_root: Path, name: str) -> RetrievalSet:
    """A UPop/BLIP test annotation (a list of {"image": path under `image_root`, "caption": [...]}) as the
    retrieval set `name`: images in file order, each with all its captions. Entries whose path leaves
    `image_root` or whose shape is wrong are skipped and counted in one warning. An unreadable file is a
    ValueError, like the other sets' (run_benchmarks skips the set with a note)."""
    try:
        entries, skipped = read_image_captions(annotation_file, image_root)
    except DataError as error:
        raise ValueError(str(error)) from None
    if skipped:
        log.warning("%s: %s", name, skipped_note(skipped, len(entries) + sum(skipped.values())))
    if not entries:
        raise ValueError(f"{annotation_file}: no usable entry")
    return _retrieval_set(name, [(entry.image, entry.captions) for entry in entries])


# Folder names of Flickr30k under an eval root: ours (ProtoCLIP's) and casCLIP's (`datasets/flickr30`).
FLICKR_FOLDERS = ("flickr30k", "flickr30")


def _is_flickr_folder(folder: Path) -> bool:
    return _flickr_image_dir(folder).is_dir() and (_karpathy_file(folder) is not None
                                                   or (folder / "results.csv").is_file())


def find_flickr_root(path: str | Path, nested_only: bool = False) -> Optional[Path]:
    """The Flickr30k folder of an eval data root (`flickr30k/` or casCLIP's `flickr30/`), or `path` itself when
    it is that folder (unless `nested_only`): the first with flickr30k_images/ and results.csv or a Karpathy
    JSON; None when there is none."""
    path = Path(path)
    candidates = ([] if nested_only else [path]) + [path / name for name in FLICKR_FOLDERS]
    return next((candidate for candidate in candidates if candidate.is_dir() and _is_flickr_folder(candidate)), None)


def load_flickr30k(flickr_root: Path) -> RetrievalSet:
    """The Karpathy test split when its JSON is there, else every image of results.csv."""
    image_dir = _flickr_image_dir(flickr_root)
    karpathy = _karpathy_file(flickr_root)
    if karpathy is not None:
        entries = read_karpathy_test_split(karpathy)
    else:
        entries = read_flickr_results_csv(flickr_root / "results.csv")
    return _retrieval_set("flickr30k",
                          [(image_dir / Path(file_name).name, captions) for file_name, captions in entries])


def read_flickr_results_csv(path: Path) -> List[Tuple[str, List[str]]]:
    """Parse Flickr30k's `image_name| comment_number| comment` file (pipe-separated, header line first).

    The public file has a few malformed rows (e.g. `name| 4 caption`, a missing second pipe): those are
    repaired by taking the caption after the number.
    """
    captions: Dict[str, List[str]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        parts = [part.strip() for part in line.split("|", 2)]
        if len(parts) == 2:
            parts = [parts[0], *(parts[1].split(None, 1) + [""])[:2]]
        if len(parts) == 3 and parts[0] and parts[2]:
            captions.setdefault(parts[0], []).append(parts[2])
    return list(captions.items())


def read_karpathy_test_split(path: Path) -> List[Tuple[str, List[str]]]:
    """Test images of a Karpathy-split JSON: the original `{"images": [{filename, split, sentences}]}`
    or the list form `[{"image": ..., "caption": [...]}]` used by CLIP_benchmark/LAVIS test files."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return [(image["filename"], [s["raw"].strip() for s in image["sentences"]])
                for image in data["images"] if image.get("split") == "test"]
    return [(item["image"], [c.strip() for c in (item["caption"] if isinstance(item["caption"], list)
                                                 else [item["caption"]])]) for item in data]


def _retrieval_set(name: str, images_with_captions: List[Tuple[Path, List[str]]]) -> RetrievalSet:
    image_paths, captions, text_to_image = [], [], []
    for image_index, (path, image_captions) in enumerate(images_with_captions):
        image_paths.append(path)
        captions.extend(image_captions)
        text_to_image.extend([image_index] * len(image_captions))
    return RetrievalSet(name, image_paths, captions, text_to_image)


def _flickr_image_dir(flickr_root: Path) -> Path:
    # The Kaggle archive nests the images one level deeper under the same name.
    nested = flickr_root / "flickr30k_images" / "flickr30k_images"
    return nested if nested.is_dir() else flickr_root / "flickr30k_images"


def _karpathy_file(flickr_root: Path) -> Optional[Path]:
    candidates = [flickr_root / "dataset_flickr30k.json", *sorted(flickr_root.glob("*karpathy*.json"))]
    return next((path for path in candidates if path.is_file()), None)
