"""eval/ on inputs with known answers: metrics, zero-shot, linear probe, retrieval, datasets, profiling."""
import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as clip_eval
from eval.data import discover_datasets, read_flickr_results_csv, read_karpathy_test_split
from eval.metrics import (
    classification_metrics,
    feature_statistics,
    overlap_at_k,
    ranks_in_ranking,
    recall_at_ks,
    retrieval_metrics,
)
from eval.models import open_clip_train_spec, parse_param_value

# `eval.linear_probe` the attribute is the function; the module is needed to spy on its selection step.
linear_probe_module = importlib.import_module("eval.linear_probe")



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- classification metrics ----------------------------------------------------------------------------


def test_classification_metrics_known_values():
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true 0: rank 0
        [5.0, 4.0, 0.0, 0.0, 0.0, 0.0],  # true 1: rank 1
        [0.0, 0.0, 1.0, 2.0, 3.0, 4.0],  # true 0: rank 5 (last)
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # true 2: tied with 0 and 1 -> rank 2, not a top-1 hit
    ])
    labels = torch.tensor([0, 1, 0, 2])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(1 / 4)
    assert metrics["acc5"] == pytest.approx(3 / 4)
    # class 0: 1 of 2, class 1: 0 of 1, class 2: 0 of 1; classes absent from labels are not averaged in
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert set(classification_metrics(logits, labels, prefix="lp_")) == {"lp_acc1", "lp_acc5",
                                                                         "lp_mean_per_class_recall"}


def test_acc5_with_fewer_classes_than_k_and_nan_logits():
    assert classification_metrics(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]))["acc5"] == 1.0
    nan_logits = torch.full((2, 3), float("nan"))
    assert classification_metrics(nan_logits, torch.tensor([0, 1]))["acc1"] == 0.0


# --- retrieval metrics ---------------------------------------------------------------------------------


def one_hot(indices, dim):
    return F.one_hot(torch.as_tensor(indices), dim).float()


def test_retrieval_recall_with_several_captions_per_image():
    images = one_hot([0, 1, 2], 4)
    # captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2. Caption 1 points at image 1, caption 4 at nothing
    # in particular (orthogonal to every image: ties with all three).
    captions = torch.stack([one_hot(0, 4), one_hot(1, 4) * 0.9, one_hot(1, 4), one_hot(1, 4) * 0.5, one_hot(3, 4)])
    text_to_image = [0, 0, 1, 1, 2]
    metrics = retrieval_metrics(images, captions, text_to_image, ks=(1, 3, 10))

    # image -> text: image 0's best caption (0) is first; image 1's best (caption 2, score 1) is first;
    # image 2 scores 0 with every caption: its own caption ties with the four others -> rank 4.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@3"] == pytest.approx(2 / 3)
    # text -> image: captions 0, 2, 3 find their image first. Caption 1 scores 0.9 with image 1 and 0 with both
    # its own image and image 2 (a tie, counted against it): rank 2. Caption 4 ties with all three: rank 2.
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@3"] == 1.0
    # k larger than either gallery: everything is a hit
    assert metrics["image_retrieval_recall@10"] == 1.0 and metrics["text_retrieval_recall@10"] == 1.0
    six = [v for k, v in metrics.items() if "_recall@" in k]
    assert len(six) == 6 and metrics["mean_recall"] == pytest.approx(sum(six) / 6)


def test_retrieval_ties_count_against_the_model():
    """A collapsed model (every embedding equal) must not get the perfect score index order would give it."""
    images = torch.ones(4, 8) / 8**0.5
    captions = torch.ones(8, 8) / 8**0.5
    metrics = retrieval_metrics(images, captions, [0, 0, 1, 1, 2, 2, 3, 3], ks=(1, 4, 7))
    assert metrics["image_retrieval_recall@1"] == 0.0 and metrics["text_retrieval_recall@1"] == 0.0
    assert metrics["image_retrieval_recall@4"] == 1.0  # 3 other images tie -> rank 3
    assert metrics["text_retrieval_recall@4"] == 0.0 and metrics["text_retrieval_recall@7"] == 1.0  # 6 others tie
    # A diverged model (NaN embeddings) scores as badly as possible, never "NaN compares false -> rank 0".
    nan = retrieval_metrics(torch.full((3, 4), float("nan")), torch.full((3, 4), float("nan")), [0, 1, 2], ks=(1, 2))
    assert nan["mean_recall"] == 0.0


