"""The on-disk cascaded search: `python -m utils.cascade index` / `search` from the command line, galleries
streamed from disk, lazily embedded candidates persisted for later queries, a build killed mid-way with a
real signal that resumes, approximate level-1 indexes, unreadable images, and refusing stale indexes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, launched, subprocess_env

from compress.ops.cascade import ENCODED, MISSING, SearchIndex
from foundation.images import open_rgb
from utils.cascade import Searcher, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def levels(tmp_path_factory):
    """A random-init clipc-vit-t2-32 ('large') and a 1-layer ViT student on its text tower ('small'), saved as
    our checkpoints."""
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
    return paths


def _run(argv, capsys):
    main([str(a) for a in argv])
    return capsys.readouterr().out


def _search_json(index_dir, queries, capsys, *extra):
    return json.loads(_run(["search", index_dir, *queries, "--json", "--log-level", "warning", *extra], capsys))


def test_index_and_search_from_the_command_line(levels, tiny_corpus, tmp_path, capsys):
    import eval

    out = tmp_path / "index"
    printed = _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["small"], levels["large"],
                    "--out", out, "--batch-size", "16", "--log-level", "warning"], capsys)
    assert "indexed 72 images" in printed and "level 1 embedded 72 (0 unreadable)" in printed
    index = SearchIndex.open(out)
    assert index.complete and index.size == 72 and (index.level1_store.state == ENCODED).all()
    assert (index.store_of(1).state == MISSING).all()  # the large model has embedded nothing yet
    again = _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["small"], levels["large"],
                  "--out", out, "--log-level", "warning"], capsys)
    assert again.endswith("already indexed (72 images); nothing to do\n")

    query = "two large red circles on a grey background"
    (answer,) = _search_json(out, [query], capsys, "--k", "5", "--m", "10")
    assert answer["query"] == query and len(answer["results"]) == 5
    # the large model embedded exactly level 1's shortlist, and kept it on disk
    shortlisted = np.flatnonzero(SearchIndex.open(out).store_of(1).state == ENCODED)
    assert len(shortlisted) == 10
    # the answer is the large model's own order within the student's shortlist
    small, large = eval.load_encoder(levels["small"]), eval.load_encoder(levels["large"])
    images = torch.stack([large.preprocess(open_rgb(p)) for p in index.paths])
    text = large.encode_text([query], normalize=True)
    student_order = torch.sort((text.double() @ small.encode_image(images).double().T)[0], descending=True,
                               stable=True).indices[:10]
    assert sorted(student_order.tolist()) == shortlisted.tolist()
    large_scores = (text.double() @ large.encode_image(images[shortlisted]).double().T)[0]
    expected = shortlisted[torch.sort(large_scores, descending=True, stable=True).indices[:5].numpy()]
    assert [r["index"] for r in answer["results"]] == expected.tolist()
    assert [r["path"] for r in answer["results"]] == [index.paths[i] for i in expected]
    assert [r["score"] for r in answer["results"]] == pytest.approx(sorted(large_scores.tolist(), reverse=True)[:5])

    # a later process reuses what the first search embedded: the same query embeds nothing more
    searcher = Searcher.open(out)
    cascade = searcher.cascade([10])
    assert [i for _, _, i in searcher.search([query], k=5, cascade=cascade)[0]] == expected.tolist()
    assert cascade.images_encoded() == [0, 0]
    printed = _run(["search", out, query, "a green star", "--k", "3", "--m", "20", "--log-level", "warning"], capsys)
    assert printed.count("query: ") == 2 and "embedded now, per level: 0+" in printed


def _state_done(path):
    try:
        return int(np.count_nonzero(np.fromfile(path, dtype=np.uint8)))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_a_build_killed_mid_way_resumes_where_it_stopped(levels, tiny_corpus, tmp_path, capsys):
    """SIGKILL (no clean-up of any kind) while level 1 streams the gallery; the rerun embeds only the rest and
    ends with the features and index of an uninterrupted build."""
    gallery = tiny_corpus / "train.tsv"  # 256 training images: a gallery given as a table of paths
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "utils.cascade", "index", "--gallery", str(gallery), "--levels",
           str(levels["large"]), "--out", str(out), "--batch-size", "1", "--threads", "1", "--log-level", "warning"]
    state = out / "store1.state"
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        deadline = time.time() + 240
        while _state_done(state) < 8 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = _state_done(state)
    assert 8 <= done_at_kill < 256, "the build was not caught mid-way"
    assert not (out / "level1.faiss").exists() and not SearchIndex.open(out, check_complete=False).complete
    with pytest.raises(SystemExit):  # searching an unfinished index is refused in one line
        main(["search", str(out), "a red circle", "--log-level", "warning"])
    assert "has not finished" in capsys.readouterr().err

    printed = _run(["index", "--gallery", gallery, "--levels", levels["large"], "--out", out, "--batch-size", "32",
                    "--log-level", "warning"], capsys)
    resumed_from = int(printed.split("resumed after ")[1].split(":")[0])
    assert resumed_from >= done_at_kill
    assert f"level 1 embedded {256 - resumed_from} " in printed

    clean = tmp_path / "clean"
    _run(["index", "--gallery", gallery, "--levels", levels["large"], "--out", clean, "--log-level", "warning"],
         capsys)
    resumed, uninterrupted = SearchIndex.open(out), SearchIndex.open(clean)
    assert resumed.paths == uninterrupted.paths
    np.testing.assert_allclose(resumed.level1_store.features, uninterrupted.level1_store.features, atol=1e-6)
    queries = ["a red circle", "three small blue squares", "a yellow star in the top left"]
    # the same images in other batches: features equal up to float rounding, so the same answers
    for mine, theirs in zip(_search_json(out, queries, capsys, "--k", "10"),
                            _search_json(clean, queries, capsys, "--k", "10")):
        assert [r["index"] for r in mine["results"]] == [r["index"] for r in theirs["results"]]
        assert [r["score"] for r in mine["results"]] == pytest.approx([r["score"] for r in theirs["results"]],
                                                                      abs=1e-6)


def test_ivf_with_every_list_probed_equals_the_flat_index_and_hnsw_answers(levels, tiny_corpus, tmp_path, capsys):
    queries = ["a red circle", "two green crosses", "a purple star on a black background"]
    results = {}
    for kind, extra in (("flat", []), ("ivf", ["--nlist", "4"]), ("hnsw", ["--hnsw-m", "8"])):
        out = tmp_path / kind
        _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["small"], levels["large"], "--out", out,
              "--index", kind, *extra, "--log-level", "warning"], capsys)
        assert SearchIndex.open(out).manifest["index"]["kind"] == kind
        search_flags = {"ivf": ["--nprobe", "4"], "hnsw": ["--ef-search", "64"]}.get(kind, [])
        results[kind] = _search_json(out, queries, capsys, "--k", "5", "--m", "20", *search_flags)
    assert results["ivf"] == results["flat"]
    for answer in results["hnsw"]:
        found = [r["index"] for r in answer["results"]]
        assert len(found) == 5 == len(set(found)) and all(0 <= i < 72 for i in found)


def test_an_unreadable_gallery_image_is_reported_and_never_ranked(levels, tiny_corpus, tmp_path, capsys):
    images = sorted((tiny_corpus / "eval" / "coco2017" / "val2017").glob("*.jpg"))[:12]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    table = tmp_path / "gallery.tsv"
    table.write_text("filepath\n" + "".join(f"{p}\n" for p in images[:5]) + "broken.jpg\n"
                     + "".join(f"{p}\n" for p in images[5:]))
    out = tmp_path / "index"
    printed = _run(["index", "--gallery", table, "--levels", levels["small"], levels["large"], "--out", out,
                    "--log-level", "warning"], capsys)
    assert "indexed 13 images" in printed and "(1 unreadable)" in printed
    (answer,) = _search_json(out, ["a blue square"], capsys, "--k", "13", "--m", "13")
    found = [r["index"] for r in answer["results"]]
    assert sorted(found) == [i for i in range(13) if i != 5]  # every readable image, the broken one never


def test_stale_or_foreign_indexes_are_refused_in_one_line(levels, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "index"
    _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["small"], levels["large"], "--out", out,
          "--max-images", "20", "--log-level", "warning"], capsys)
    with pytest.raises(SystemExit) as exit_info:  # other levels into the same folder
        main(["index", "--gallery", str(tiny_corpus / "eval"), "--levels", str(levels["large"]), "--out", str(out),
              "--max-images", "20", "--log-level", "warning"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["large"], "--out", out, "--max-images", "20",
          "--overwrite", "--log-level", "warning"], capsys)
    assert len(SearchIndex.open(out).levels) == 1

    changed = tmp_path / "large_changed.pt"
    changed.write_bytes(levels["large"].read_bytes())
    moved = tmp_path / "moved"
    _run(["index", "--gallery", tiny_corpus / "eval", "--levels", changed, "--out", moved, "--max-images", "20",
          "--log-level", "warning"], capsys)
    checkpoint = torch.load(changed, weights_only=True)
    checkpoint["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, changed)
    with pytest.raises(SystemExit):
        main(["search", str(moved), "a red circle", "--log-level", "warning"])
    assert "SHA-256 changed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(out), "a red circle", "--m", "5", "--log-level", "warning"])  # one level: no m
    assert "give 0 candidate count(s)" in capsys.readouterr().err


def test_search_parsers_name_their_command_and_explain_every_flag():
    from utils.cascade import build_index_parser, build_search_parser

    for build, prog in ((build_index_parser, "clipcompress cascade index"),
                        (build_search_parser, "clipcompress cascade search")):
        parser = build()
        assert parser.prog == prog and all(action.help for action in parser._actions)


def test_features_are_normalised_and_stored_as_float32(levels, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "index"
    _run(["index", "--gallery", tiny_corpus / "eval", "--levels", levels["small"], "--out", out, "--max-images", "8",
          "--log-level", "warning"], capsys)
    features = SearchIndex.open(out).level1_store.features
    assert features.dtype == np.float32 and features.shape == (8, 64)
    torch.testing.assert_close(F.normalize(torch.from_numpy(np.array(features)), dim=1),
                               torch.from_numpy(np.array(features)))


def test_gallery_images_are_preprocessed_exactly_as_the_transform_does_one_by_one(tiny_corpus):
    """ImageFiles applies the tensor steps of an open_clip eval transform once per batch (split_preprocess): the
    pixels are bit-identical to the transform applied image by image, for RGB images, for a transform whose
    PIL steps leave another mode (ToTensor's own conversion), and for a plain callable (applied as it is)."""
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    from compress.models.preprocess import split_preprocess
    from compress.ops.cascade import ImageFiles

    paths = sorted((tiny_corpus / "eval" / "coco2017" / "val2017").glob("*.jpg"))[:6]
    eval_transform = image_transform(48, is_train=False)
    grey = T.Compose([T.Grayscale(), T.Resize(24), T.ToTensor(), T.Normalize([0.5], [0.25])])
    plain = lambda image: T.functional.pil_to_tensor(image).float()  # noqa: E731
    assert split_preprocess(eval_transform)[1] is not None and split_preprocess(plain) == (plain, None)
    for preprocess in (eval_transform, grey, plain):
        images, readable, unreadable = ImageFiles(paths, preprocess).load(np.arange(len(paths)))
        expected = torch.stack([preprocess(open_rgb(p)) for p in paths])
        assert torch.equal(images, expected) and images.dtype == expected.dtype
        assert readable.tolist() == list(range(len(paths))) and not len(unreadable)
