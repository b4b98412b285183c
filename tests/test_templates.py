"""Zero-shot class names and templates (eval/templates.py, zeroshot_sets.json) on ProtoCLIP's eval tree, and
the sets file shipped as package data."""
import json
import logging
from pathlib import Path

from conftest import REPO


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def test_protoclip_eval_tree_gets_real_class_names_and_templates(tmp_path, caplog):
    from eval.data import discover_datasets
    from eval.templates import ZEROSHOT_SETS

    root = tmp_path / "eval"
    for number in ("000", "001", "046", "047", "499"):  # CLOOB's numbered birdsnap folders; 046 is empty there
        if number == "046":
            (root / "birdsnap" / "test" / number).mkdir(parents=True)
        else:
            _image(root / "birdsnap" / "test" / number / "a.jpg")
    for index in range(43):
        _image(root / "gtsrb" / "test" / f"{index:05d}" / "a.png")
    ucf_folders = [name.replace(" ", "") for name in ZEROSHOT_SETS["ucf101"]["classnames"]]
    for split in ("testlist01", "testlist02", "testlist03"):
        for name in ucf_folders:
            _image(root / "ucf101" / split / name / "f.jpg")
    for index in range(1000):
        _image(root / "imagenet" / "test" / f"n{index:08d}" / "a.jpg")
    (root / "imagenet" / "train").mkdir()
    (root / "downloads_tmp").mkdir()

    found, notes = discover_datasets(root)
    assert {"birdsnap", "gtsrb", "ucf101", "imagenet"} <= set(found)
    assert any(note.startswith("downloads_tmp:") and "ignored" in note for note in notes)
    assert any("testlist02, testlist03 not scored" in note for note in notes)
    with caplog.at_level(logging.INFO, logger="eval.data"):
        birdsnap = found["birdsnap"].build(lambda image: image)
    # folder n is class n of CLIP's list (ProtoCLIP deletes the empty ones from it: the same names remain)
    assert birdsnap.classnames == ["Coopers Hawk", "Northern Goshawk", "Hooded Merganser", "Blue headed Vireo"]
    assert birdsnap.templates == ["a photo of a {}, a type of bird."] and len(birdsnap.test) == 4
    assert "1 empty class folder(s)" in caplog.text and "(046)" in caplog.text
    gtsrb = found["gtsrb"].build(lambda image: image)
    assert gtsrb.classnames[14] == "stop" and len(gtsrb.templates) == 3
    ucf = found["ucf101"].build(lambda image: image)
    assert ucf.classnames[0] == "Apply Eye Makeup" and ucf.classnames[-1] == "Yo Yo" and len(ucf.templates) == 48
    imagenet = found["imagenet"].build(lambda image: image)
    assert imagenet.classnames[0] == "tench" and len(imagenet.templates) == 80
    for name, entry in ZEROSHOT_SETS.items():
        assert len(entry["classnames"]) == {"birdsnap": 500, "country211": 211, "flowers102": 102, "gtsrb": 43,
                                            "stanford_cars": 196, "ucf101": 101}[name], name
        assert all("{}" in template for template in entry["templates"]), name


def test_zeroshot_sets_file_is_package_data():
    setup = (REPO / "setup.py").read_text()
    assert '"eval": ["*.json"]' in setup
    assert json.loads((REPO / "src" / "eval" / "zeroshot_sets.json").read_text())["flowers102"]["classnames"][0] == \
        "pink primrose"