def test_retrieval_matches_brute_force_topk_and_is_chunk_invariant():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    text_to_image = torch.randperm(120, generator=generator) % 40  # 3 captions per image, shuffled order
    captions = F.normalize(images[text_to_image] + 0.9 * torch.randn(120, 16, generator=generator), dim=-1)
    similarity = images @ captions.T
    expected = {}
    for k in (1, 5, 10):
        top_captions = similarity.topk(k, dim=1).indices
        expected[f"text_retrieval_recall@{k}"] = (text_to_image[top_captions] == torch.arange(40)[:, None]).any(1)
        top_images = similarity.T.topk(k, dim=1).indices
        expected[f"image_retrieval_recall@{k}"] = (top_images == text_to_image[:, None]).any(1)
    whole = retrieval_metrics(images, captions, text_to_image)
    chunked = retrieval_metrics(images, captions, text_to_image, max_chunk_elements=3 * 120)  # 3 rows a chunk
    for name, hits in expected.items():
        assert whole[name] == pytest.approx(hits.float().mean().item())
        assert chunked[name] == whole[name]


def test_recall_from_a_ranked_list_follows_the_same_tie_rule():
    """A search that returns best-first lists (the cascade) scores like retrieval_metrics, ties included."""
    generator = torch.Generator().manual_seed(1)
    # 3 distinct directions for 12 images: many exact ties, which index order alone would resolve favourably
    images = one_hot(torch.arange(12) % 3, 4)
    text_to_image = torch.randint(0, 12, (30,), generator=generator)
    noise = one_hot(torch.randint(0, 4, (30,), generator=generator), 4)
    captions = F.normalize(images[text_to_image] + 0.5 * noise, dim=-1)
    scores = captions.double() @ images.double().T
    best = torch.sort(scores, dim=1, descending=True, stable=True)
    listed = recall_at_ks(ranks_in_ranking(best.indices[:, :11], best.values[:, :11], text_to_image), (1, 5, 10))
    whole = retrieval_metrics(images, captions, text_to_image, ks=(1, 5, 10))
    assert listed == {k: pytest.approx(whole[f"image_retrieval_recall@{k}"]) for k in (1, 5, 10)}
    assert listed[1] < (best.indices[:, 0] == text_to_image).float().mean().item()  # index order would flatter


def test_overlap_at_k_hand_computed():
    reference = torch.tensor([[0, 1, 2, 9], [5, 6, 7, 8], [3, 4, 0, 1]])
    ranked = torch.tensor([[2, 1, 0, 3],    # same top-3 set in another order: 3/3
                           [6, 9, 8, 5],    # only 6 of {5, 6, 7} in its top 3 (5 and 8 are too late/absent): 1/3
                           [1, 2, 9, 3]])   # none of {3, 4, 0} in its top 3: 0/3
    assert overlap_at_k(ranked, reference, 3) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert overlap_at_k(ranked, reference, 1) == pytest.approx(0.0)  # 0 vs 2, 5 vs 6, 3 vs 1
    assert overlap_at_k(ranked, reference, 4) == pytest.approx((3 / 4 + 3 / 4 + 2 / 4) / 3)
    assert overlap_at_k(reference, reference, 4) == 1.0
    # a shorter result list (a cascade keeping fewer than k candidates) misses the places it lacks
    assert overlap_at_k(ranked[:, :2], reference, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        overlap_at_k(ranked, reference[:, :2], 3)
    with pytest.raises(ValueError):
        overlap_at_k(ranked[:2], reference, 3)


def test_feature_statistics():
    images = one_hot([0, 0, 0], 2)
    texts = one_hot([1, 1], 2)
    stats = feature_statistics(images, texts)
    assert stats["modality_gap"] == pytest.approx(2**0.5)
    assert stats["image_feature_std"] == 0.0  # collapsed
    spread = feature_statistics(one_hot([0, 1], 2), one_hot([0, 1], 2))
    assert spread["modality_gap"] == pytest.approx(0.0) and spread["image_feature_std"] > 0.5


# --- zero-shot and the whole benchmark run with a fake encoder whose answers are known -------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourEncoder:
    """Image embedding = one-hot of its dominant channel; text embedding = one-hot of the colour it names."""

    device = torch.device("cpu")

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)  # stands in for the network (train/eval mode is checked)
        self.model_spec = {"kind": "fake"}
        self.texts_seen = []

    @staticmethod
    def preprocess(image):
        return torch.tensor(list(image.getpixel((0, 0))), dtype=torch.float32)

    def encode_image(self, pixels):
        return one_hot(pixels.argmax(dim=1), 3)

    def encode_text(self, texts):
        self.texts_seen.extend(texts)
        names = list(COLOURS)
        return one_hot([next(i for i, n in enumerate(names) if n in text) for text in texts], 3)


