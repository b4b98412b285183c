"""Cascaded search: exactness against the single encoder, m = gallery size, lazy caching, recall, and the
`python -m utils.cascade --config` experiments on the tiny generated COCO-layout set."""
import json

import pytest
import torch
import torch.nn.functional as F

from compress.ops.cascade import Cascade
from eval.metrics import ranks_in_ranking, recall_at_ks
from utils.cascade import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread", "cascade_logs_in_tmp")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-init clipc-vit-t2-32 ('large') and a 1-layer ViT student on its text tower ('small'),
    both saved as our checkpoints."""
    import open_clip

    import compress
    from compress.models.registry import open_clip_spec
    from compress.models.students import copy_teacher_text_tower, student_clip_spec, student_image_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    large = open_clip.create_model("clipc-vit-t2-32").eval()
    large.model_spec = open_clip_spec("clipc-vit-t2-32")
    small = compress.build_model(student_clip_spec(student_image_spec("teacher", "clipc-vit-t2-32", layers=1),
                                                   "clipc-vit-t2-32")).eval()
    copy_teacher_text_tower(small, large)
    folder = tmp_path_factory.mktemp("levels")
    paths = {}
    for name, model in (("small", small), ("large", large)):
        paths[name] = folder / f"{name}.pt"
        torch.save({"model_spec": model.model_spec, "state_dict": model.state_dict()}, paths[name])
    return {"large": large, "small": small, "paths": paths}


@pytest.fixture(scope="module")
def gallery(tiny_corpus, models):
    """Preprocessed gallery images and caption-query features of the tiny COCO-layout set."""
    from compress.models.registry import get_preprocess, get_tokenizer
    from foundation.images import open_rgb
    from utils.cascade import read_gallery

    data = read_gallery(tiny_corpus / "eval")
    spec = models["large"].model_spec
    preprocess = get_preprocess(spec)
    images = torch.stack([preprocess(open_rgb(path)) for path in data.paths])
    with torch.no_grad():
        queries = F.normalize(models["large"].encode_text(get_tokenizer(spec)(data.captions)), dim=-1)
    return images, queries, torch.tensor(data.text_to_image)


def _encode_with(model):
    return lambda images: F.normalize(model.encode_image(images), dim=-1)


def _exhaustive_top_k(features, queries, k):
    """The single encoder's own ranking: every gallery image scored, ties to the lower index."""
    scores = queries.double() @ features.double().T
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()
def test_cascade_of_one_encoder_ranks_exactly_like_it(models, gallery):
    images, queries, _ = gallery
    encode = _encode_with(models["large"])
    reference = _exhaustive_top_k(encode(images), queries, 10)
    for ms in ([30], [40, 20]):  # two and three levels of the same encoder
        cascade = Cascade([encode] * (len(ms) + 1), ms, images)
        assert torch.equal(cascade.search(queries, 10), reference)
        assert cascade.images_encoded()[1:] == [0] * len(ms)  # one encoder, embedded once
    assert torch.equal(Cascade([encode], [], images).search(queries, 10), reference)


@torch.no_grad()
def test_m_equal_to_gallery_size_is_the_large_model_alone(models, gallery):
    images, queries, _ = gallery
    small, large = _encode_with(models["small"]), _encode_with(models["large"])
    alone = Cascade([large], [], images).search(queries, 10)
    cascade = Cascade([small, large], [len(images)], images)
    assert torch.equal(cascade.search(queries, 10), alone)
    assert cascade.images_encoded() == [len(images), len(images)]


@torch.no_grad()
def test_large_level_encodes_only_the_candidates_and_caches_them(models, gallery):
    images, queries, _ = gallery
    small, large = _encode_with(models["small"]), _encode_with(models["large"])
    cascade = Cascade([small, large], [5], images)
    cascade.build()
    first = queries[:3]
    shortlist = torch.from_numpy(cascade.index.search(first.numpy(), 5)[1])  # level 1's faiss shortlist
    result = cascade.search(first, 3)
    assert cascade.images_encoded()[1] == len(torch.unique(shortlist))
    # the answer is the large model's order within the small model's shortlist
    large_features = F.normalize(models["large"].encode_image(images), dim=-1)
    for q in range(3):
        candidates = shortlist[q]
        order = torch.sort(first[q].double() @ large_features[candidates].double().T,
                           descending=True, stable=True).indices
        assert set(result[q].tolist()) <= set(candidates.tolist())
        assert torch.equal(result[q], candidates[order][:3])
    encoded = cascade.images_encoded()[1]
    cascade.search(first, 3)
    assert cascade.images_encoded()[1] == encoded  # cached: asking again embeds nothing


def test_recall_at_k_by_hand():
    ranked = torch.tensor([[3, 1, 2], [0, 2, 1], [2, 0, 1]])
    scores = torch.tensor([[0.9, 0.5, 0.1]] * 3, dtype=torch.float64)  # no ties: the list order is the rank
    targets = torch.tensor([3, 2, 1])
    ranks = ranks_in_ranking(ranked, scores, targets)
    assert recall_at_ks(ranks, [1, 2, 3]) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_recall_counts_a_tie_in_the_results_against_the_model():
    """The search puts the lower index first among equal scores; recall must not credit that order (the
    eval.metrics rule), including a tie with a result just past the largest k, and a target not returned."""
    ranked = torch.tensor([[4, 7, 2], [5, 1, 3], [6, 0, 8]])
    scores = torch.tensor([[0.8, 0.8, 0.1], [0.9, 0.4, 0.4], [0.7, 0.6, 0.5]], dtype=torch.float64)
    targets = torch.tensor([4, 1, 9])
    assert ranks_in_ranking(ranked, scores, targets)[:2].tolist() == [1, 2]
    assert recall_at_ks(ranks_in_ranking(ranked, scores, targets), [1, 2]) == {1: 0.0, 2: pytest.approx(1 / 3)}


