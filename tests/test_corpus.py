"""Tests for utils.make_corpus: layout, formats, determinism and caption content.

Corpora are tiny (200 train / 50 eval) and built once per module, so the whole
file runs in a few seconds on one core.
"""

import csv
import hashlib
import json
import os
import re
import tarfile

import pytest
from PIL import Image

from utils import make_corpus as mc

TRAIN_SIZE = 200
EVAL_SIZE = 50
IMAGE_SIZE = 64
SHARD_SIZE = 64  # 200 = 3 full shards + a partial one: exercises the shard rollover
SEED = 0


def build(out, seed=SEED, workers=1):
    return mc.make_corpus(
        str(out), train_size=TRAIN_SIZE, eval_size=EVAL_SIZE, image_size=IMAGE_SIZE,
        seed=seed, shard_size=SHARD_SIZE, workers=workers,
    )


def tree_digest(root):
    """relative path -> sha1 of the bytes, for every file under root."""
    digest = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return digest


def read_tsv(root):
    with open(os.path.join(root, "train.tsv"), encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c"
    build(out)
    return str(out)


@pytest.fixture(scope="module")
def corpus_digest(corpus):
    return tree_digest(corpus)


def test_layout_exists(corpus):
    for relative in [
        "train.tsv", "corpus.json", "images/train", "shards/000000.tar", "shards/sizes.json",
        "eval/coco2017/val2017", "eval/coco2017/annotations/captions_val2017.json",
        "eval/shapes/train", "eval/shapes/test",
    ]:
        assert os.path.exists(os.path.join(corpus, relative)), relative
    assert not os.path.exists(os.path.join(corpus, "train.tsv.tmp"))
    leftovers = [name for name in os.listdir(os.path.dirname(corpus)) if ".partial-" in name or ".old-" in name]
    assert leftovers == []


def test_tsv_columns_and_rows(corpus):
    rows = read_tsv(corpus)
    assert rows[0] == ["filepath", "title"]
    assert len(rows) == TRAIN_SIZE + 1
    for index, row in enumerate(rows[1:]):
        assert len(row) == 2
        assert row[0] == f"images/train/{index:09d}.jpg"  # relative to the corpus root
        assert row[1].strip() == row[1] and row[1]


def test_tsv_images_open_at_image_size(corpus):
    for filepath, _ in read_tsv(corpus)[1:]:
        with Image.open(os.path.join(corpus, filepath)) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_shards_match_tsv(corpus):
    rows = read_tsv(corpus)[1:]
    with open(os.path.join(corpus, "shards", "sizes.json")) as f:
        sizes = json.load(f)
    assert sum(sizes.values()) == TRAIN_SIZE
    assert sorted(sizes) == [f"{i:06d}.tar" for i in range(len(sizes))]
    assert len(sizes) == -(-TRAIN_SIZE // SHARD_SIZE)

    seen = set()
    for shard_name, count in sizes.items():
        with tarfile.open(os.path.join(corpus, "shards", shard_name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        assert len(keys) == count
        for key in keys:
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.idx"} <= set(members)
            assert len(key) == 9
            index = int(members[f"{key}.idx"].decode())
            assert index == int(key)
            filepath, caption = rows[index]
            assert members[f"{key}.txt"].decode("utf-8") == caption
            with open(os.path.join(corpus, filepath), "rb") as f:
                assert members[f"{key}.jpg"] == f.read()
            seen.add(index)
    assert seen == set(range(TRAIN_SIZE))


def test_coco_annotations(corpus):
    coco_dir = os.path.join(corpus, "eval", "coco2017")
    with open(os.path.join(coco_dir, "annotations", "captions_val2017.json")) as f:
        coco = json.load(f)
    assert {"info", "licenses", "images", "annotations"} <= set(coco)
    assert len(coco["images"]) == EVAL_SIZE
    captions_by_image = {}
    for annotation in coco["annotations"]:
        assert set(annotation) >= {"id", "image_id", "caption"}
        captions_by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for image in coco["images"]:
        assert re.fullmatch(r"\d{12}\.jpg", image["file_name"])
        assert (image["width"], image["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
        assert os.path.isfile(os.path.join(coco_dir, "val2017", image["file_name"]))
        captions = captions_by_image[image["id"]]
        assert len(captions) == 5
        assert len(set(captions)) == 5, "the 5 captions must be different paraphrases"


def test_imagefolder_classes(corpus):
    expected_per_class = max(10, EVAL_SIZE // len(mc.CLASS_NAMES))
    for split, per_class in (("train", 2 * expected_per_class), ("test", expected_per_class)):
        split_dir = os.path.join(corpus, "eval", "shapes", split)
        classes = sorted(os.listdir(split_dir))
        assert len(classes) >= 25
        assert classes == sorted(mc.CLASS_NAMES)
        for class_name in classes:
            colour, shape = class_name.split("_")
            assert colour in mc.COLOURS and shape in mc.SHAPES
            files = os.listdir(os.path.join(split_dir, class_name))
            assert len(files) == per_class
            with Image.open(os.path.join(split_dir, class_name, files[0])) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_corpus_json(corpus):
    with open(os.path.join(corpus, "corpus.json")) as f:
        summary = json.load(f)
    assert summary["train_size"] == TRAIN_SIZE
    assert summary["eval_size"] == EVAL_SIZE
    assert summary["seed"] == SEED
    assert summary["image_size"] == IMAGE_SIZE
    assert summary["classes"] == mc.CLASS_NAMES
    assert "version" in summary


def test_eval_images_differ_from_train(corpus_digest):
    train = {h for path, h in corpus_digest.items() if path.startswith("images")}
    evaluation = {h for path, h in corpus_digest.items() if path.startswith("eval")}
    assert train and evaluation and not train & evaluation


def test_same_seed_is_byte_identical(tmp_path, corpus_digest):
    build(tmp_path / "again")
    assert tree_digest(tmp_path / "again") == corpus_digest


def test_different_seed_differs(tmp_path, corpus):
    build(tmp_path / "other", seed=SEED + 1)
    other = tree_digest(tmp_path / "other")
    assert read_tsv(tmp_path / "other") != read_tsv(corpus)
    reference = tree_digest(corpus)
    same_images = [p for p in reference if p.endswith(".jpg") and other.get(p) == reference[p]]
    assert same_images == []


def test_workers_do_not_change_output(tmp_path, corpus_digest):
    build(tmp_path / "parallel", workers=2)
    assert tree_digest(tmp_path / "parallel") == corpus_digest


def _words_present(caption, vocabulary):
    """Which keys of ``vocabulary`` (key -> list of phrases) occur in caption as whole words."""
    lowered = caption.lower()
    return {key for key, phrases in vocabulary.items()
            if any(re.search(rf"\b{re.escape(p)}\b", lowered) for p in phrases)}


COLOUR_VOCABULARY = {c: [c] + mc.COLOUR_SYNONYMS.get(c, []) for c in mc.COLOURS}
SHAPE_VOCABULARY = {s: [w for pair in mc.SHAPE_WORDS[s] for w in pair] for s in mc.SHAPES}


def _scene(split, index):
    return mc.sample_scene(mc.sample_rng(SEED, split, index, mc.STREAM_SCENE))


def test_captions_name_their_class(corpus):
    """Each caption names its colour and shape, and no other class's colour or shape."""
    for index, (_, caption) in enumerate(read_tsv(corpus)[1:]):
        scene = _scene("train", index)
        assert _words_present(caption, COLOUR_VOCABULARY) == {scene.colour}, caption
        assert _words_present(caption, SHAPE_VOCABULARY) == {scene.shape}, caption

    with open(os.path.join(corpus, "eval", "coco2017", "annotations", "captions_val2017.json")) as f:
        coco = json.load(f)
    for annotation in coco["annotations"]:
        scene = _scene("coco", annotation["image_id"] - 1)
        assert _words_present(annotation["caption"], COLOUR_VOCABULARY) == {scene.colour}
        assert _words_present(annotation["caption"], SHAPE_VOCABULARY) == {scene.shape}


def test_captions_are_varied(corpus):
    captions = [caption for _, caption in read_tsv(corpus)[1:]]
    assert len(set(captions)) > 0.9 * len(captions)


def _distinct_scenes(count):
    """The first `count` distinct scenes of the `distinct` split, as make_distinct_retrieval_set draws them."""
    scenes, index = [], 0
    while len(scenes) < count:
        scene = _scene("distinct", index)
        if scene not in scenes:
            scenes.append(scene)
        index += 1
    return scenes


def test_the_distinct_retrieval_set_has_one_scene_per_image_and_complete_captions(tmp_path):
    """Every image its own scene, every caption naming all of it (count, size, colour, shape, position, background,
    never the bare 'plain' three backgrounds share), so a caption fits its image only; deterministic."""
    out = tmp_path / "distinct"
    assert mc.make_distinct_retrieval_set(str(out), size=60, image_size=32) == 60
    with open(out / "eval" / "coco2017" / "annotations" / "captions_val2017.json") as f:
        coco = json.load(f)
    captions = {}
    for annotation in coco["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    scenes = _distinct_scenes(60)
    assert len(set(scenes)) == 60 and sorted(captions) == list(range(1, 61))
    assert len({c for group in captions.values() for c in group}) == 300  # 5 each, no two alike
    rows, columns = {"top": ["top", "upper"], "middle": [], "bottom": ["bottom", "lower"]}, {
        "left": ["left"], "centre": ["centre", "center", "middle", "centered"], "right": ["right"]}
    for image_id, scene in enumerate(scenes, start=1):
        for caption in captions[image_id]:
            assert _words_present(caption, COLOUR_VOCABULARY) == {scene.colour}, caption
            assert _words_present(caption, SHAPE_VOCABULARY) == {scene.shape}, caption
            assert _words_present(caption, mc.SIZE_WORDS) == {scene.size}, caption
            named = [a for a in scene.background.adjectives if a != "plain"]
            assert _words_present(caption, {"background": named}), caption
            if scene.count > 1:
                assert _words_present(caption, {"count": mc.COUNT_WORDS[scene.count]}), caption
            else:
                row, column = scene.position
                assert not rows[row] or _words_present(caption, {"row": rows[row]}), caption
                assert column == "centre" and row != "middle" or _words_present(caption, {"c": columns[column]}), \
                    caption
    again = tmp_path / "again"
    mc.make_distinct_retrieval_set(str(again), size=60, image_size=32)
    assert tree_digest(again) == tree_digest(out)
    with pytest.raises(ValueError, match="half of the 3960 distinct scenes"):
        mc.make_distinct_retrieval_set(str(tmp_path / "too_many"), size=mc.NUM_SCENES)


def test_cli_and_replacing_a_previous_corpus(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--train-size", "20", "--eval-size", "10", "--shard-size", "8", "--seed", "3"]
    assert mc.main(args) == 0
    assert len(read_tsv(out)) == 21
    first = tree_digest(out)
    assert mc.main(args) == 0  # an existing corpus is replaced, with identical content
    assert tree_digest(out) == first
    assert sorted(os.listdir(tmp_path)) == ["cli"]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        mc.make_corpus(str(foreign), train_size=5, eval_size=5)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_parser_names_the_module_and_explains_every_flag():
    parser = mc.build_parser()
    assert parser.prog == "clipcompress corpus"
    assert all(action.help for action in parser._actions)
