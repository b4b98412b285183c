"""Pretrained weights by name on a cluster: OpenAI's tags get open_clip's -quickgelu config, and a model build
that downloads runs in turns (rank 0, then each other node's first rank, then the rest), so each cache is
filled once and every other process reads it. No network: open_clip's download is replaced by a fake."""
import contextlib
import json
import logging
import os
import sys
import time

import pytest
from conftest import REPO, free_port, launched, subprocess_env

from compress.models.pretrained import ModelSourceError, config_for_weights

# --- which config a tag's weights are built with -------------------------------------------------------


@pytest.mark.parametrize("model, tag, chosen", [
    ("ViT-B-32", "openai", "ViT-B-32-quickgelu"),  # OpenAI's weights were trained with QuickGELU
    ("RN50", "openai", "RN50-quickgelu"),
    ("ViT-B-32-quickgelu", "openai", "ViT-B-32-quickgelu"),
    ("ViT-B-32", "laion2b_s34b_b79k", "ViT-B-32"),  # a GELU tag stays in the GELU config
    ("ViT-B-32", "weights/ViT-B-32.pt", "ViT-B-32"),  # a file: not a tag, as asked
    ("clipc-vit-t2-32", None, "clipc-vit-t2-32"),
])
def test_a_tag_is_built_with_the_activation_it_was_trained_with(model, tag, chosen):
    assert config_for_weights(model, tag) == chosen


def test_a_tag_without_a_config_of_its_activation_is_one_line_naming_quickgelu(monkeypatch):
    import open_clip

    with pytest.raises(ModelSourceError, match="pass --model ViT-B-32, not ViT-B-32-quickgelu"):
        config_for_weights("ViT-B-32-quickgelu", "laion2b_s34b_b79k")
    # a QuickGELU tag of a config that has no -quickgelu twin registered
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: (
        {"url": "https://example.invalid/w.pt", "quick_gelu": True} if (model, tag) == ("clipc-vit-t2-32", "oai")
        else real(model, tag)))
    with pytest.raises(ModelSourceError) as error:
        config_for_weights("clipc-vit-t2-32", "oai")
    assert "QuickGELU" in str(error.value) and "-quickgelu" in str(error.value) and "\n" not in str(error.value)


def test_the_trainer_chooses_the_config_at_parse_time_and_says_so(tmp_path):
    """So the run's spec, its teacher spec and params.txt all name the config that is built."""
    from training.params import parse_args

    common = ["--train-data", "synthetic", "--logs-root", str(tmp_path)]
    args = parse_args(common + ["--model", "ViT-B-32", "--pretrained", "openai"])
    assert args.model == "ViT-B-32-quickgelu"
    assert args.config_notes == ["--pretrained openai was trained with QuickGELU: --model ViT-B-32-quickgelu is "
                                 "built, not ViT-B-32"]
    args = parse_args(common + ["--job", "distill", "--teacher-model", "ViT-B-32", "--teacher-pretrained", "openai"])
    assert args.teacher_model == "ViT-B-32-quickgelu" and args.model == "clipc-vit-t2-64"
    args = parse_args(common + ["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"])
    assert args.model == "ViT-B-32" and args.config_notes == []


def test_create_clip_builds_the_quickgelu_config_of_openai_weights(monkeypatch, caplog):
    """The one builder chooses too (eval, the tools, a ProtoRKD teacher rebuilt from its spec); open_clip's
    create_model is replaced by a small build, so nothing is downloaded."""
    import open_clip

    from compress.models.pretrained import create_clip

    asked = []
    real = open_clip.create_model

    def small_build(model_name, pretrained=None, **kwargs):
        asked.append((model_name, pretrained))
        return real("clipc-vit-t2-32")

    monkeypatch.setattr(open_clip, "create_model", small_build)
    with caplog.at_level(logging.INFO):
        model = create_clip("ViT-B-32", "openai")
    assert asked == [("ViT-B-32-quickgelu", "openai")]
    assert model.model_spec["model"] == "ViT-B-32-quickgelu"  # rebuilt from its spec with the same activation
    assert "--pretrained openai was trained with QuickGELU: building ViT-B-32-quickgelu, not ViT-B-32" in caplog.text


