"""eval.data's layouts of the seeds' users: UPop/BLIP's Karpathy annotation root (`annotation/*_test.json` with
the images beside it) scored like the same pairs in COCO layout, annotation paths kept inside their root, and
CIFAR as image folders with CLIP's class names and templates."""
import json
import shutil

import pytest
import torch
from PIL import Image

from compress.models.registry import build_model, open_clip_spec
from eval import encoder_from_model, run_benchmarks
from eval.data import discover_datasets
from eval.templates import CIFAR100_CLASSNAMES, CIFAR_TEMPLATES
from foundation.annotations import confined_path, read_image_captions, skipped_note

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def coco_pairs(tiny_corpus):
    """(image file, captions) of the tiny corpus's COCO-layout set, in its image-id order."""
    coco = tiny_corpus / "eval" / "coco2017"
    annotations = json.loads((coco / "annotations" / "captions_val2017.json").read_text())
    captions = {}
    for annotation in annotations["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [(coco / "val2017" / image["file_name"], captions[image["id"]])
            for image in sorted(annotations["images"], key=lambda image: image["id"])]


def write_karpathy_root(root, pairs, annotation, image_folder, subfolder, extra_entries=()):
    """UPop's layout: root/annotation/<annotation> listing {"image": "<subfolder>/<file>", "caption": [...]},
    the images under root/<image_folder>/<subfolder>/."""
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    (root / image_folder / subfolder).mkdir(parents=True)
    entries = []
    for path, captions in pairs:
        shutil.copy(path, root / image_folder / subfolder / path.name)
        entries.append({"image": f"{subfolder}/{path.name}", "caption": captions})
    (root / "annotation" / annotation).write_text(json.dumps([*entries, *extra_entries]))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return encoder_from_model(build_model(open_clip_spec("clipc-vit-t2-32")).eval(), device="cpu")


@pytest.mark.parametrize("annotation, image_folder, subfolder, name", [
    ("coco_karpathy_test.json", "coco", "val2014", "coco_karpathy"),
    ("flickr30k_test.json", "flickr30k", "flickr30k-images", "flickr30k_karpathy"),
])
def test_a_karpathy_root_scores_as_the_same_pairs_in_coco_layout(tiny_corpus, tmp_path, encoder, annotation,
                                                                   image_folder, subfolder, name):
    pairs = coco_pairs(tiny_corpus)
    write_karpathy_root(tmp_path, pairs, annotation, image_folder, subfolder)
    found, notes = discover_datasets(tmp_path)
    assert {n: entry.task for n, entry in found.items()} == {name: "retrieval"} and notes == []
    karpathy = run_benchmarks(encoder, tmp_path, benchmarks=("retrieval",), batch_size=64)
    coco = run_benchmarks(encoder, tiny_corpus / "eval", benchmarks=("retrieval",), datasets=["coco2017"],
                          batch_size=64)
    # the same metric names, under the set's own name, with the same values
    assert karpathy == {key.replace("/coco2017/", f"/{name}/"): value for key, value in coco.items()}
    assert f"retrieval/{name}/text_retrieval_recall@1" in karpathy and len(karpathy) >= 6
    assert len({round(v, 6) for v in karpathy.values()}) > 1  # a real ranking, not one constant


def test_annotation_paths_outside_the_image_root_are_skipped_and_counted(tiny_corpus, tmp_path, caplog):
    pairs = coco_pairs(tiny_corpus)[:3]
    outside = tmp_path / "secret.jpg"
    shutil.copy(pairs[0][0], outside)  # a real image outside coco/: it must never be read
    hostile = [{"image": "../secret.jpg", "caption": ["climbs out"]},
               {"image": str(outside), "caption": ["absolute"]},
               {"image": "val2014/../../secret.jpg", "caption": ["climbs out midway"]},
               {"image": "C:\\secret.jpg", "caption": ["a drive"]},
               {"image": 7, "caption": ["not a path"]},
               {"image": "val2014/x.jpg", "caption": [3]},
               {"image": "val2014/y.jpg", "caption": ["   "]},
               "not an entry"]
    write_karpathy_root(tmp_path, pairs, "coco_karpathy_test.json", "coco", "val2014", hostile)
    found, _ = discover_datasets(tmp_path)
    with caplog.at_level("WARNING", logger="eval.data"):
        retrieval = found["coco_karpathy"].build(None)
    assert [p.name for p in retrieval.image_paths] == [p.name for p, _ in pairs]
    assert all((tmp_path / "coco") in p.parents for p in retrieval.image_paths)
    assert "8 of 11 entries skipped (4 path outside the image root, 3 malformed entry, 1 no caption)" in caplog.text

    for name in ("../a.jpg", "/a.jpg", "a/../../b.jpg", "C:/a.jpg", "a\\..\\b.jpg", "", "a\0.jpg"):
        assert confined_path(tmp_path, name) is None, name
    assert confined_path(tmp_path, "val2014/a..b.jpg") == tmp_path / "val2014" / "a..b.jpg"


