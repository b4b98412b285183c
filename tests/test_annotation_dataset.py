"""UPop's training annotation (`coco_karpathy_train.json` + an image root) read as it is: the same rows as the
same pairs in a TSV, paths kept under the image root, and the prune job training from it."""
import csv
import json
import shutil

import pytest
import torch
from conftest import run_trainer

from foundation.errors import DataError
from training.data import get_data, infer_dataset_type
from training.data.annotation_dataset import AnnotationDataset
from training.data.csv_dataset import CsvDataset
from training.params import parse_args


def tsv_rows(corpus, count):
    with open(corpus / "train.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[:count]


def write_upop_root(root, corpus, count, extra_entries=()):
    """root/annotation/coco_karpathy_train.json listing {"image": "train2014/<file>", "caption", "image_id"} for
    the first `count` rows of the corpus's train.tsv, the images copied under root/coco/train2014/."""
    (root / "annotation").mkdir(parents=True)
    (root / "coco" / "train2014").mkdir(parents=True)
    entries = []
    for index, row in enumerate(tsv_rows(corpus, count)):
        name = row["filepath"].split("/")[-1]
        shutil.copy(corpus / row["filepath"], root / "coco" / "train2014" / name)
        entries.append({"image": f"train2014/{name}", "caption": row["title"], "image_id": f"coco_{index}"})
    annotation = root / "annotation" / "coco_karpathy_train.json"
    annotation.write_text(json.dumps([*entries, *extra_entries]))
    return annotation


def identity(image):
    return torch.tensor(list(image.getdata()), dtype=torch.uint8)


def test_an_annotation_gives_the_rows_the_same_pairs_give_in_a_tsv(tiny_corpus, tmp_path, caplog):
    outside = [{"image": "../../corpus/images/train/000000000.jpg", "caption": "climbs out", "image_id": "x"},
               {"image": str(tiny_corpus / "images" / "train" / "000000000.jpg"), "caption": "absolute"},
               {"image": "train2014/000000001.jpg", "caption": 5}]
    annotation = write_upop_root(tmp_path, tiny_corpus, 20, outside)
    with caplog.at_level("WARNING"):
        rows = AnnotationDataset(str(annotation), identity, image_root=str(tmp_path / "coco"))
    assert "3 of 23 entries skipped (2 path outside the image root, 1 malformed entry)" in caplog.text
    tsv = CsvDataset(str(tiny_corpus / "train.tsv"), identity)
    assert len(rows) == 20 and rows.captions == tsv.captions[:20]
    for index in (0, 7, 19):
        ours, theirs = rows[index], tsv[index]
        assert ours["caption"] == theirs["caption"] and torch.equal(ours["image"], theirs["image"])
        assert str(tmp_path / "coco") in rows.paths[index]


def test_a_test_file_gives_one_row_per_caption_and_errors_are_one_line(tmp_path):
    (tmp_path / "coco").mkdir()
    listed = tmp_path / "coco_karpathy_test.json"
    listed.write_text(json.dumps([{"image": "val2014/a.jpg", "caption": ["one", "two"]}]))
    rows = AnnotationDataset(str(listed), identity, image_root=str(tmp_path / "coco"))
    assert rows.captions == ["one", "two"] and rows.paths == [str(tmp_path / "coco" / "val2014" / "a.jpg")] * 2
    with pytest.raises(DataError, match="--train-image-root .*nowhere: folder not found"):
        AnnotationDataset(str(listed), identity, image_root=str(tmp_path / "nowhere"))
    listed.write_text(json.dumps([{"image": "/etc/passwd", "caption": "x"}]))
    with pytest.raises(DataError, match=r"no usable entry of 1 \(1 of 1 entries skipped \(1 path outside"):
        AnnotationDataset(str(listed), identity, image_root=str(tmp_path / "coco"))
    listed.write_text("{not json")
    with pytest.raises(DataError, match="--train-data .*not a readable JSON annotation file"):
        AnnotationDataset(str(listed), identity)


def test_get_data_reads_an_annotation_json_with_its_image_root(tiny_corpus, tmp_path):
    annotation = write_upop_root(tmp_path, tiny_corpus, 64)
    assert infer_dataset_type(str(annotation)) == "json"
    args = parse_args(["--train-data", str(annotation), "--train-image-root", str(tmp_path / "coco"),
                       "--batch-size", "16", "--workers", "0", "--model", "clipc-vit-t2-32"])
    data = get_data(args, lambda image: torch.zeros(1), None, rank=0, world_size=1)
    assert isinstance(data.dataset, AnnotationDataset) and data.num_batches == 4
    batch = next(iter(data.batches()))
    assert len(batch["caption"]) == 16


@pytest.mark.slow
def test_the_prune_job_trains_from_upops_annotation(tiny_corpus, tmp_path):
    annotation = write_upop_root(tmp_path / "data", tiny_corpus, 128,
                                 [{"image": "../secret.jpg", "caption": "outside", "image_id": "x"}])
    result = run_trainer(["--job", "prune", "--model", "clipc-vit-t2-32", "--train-data", str(annotation),
                          "--train-image-root", str(tmp_path / "data" / "coco"), "--epochs", "2",
                          "--search-epochs", "1", "--p", "0.5", "--batch-size", "32", "--workers", "0",
                          "--warmup", "1", "--logs", str(tmp_path / "logs"), "--name", "upop",
                          "--report-to", "none", "--log-level", "info"])
    checkpoints = tmp_path / "logs" / "upop" / "checkpoints"
    after_search = torch.load(checkpoints / "epoch_1.pt", weights_only=True)
    final = torch.load(checkpoints / "epoch_2.pt", weights_only=True)
    assert after_search["model_spec"]["kind"] == "masked_clip" and final["model_spec"]["kind"] == "pruned_clip"
    assert after_search["step"] == 4 and final["step"] == 8  # 128 rows of the annotation, batches of 32
    assert "1 of 129 entries skipped (1 path outside the image root)" in result.stdout + result.stderr