# --- a download in turns, over a real gloo process group ----------------------------------------------


def _fake_download(cache: str, record: str, rank: int):
    """open_clip's download_pretrained as a cache would see it: the first call into a cache folder downloads
    (slowly), later ones find the file."""
    def download_pretrained(cfg, prefer_hf_hub=True, cache_dir=None):
        started = time.time()
        target = os.path.join(cache, os.path.basename(cfg["url"]))
        event = "hit" if os.path.exists(target) else "download"
        if event == "download":
            time.sleep(0.3)
            with open(target + ".part", "w") as handle:
                handle.write("weights")
            os.replace(target + ".part", target)
        with open(record, "a") as handle:
            handle.write(json.dumps({"rank": rank, "cache": cache, "event": event, "start": started,
                                     "end": time.time()}) + "\n")
        return target
    return download_pretrained


def turns_worker(out: str) -> None:
    """One rank (RANK, LOCAL_RANK from the environment, 2 "nodes" of 2): fetch a tag's weights in turns into
    the node's own cache, then into a cache shared by the nodes; then a fetch that fails on rank 0."""
    import open_clip

    from training.distributed import cleanup, in_turns, init_distributed

    info = init_distributed("cpu")
    node = info.rank // 2
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    record = os.path.join(out, "events.jsonl")
    for cache in (os.path.join(out, f"node{node}"), os.path.join(out, "shared")):
        os.makedirs(cache, exist_ok=True)
        # open_clip's download of a tag's weights (faked: no network), which the trainer's model build makes
        # inside in_turns
        open_clip.pretrained.download_pretrained = _fake_download(cache, record, info.rank)
        in_turns(lambda: open_clip.pretrained.download_pretrained(cfg), info.local_rank)

    def fails_on_rank_0():
        if info.rank == 0:
            raise ValueError("no network")
        return info.rank

    try:
        outcome = in_turns(fails_on_rank_0, info.local_rank)
    except ValueError as error:
        outcome = str(error)
    with open(os.path.join(out, f"outcome{info.rank}.json"), "w") as handle:
        json.dump(outcome, handle)
    cleanup()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rank_zero_fetches_first_then_each_nodes_first_rank_then_the_rest(tmp_path):
    port, world = free_port(), 4
    code = f"import test_pretrained; test_pretrained.turns_worker({str(tmp_path)!r})"
    procs = []
    with contextlib.ExitStack() as stack:
        for rank in range(world):
            env = subprocess_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % 2),
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env["PYTHONPATH"]
            procs.append(stack.enter_context(launched([sys.executable, "-c", code], cwd=tmp_path, env=env)))
        for proc in procs:
            assert proc.wait(timeout=200) == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]

    def turn(rank):
        return 0 if rank == 0 else 1 if rank % 2 == 0 else 2

    for cache, downloaders in ((str(tmp_path / "node0"), [0]), (str(tmp_path / "node1"), [2]),
                               (str(tmp_path / "shared"), [0])):
        here = [e for e in events if e["cache"] == cache]
        assert sorted(e["rank"] for e in here if e["event"] == "download") == downloaders, here
        # every turn starts after the one before it ended: the others wait while a cache is filled
        for early in here:
            for late in here:
                if turn(early["rank"]) < turn(late["rank"]):
                    assert early["end"] <= late["start"], (early, late)
    assert sum(e["event"] == "download" for e in events) == 3  # one per cache: 4 ranks x 2 caches would be 8
    outcomes = [json.loads((tmp_path / f"outcome{rank}.json").read_text()) for rank in range(world)]
    assert outcomes == ["no network", 1, 2, 3]  # the others went on in turn; rank 0 raised after the turns