def test_an_unreadable_or_empty_annotation_is_a_note_not_a_crash(tmp_path, encoder):
    (tmp_path / "annotation").mkdir()
    (tmp_path / "coco").mkdir()
    (tmp_path / "annotation" / "coco_karpathy_test.json").write_text('{"images": []}')
    found, _ = discover_datasets(tmp_path)
    with pytest.raises(ValueError, match="expected a JSON list"):
        found["coco_karpathy"].build(None)
    (tmp_path / "annotation" / "coco_karpathy_test.json").write_text('[{"image": "../x.jpg", "caption": ["a"]}]')
    with pytest.raises(ValueError, match="no usable entry"):
        found["coco_karpathy"].build(None)
    # without its image folder the annotation is noted, not scored
    shutil.rmtree(tmp_path / "coco")
    found, notes = discover_datasets(tmp_path)
    assert found == {} and notes == [f"coco_karpathy: {tmp_path / 'annotation' / 'coco_karpathy_test.json'} needs "
                                     f"its images under {tmp_path / 'coco'}/; skipped"]


def test_training_entries_keep_their_one_caption_and_image_id(tmp_path):
    annotation = tmp_path / "coco_karpathy_train.json"
    annotation.write_text(json.dumps([
        {"image": "train2014/a.jpg", "caption": "a man riding a horse ", "image_id": "coco_1"},
        {"image": "train2014/a.jpg", "caption": "a rider", "image_id": "coco_1"},
        {"image": "/etc/passwd", "caption": "absolute", "image_id": "coco_2"},
    ]))
    entries, skipped = read_image_captions(annotation, tmp_path / "images")
    assert [(e.image, e.captions, e.image_id) for e in entries] == [
        (tmp_path / "images" / "train2014" / "a.jpg", ["a man riding a horse"], "coco_1"),
        (tmp_path / "images" / "train2014" / "a.jpg", ["a rider"], "coco_1")]
    assert skipped_note(skipped, 3) == "1 of 3 entries skipped (1 path outside the image root)"
    assert skipped_note(type(skipped)(), 3) == ""


def test_a_cifar100_image_folder_is_cifar100_with_clips_names_and_templates(tmp_path):
    # the usual export: one folder per class under its torchvision name (underscores), in train/ and test/
    for split in ("train", "test"):
        for index, name in enumerate(CIFAR100_CLASSNAMES):
            folder = tmp_path / "cifar100" / split / name.replace(" ", "_")
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (index, 2 * index, 255 - index)).save(folder / "0.png")
    found, notes = discover_datasets(tmp_path)
    assert {n: entry.task for n, entry in found.items()} == {"cifar100": "classification"} and notes == []
    cifar = found["cifar100"].build(lambda image: image)
    assert cifar.name == "cifar100" and cifar.classnames == CIFAR100_CLASSNAMES
    assert cifar.classnames[1] == "aquarium fish" and cifar.classnames[47] == "maple tree"
    assert cifar.templates == CIFAR_TEMPLATES and len(cifar.templates) == 18
    image, label = cifar.test[1]
    assert label == 1 and image.getpixel((0, 0)) == (1, 2, 254)
    assert cifar.train is not None and len(cifar.test) == 100


def test_a_cifar100_folder_with_neither_layout_is_noted(tmp_path):
    (tmp_path / "cifar100" / "test").mkdir(parents=True)  # no class folders, no cifar-100-python/
    found, notes = discover_datasets(tmp_path)
    assert found == {}
    assert notes == [f"cifar100: {tmp_path / 'cifar100'} has neither cifar-100-python/ (torchvision layout, "
                     "download=False) nor test/<class>/ (image folders); skipped"]
