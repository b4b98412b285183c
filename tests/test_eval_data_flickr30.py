"""Flickr30k under casCLIP's folder name `flickr30/` as well as `flickr30k/`: eval discovery (and so the
monitor), the post-training tools' calibration data, and the cascade's gallery and experiments."""
import json
import shutil

import pytest
import torch

from eval.data import discover_datasets, find_flickr_root
from utils.cascade import read_gallery
from utils.posttrain import calibration_batches

pytestmark = pytest.mark.usefixtures("one_thread", "cascade_logs_in_tmp")  # tests/conftest.py


@pytest.fixture(scope="module")
def flickr_roots(tiny_corpus, tmp_path_factory):
    """The tiny corpus's COCO-layout set rewritten as Kaggle's Flickr30k (flickr30k_images/ + results.csv), once
    under each folder name, each in an eval root of its own (with nothing else in it)."""
    coco = tiny_corpus / "eval" / "coco2017"
    annotations = json.loads((coco / "annotations" / "captions_val2017.json").read_text())
    names = {image["id"]: image["file_name"] for image in annotations["images"]}
    roots = {}
    for folder_name in ("flickr30", "flickr30k"):
        root = tmp_path_factory.mktemp(folder_name)
        flickr = root / folder_name
        (flickr / "flickr30k_images").mkdir(parents=True)
        for name in names.values():
            shutil.copy(coco / "val2017" / name, flickr / "flickr30k_images" / name)
        lines = ["image_name| comment_number| comment"]
        counts = {}
        for annotation in annotations["annotations"]:
            name = names[annotation["image_id"]]
            counts[name] = counts.get(name, -1) + 1
            lines.append(f"{name}| {counts[name]}| {annotation['caption']}")
        (flickr / "results.csv").write_text("\n".join(lines) + "\n")
        roots[folder_name] = root
    return roots


@pytest.mark.parametrize("folder_name", ["flickr30", "flickr30k"])
def test_discovery_reads_either_folder_name_as_flickr30k(flickr_roots, folder_name):
    found, notes = discover_datasets(flickr_roots[folder_name])
    assert set(found) == {"flickr30k"} and not notes
    data = found["flickr30k"].build(None)
    assert len(data.image_paths) == 72 and len(data.captions) == 360
    assert find_flickr_root(flickr_roots[folder_name]) == flickr_roots[folder_name] / folder_name
    assert find_flickr_root(flickr_roots[folder_name] / folder_name) == flickr_roots[folder_name] / folder_name


def test_an_incomplete_flickr30_folder_is_noted_not_scored(tmp_path):
    (tmp_path / "flickr30" / "flickr30k_images").mkdir(parents=True)
    found, notes = discover_datasets(tmp_path)
    assert "flickr30k" not in found and any("flickr30" in note and "results.csv" in note for note in notes)


def test_the_monitor_scores_flickr30_retrieval(flickr_roots):
    import open_clip

    import eval
    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clipc-vit-t2-32").eval()
    model.model_spec = open_clip_spec("clipc-vit-t2-32")
    metrics = eval.run_benchmarks(eval.encoder_from_model(model), flickr_roots["flickr30"], benchmarks=("retrieval",))
    assert 0 <= metrics["retrieval/flickr30k/image_retrieval_recall@10"] <= 1
    assert "retrieval/flickr30k/mean_recall" in metrics


def test_calibration_batches_from_a_flickr30_root(flickr_roots):
    from compress.models.registry import open_clip_spec

    batches = calibration_batches(str(flickr_roots["flickr30"]), open_clip_spec("clipc-vit-t2-32"), 2, 8, seed=1)
    assert len(batches) == 2 and batches[0]["image"].shape == (8, 3, 32, 32) and batches[0]["text"].shape[0] == 8
    again = calibration_batches(str(flickr_roots["flickr30"] / "flickr30"), open_clip_spec("clipc-vit-t2-32"), 2, 8,
                                seed=1)
    torch.testing.assert_close(again[1]["image"], batches[1]["image"])  # the folder itself: the same rows


def test_cascade_gallery_and_experiment_read_flickr30(flickr_roots, tmp_path, capsys):
    gallery = read_gallery(flickr_roots["flickr30"])
    assert gallery.kind == "flickr30k" and len(gallery.paths) == 72 and len(gallery.captions) == 360
    assert read_gallery(flickr_roots["flickr30k"], "flickr30k").paths[0].name == gallery.paths[0].name

    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs
    from utils.cascade import main

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clipc-vit-t2-32")
    checkpoint = tmp_path / "large.pt"
    torch.save({"model_spec": open_clip_spec("clipc-vit-t2-32"), "state_dict": model.state_dict()}, checkpoint)
    config = tmp_path / "topk.toml"
    config.write_text(f'experiment = "topk"\n[data]\neval_data_dir = "unused"\n'
                      f'[[levels]]\ncheckpoint = "{checkpoint}"\n')
    main(["--config", str(config), "--eval-data-dir", str(flickr_roots["flickr30"]), "--dataset", "flickr30k",
          "--json", str(tmp_path / "out.json"), "--log-level", "warning"])
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["dataset"] == "flickr30k" and summary["gallery"] == 72 and summary["queries"] == 360
    assert "large alone" in capsys.readouterr().out