def test_cli_parser_names_its_command_and_explains_every_flag():
    parser = build_parser()
    assert parser.prog == "clipcompress cascade"
    assert all(action.help for action in parser._actions)


def test_bad_candidate_counts_are_rejected(gallery):
    images, _, _ = gallery
    with pytest.raises(ValueError, match="need 1 candidate"):
        Cascade([lambda x: x, lambda x: x], [], images)


@pytest.mark.parametrize("kind", ["topk", "speedup"])
def test_experiment_cli_prints_table_and_plot(kind, models, tiny_corpus, tmp_path, capsys):
    config = tmp_path / f"{kind}.toml"
    config.write_text(f"""
experiment = "{kind}"
name = "tiny_{kind}"
[data]
eval_data_dir = "{tiny_corpus / 'eval'}"
[[levels]]
checkpoint = "{models['paths']['small']}"
[[levels]]
checkpoint = "{models['paths']['large']}"
[cascade]
m = [5, 72]
k = [1, 5, 10]
repeats = 1
per_query_queries = 4
lifetime_queries = 10
[output]
plot = "{tmp_path / 'plot.png'}"
""")
    main(["--config", str(config), "--json", str(tmp_path / "out.json")])
    printed = capsys.readouterr().out
    assert "large alone" in printed and "cascade m=5" in printed and "cascade m=72" in printed
    summary = json.loads((tmp_path / "out.json").read_text())
    rows = {row["system"]: row for row in summary["rows"]}
    assert summary["gallery"] == 72 and summary["queries"] == 360
    # m = the whole gallery: the large model's recall exactly, every image embedded by it
    for k in (1, 5, 10):
        assert rows["cascade m=72"][f"R@{k}"] == rows["large alone"][f"R@{k}"]
    assert rows["cascade m=72"]["large_encoded_fraction"] == 1.0
    assert 0 < rows["cascade m=5"]["large_encoded_fraction"] <= 1.0
    # overlap@10 against the large model's own top 10: all of it at m = the gallery, at most 5 of 10 from 5
    assert "overlap@10" in printed
    assert rows["large alone"]["overlap"] == 1.0 and rows["cascade m=72"]["overlap"] == 1.0
    assert 0 < rows["cascade m=5"]["overlap"] <= 0.5
    assert 0 <= rows["level 1 alone"]["overlap"] <= 1.0
    if kind == "speedup":
        assert all(row["per_query_ms"] > 0 and row["first_query_s"] > 0 for row in summary["rows"])
        # 10 queries × 5 candidates cannot cover 72 images: the sparse lifetime embeds a part of the gallery
        assert rows["cascade m=72"]["sparse_large_encoded_fraction"] == 1.0
        assert 0 < rows["cascade m=5"]["sparse_large_encoded_fraction"] <= 50 / 72
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_recall_speedup_plot_reads_without_the_code():
    import matplotlib.pyplot as plt

    from utils.cascade.experiments import recall_speedup_figure

    rows = [{"system": "large alone", "m": [], "lifetime_speedup": 1.0, "R@1": 30.0, "R@10": 66.0},
            {"system": "level 1 alone", "m": [], "lifetime_speedup": 4.8, "R@1": 21.0, "R@10": 56.0},
            {"system": "cascade m=50", "m": [50], "lifetime_speedup": 3.0, "R@1": 28.5, "R@10": 65.1},
            {"system": "cascade m=200,20", "m": [200, 20], "lifetime_speedup": 1.7, "R@1": 29.8, "R@10": 65.9}]
    figure = recall_speedup_figure(rows, [1, 10], "demo: coco2017, 5000 images, 1000 captions as queries")
    axes = figure.axes[0]
    assert axes.get_title() == ("Cascaded search: recall against speedup\n"
                                "demo: coco2017, 5000 images, 1000 captions as queries")
    assert axes.get_xlabel().startswith("speedup over the large model alone (×)")
    assert axes.get_ylabel() == "text-to-image recall@k (%)"
    # points are told apart by the legend, never by text that could overlap
    assert not axes.texts
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "recall@1", "recall@10", "large model alone", "level 1 alone", "cascade m=200,20", "cascade m=50"]
    plt.close(figure)


FULL_DISK_INDEX = """
import sys
import numpy as np, torch
from compress.ops.cascade import SearchIndex
from foundation.errors import UserError
folder, images = sys.argv[1], sys.argv[2:]
index = SearchIndex.create(folder, images * 50, [{"encoder": "random"}])
encode = lambda pixels: torch.nn.functional.normalize(torch.randn(len(pixels), 512), dim=1)
try:
    index.build(encode, lambda image: torch.zeros(3, 8, 8))
except UserError as error:
    print(error)
"""


@pytest.mark.slow
def test_a_full_disk_while_indexing_is_one_line(tmp_path, small_disk):
    """Level 1's features (100 x 512 float32, 200 KB) on a 64 KiB disk: written through a sparse memory map,
    the index build died of SIGBUS; the space is now reserved when the store is created."""
    from conftest import run_bounded
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    result = run_bounded(["-c", FULL_DISK_INDEX, small_disk / "index", tmp_path / "a.png", tmp_path / "b.png"],
                         timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"cannot write {small_disk / 'index' / 'store1.f32'}: No space left on device")
    assert not (small_disk / "index" / "store1.f32").exists()
