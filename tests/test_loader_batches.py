"""The training loaders convert and normalise images once per batch and send small fields from their workers as
arrays (training.data.samples): every batch is still the per-image transform's, bit for bit, with the same
tensors as before."""
import pytest
import torch
from conftest import loader_args

from compress.models.registry import get_preprocess, get_tokenizer, open_clip_spec
from foundation.images import open_rgb
from training.data import get_data
from training.data.csv_dataset import CsvDataset
from training.data.samples import image_collator, split_images

MODEL = "clipc-vit-t2-32"


def _check_batches(batches, corpus, transform, tokenizer):
    rows = CsvDataset(str(corpus / "train.tsv"), transform)
    assert batches
    for batch in batches:
        assert isinstance(batch["index"], torch.Tensor) and batch["index"].dtype == torch.long
        assert isinstance(batch["text"], torch.Tensor) and batch["text"].dtype == torch.long
        indices = batch["index"].tolist()
        expected = torch.stack([transform(open_rgb(rows.paths[i])) for i in indices])
        assert batch["image"].dtype == expected.dtype and torch.equal(batch["image"], expected)
        assert torch.equal(batch["text"], tokenizer([rows.captions[i] for i in indices]).long())


@pytest.mark.parametrize("workers", [0, 2])
def test_tsv_batches_are_the_per_image_transforms_bit_for_bit(tiny_corpus, tmp_path, workers):
    spec = open_clip_spec(MODEL)
    transform, tokenizer = get_preprocess(spec), get_tokenizer(spec)
    data = get_data(loader_args(tiny_corpus / "train.tsv", tmp_path, workers=workers), transform, tokenizer, 0, 1)
    assert data.dataset.finish_images is not None  # the split applies to the eval transform
    data.set_epoch(0)
    _check_batches(list(data.loader), tiny_corpus, transform, tokenizer)


def test_shard_batches_are_the_per_image_transforms_bit_for_bit(tiny_corpus, tmp_path):
    spec = open_clip_spec(MODEL)
    transform, tokenizer = get_preprocess(spec), get_tokenizer(spec)
    shards = str(tiny_corpus / "shards" / "{000000..000003}.tar")
    data = get_data(loader_args(shards, tmp_path, train_num_samples=256), transform, tokenizer, 0, 1)
    data.set_epoch(0)
    _check_batches(list(data.batches()), tiny_corpus, transform, tokenizer)


def test_a_transform_that_does_not_split_is_applied_per_image(tiny_corpus):
    def transform(image):  # not a Compose ending in ToTensor and Normalize
        return torch.full((3, 4, 4), float(image.size[0]))

    dataset = CsvDataset(str(tiny_corpus / "train.tsv"), transform)
    assert split_images(dataset) is None and dataset.transform is transform
    batch = image_collator(torch.utils.data.Subset(dataset, [0, 1]))([dataset[0], dataset[1]])
    assert torch.equal(batch["image"], torch.full((2, 3, 4, 4), 32.0))


def test_a_subset_loader_finishes_the_images_as_the_dataset_leaves_them(tiny_corpus):
    """The loaders jobs start over the training dataset (ProtoRKD's episode pass, BatchNorm re-estimation)."""
    transform = get_preprocess(open_clip_spec(MODEL))
    dataset = CsvDataset(str(tiny_corpus / "train.tsv"), transform)
    split_images(dataset)
    assert dataset[3]["image"].dtype == torch.uint8
    batch = image_collator(torch.utils.data.Subset(dataset, [3, 5]))([dataset[3], dataset[5]])
    expected = torch.stack([transform(open_rgb(dataset.paths[i])) for i in (3, 5)])
    assert torch.equal(batch["image"], expected)