def write_colour_root(root: Path, train_per_class=4, test_per_class=2):
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name, rgb in COLOURS.items():
            folder = root / "colours" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), rgb).save(folder / f"{i}.png")
    coco = root / "coco2017"
    (coco / "val2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    images, annotations = [], []
    for image_id, name in enumerate(COLOURS, start=1):
        Image.new("RGB", (8, 8), COLOURS[name]).save(coco / "val2017" / f"{image_id:012d}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg"})
        for caption in (f"a {name} square", f"something {name}"):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    images.append({"id": 99, "file_name": "uncaptioned.jpg"})  # no captions: left out of retrieval
    (coco / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))


def test_zero_shot_classifier_is_mean_of_normalised_template_embeddings():
    encoder = ColourEncoder()
    classifier = clip_eval.zero_shot_classifier(encoder, ["red", "green", "blue"], ["a {} thing.", "{c}!"])
    assert torch.allclose(classifier, torch.eye(3))
    assert encoder.texts_seen[:2] == ["a red thing.", "red!"]
    image_features = one_hot([0, 1, 2, 2], 3)
    metrics = clip_eval.zero_shot_metrics(image_features, torch.tensor([0, 1, 2, 0]), classifier)
    assert metrics["acc1"] == pytest.approx(3 / 4)
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_run_benchmarks_on_a_fixture_root_with_known_answers(tmp_path):
    write_colour_root(tmp_path)
    encoder = ColourEncoder()
    encoder.model.train()
    metrics = clip_eval.run_benchmarks(encoder, tmp_path, batch_size=4, workers=0)
    assert metrics["zeroshot/colours/acc1"] == 1.0
    assert metrics["zeroshot/colours/mean_per_class_recall"] == 1.0
    assert metrics["linear_probe/colours/lp_acc1"] == 1.0
    assert metrics["retrieval/coco2017/text_retrieval_recall@1"] == 1.0
    assert metrics["retrieval/coco2017/image_retrieval_recall@1"] == 1.0
    assert metrics["features/coco2017/modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert encoder.model.training  # restored after eval

    only = clip_eval.run_benchmarks(encoder, tmp_path, benchmarks=["retrieval"], workers=0)
    assert set(only) == {k for k in metrics if k.startswith("retrieval/")}
    with pytest.raises(ValueError, match="cifar10"):
        clip_eval.run_benchmarks(encoder, tmp_path, datasets=["cifar10"])
    with pytest.raises(ValueError, match="unknown benchmark"):
        clip_eval.run_benchmarks(encoder, tmp_path, benchmarks=["zero-shot"])


# --- linear probe --------------------------------------------------------------------------------------


def separable_train_test(train_per_class, test_per_class, num_classes=4, dim=16):
    """Noisy points around one centre per class: (train features, labels, test features, labels)."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)

    def sample(per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        return F.normalize(centres[labels] + 0.15 * torch.randn(len(labels), dim, generator=generator), dim=-1), labels

    return (*sample(train_per_class), *sample(test_per_class))


def test_linear_probe_separable_data_and_weight_decay_search():
    train_features, train_labels, test_features, test_labels = separable_train_test(30, 10)
    metrics = clip_eval.linear_probe(train_features, train_labels, test_features, test_labels)
    assert metrics["lp_acc1"] >= 0.95 and metrics["lp_acc5"] == 1.0
    assert 1e-6 <= metrics["lp_weight_decay"] <= 1e2
    _, tried = clip_eval.select_weight_decay(train_features, train_labels, num_classes=4)
    tried_decays = [record["weight_decay"] for record in tried]
    assert all(any(abs(w - 10.0**e) < 1e-12 for w in tried_decays) for e in range(-6, 3))  # coarse decades
    assert len(tried_decays) > 9  # then refined between them


def test_linear_probe_never_selects_on_test(monkeypatch):
    train_features, train_labels, test_features, test_labels = separable_train_test(20, 10)
    seen = []
    real_select = linear_probe_module.select_weight_decay

    def spy(features, labels, *args, **kwargs):
        seen.append((features, labels))
        return real_select(features, labels, *args, **kwargs)

    monkeypatch.setattr(linear_probe_module, "select_weight_decay", spy)
    honest = clip_eval.linear_probe(train_features, train_labels, test_features, test_labels)
    assert len(seen) == 1 and torch.equal(seen[0][1], train_labels) and torch.equal(seen[0][0], train_features)
    # Selection depends on train only: scrambled test labels and garbage test features change the test score,
    # not the chosen weight decay.
    scrambled = clip_eval.linear_probe(train_features, train_labels, torch.randn_like(test_features),
                                       test_labels.flip(0))
    assert scrambled["lp_weight_decay"] == honest["lp_weight_decay"]
    assert scrambled["lp_acc1"] < honest["lp_acc1"]


# --- dataset files -------------------------------------------------------------------------------------


def test_flickr_results_csv_and_karpathy_json(tmp_path):
    csv_file = tmp_path / "results.csv"
    csv_file.write_text(
        "image_name| comment_number| comment\n"
        "1.jpg| 0| A dog runs .\n1.jpg| 1| A brown dog .\n"
        "2.jpg| 0| Two people .\n2.jpg| 4 A malformed row without its second pipe .\n"
    )
    assert read_flickr_results_csv(csv_file) == [
        ("1.jpg", ["A dog runs .", "A brown dog ."]),
        ("2.jpg", ["Two people .", "A malformed row without its second pipe ."]),
    ]
    original = tmp_path / "dataset_flickr30k.json"
    original.write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "2.jpg", "split": "test", "sentences": [{"raw": "two people "}, {"raw": "a pair"}]},
    ]}))
    assert read_karpathy_test_split(original) == [("2.jpg", ["two people", "a pair"])]
    listed = tmp_path / "flickr30k_test_karpathy.json"
    listed.write_text(json.dumps([{"image": "flickr30k-images/2.jpg", "caption": ["two people", "a pair"]}]))
    assert read_karpathy_test_split(listed) == [("flickr30k-images/2.jpg", ["two people", "a pair"])]


def test_discovery_finds_sets_and_notes_incomplete_ones(tmp_path):
    write_colour_root(tmp_path)
    flickr = tmp_path / "flickr30k"
    (flickr / "flickr30k_images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flickr / "flickr30k_images" / "1.jpg")
    (flickr / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| a black square\n")
    (tmp_path / "cifar10").mkdir()  # no cifar-10-batches-py inside
    found, notes = discover_datasets(tmp_path)
    assert {name: entry.task for name, entry in found.items()} == {
        "coco2017": "retrieval", "flickr30k": "retrieval", "colours": "classification"}
    assert any(note.startswith("cifar10:") and "cifar-10-batches-py" in note for note in notes)
    flickr_set = found["flickr30k"].build(None)
    assert flickr_set.captions == ["a black square"] and flickr_set.image_paths[0].is_file()
    coco = found["coco2017"].build(None)
    assert len(coco.image_paths) == 3 and coco.text_to_image == [0, 0, 1, 1, 2, 2]
    colours = found["colours"].build(lambda image: image)
    assert colours.classnames == ["blue", "green", "red"] and colours.train is not None
    with pytest.raises(FileNotFoundError):
        discover_datasets(tmp_path / "nowhere")


def test_discovery_on_the_generated_corpus(tiny_corpus):
    found, _ = discover_datasets(tiny_corpus / "eval")
    assert found["coco2017"].task == "retrieval" and found["shapes"].task == "classification"
    shapes = found["shapes"].build(lambda image: image)
    assert "red circle" in shapes.classnames and shapes.train is not None
    assert shapes.templates[0] == "a photo of a {}."


# --- models and params.txt -----------------------------------------------------------------------------


def test_params_txt_values_and_open_clip_train_spec():
    assert parse_param_value("None") is None and parse_param_value("True") is True
    assert parse_param_value("3") == 3 and parse_param_value("0.5") == 0.5
    assert parse_param_value("[0.5, 0.25]") == [0.5, 0.25] and parse_param_value("ViT-B-32") == "ViT-B-32"
    assert parse_param_value("__import__('os')") == "__import__('os')"  # text, never evaluated
    spec = open_clip_train_spec({"model": "clipc-vit-t2-32", "force_quick_gelu": True, "force_image_size": None})
    assert spec == {"kind": "open_clip", "model": "clipc-vit-t2-32", "model_kwargs": {"force_quick_gelu": True}}
    assert open_clip_train_spec({"model": "x"}, model_name="clipc-vit-t2-64")["model"] == "clipc-vit-t2-64"
    with pytest.raises(ValueError, match="model name"):
        open_clip_train_spec({})


def test_load_encoder_sources_and_errors(tmp_path):
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    model = open_clip.create_model("clipc-vit-t2-32")
    ours = {"epoch": 1, "model_spec": open_clip_spec("clipc-vit-t2-32"), "state_dict": model.state_dict()}
    stock = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    images = torch.randn(2, 3, 32, 32)
    expected = F.normalize(model.eval().encode_image(images), dim=-1)
    for encoder in (clip_eval.load_encoder(ours), clip_eval.load_encoder(stock, model_name="clipc-vit-t2-32")):
        assert torch.allclose(encoder.encode_image(images), expected, atol=1e-5)
        assert encoder.encode_text(["a red circle", "a blue square"]).shape == (2, 64)
        assert encoder.image_size == 32
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    named = clip_eval.load_encoder("clipc-vit-t2-32", pretrained=str(weights))
    assert torch.allclose(named.encode_image(images), expected, atol=1e-5)

    with pytest.raises(FileNotFoundError):
        clip_eval.load_encoder(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="neither"):
        clip_eval.load_encoder("no-such-model")
    with pytest.raises(ValueError, match="model name"):
        clip_eval.load_encoder(stock)  # open_clip_train checkpoint, no params.txt, no model_name
    with pytest.raises(ValueError, match="state_dict"):
        clip_eval.load_encoder({"epoch": 1})


# --- profiling -----------------------------------------------------------------------------------------


def test_profile_counts_each_tower_and_measures_latency():
    from compress.ops.profile import profile_encoder, profile_model

    encoder = clip_eval.load_encoder("clipc-vit-t2-32")
    model = encoder.model
    stats = profile_encoder(encoder, batch_size=4, repeats=2, warmup=1)
    visual = sum(p.numel() for p in model.visual.parameters())
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["params_image"] == visual
    # everything else but the temperature (logit_scale) belongs to the text tower
    assert stats["params_text"] == stats["params"] - visual - model.logit_scale.numel()
    assert stats["macs_image"] > 0 and stats["macs_text"] > 0
    assert stats["latency_image_ms"] > 0 and stats["latency_text_ms"] > 0
    # per-sample MACs do not depend on the timing batch
    assert profile_model(model, 32, batch_size=2, repeats=1, warmup=0)["macs_image"] == stats["macs_image"]


def test_profile_model_with_string_text_input():
    from compress.ops.profile import profile_model

    class StringTextModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_head = torch.nn.Linear(3 * 8 * 8, 4)
            self.text_table = torch.nn.Embedding(10, 4)

        def encode_image(self, images):
            return self.image_head(images.flatten(1))

        def encode_text(self, texts):
            return self.text_table(torch.tensor([len(t) % 10 for t in texts]))

    model = StringTextModel()
    model.model_spec = {"kind": "test", "text_input": "strings"}
    stats = profile_model(model, 8, batch_size=3, repeats=1, warmup=0)
    assert stats["params_image"] == 3 * 64 * 4 + 4 and stats["params_text"] == 40
    assert stats["macs_image"] == 3 * 64 * 4 and stats["macs_text"] == 0
