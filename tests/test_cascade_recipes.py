"""Cascade levels that say how they are made: each recipe kind (token masking, head sensitivity, Fisher
pruning, a distill-job student) built from the large model on first use, cached by recipe + source hash,
reused by later runs and by a `distill` experiment; and every casCLIP config under scripts/experiments/
names valid recipes, what scripts/demo.sh writes as its default paths, and runs by name with no overrides."""
import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import compress
from foundation.errors import UserError
from utils.cascade import EXPERIMENTS_DIR, experiment_config, main, read_experiment
from utils.cascade.recipes import BuildSettings, normalize_recipe, recipe_key, recipe_kind
from utils.cascade.search import LevelSource

REPO = Path(__file__).resolve().parents[1]
CASCLIP_CONFIGS = (
    [f"2lvl_distill_{kind}_{arch}" for kind in ("topk", "speedup")
     for arch in ("mobilenetv3-S", "mobilenetv3-L", "resnet34", "resnet50")]
    + [f"2lvl_flip_{kind}_{x}" for kind in ("topk", "speedup") for x in ("2x", "3x")]
    + [f"2lvl_sensitivity_{kind}_{n}" for kind in ("topk", "speedup") for n in (22, 77, 132)]
    + [f"2lvl_fisher_{kind}" for kind in ("topk", "speedup")]
    + [f"distilling_{arch}" for arch in ("mobilenetv3-S", "mobilenetv3-L", "resnet34", "resnet50")])


pytestmark = pytest.mark.usefixtures("one_thread", "cascade_logs_in_tmp")  # tests/conftest.py


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clipc-vit-t2-32")
    path = tmp_path_factory.mktemp("large") / "large.pt"
    torch.save({"model_spec": open_clip_spec("clipc-vit-t2-32"), "state_dict": model.state_dict()}, path)
    return path


DISTILL = ('{student = "mobilenet_v3_small", epochs = 1, batch_size = 32, dataset_size = 64, warmup = 1, '
           'args = ["--bn-recalibration-batches", "1"]}')


def _config(tmp_path, tiny_corpus, large, experiment, body, name="recipes"):
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
experiment = "{experiment}"
name = "{name}"
[data]
eval_data_dir = "{tiny_corpus / 'eval'}"
max_queries = 60
[calibration]
data = "{tiny_corpus / 'train.tsv'}"
batches = 2
batch_size = 8
[distill]
train_data = "{tiny_corpus / 'train.tsv'}"
[cache]
dir = "{tmp_path / 'cache'}"
{body}
[[levels]]
checkpoint = "{large}"
""")
    return path


@pytest.mark.slow
def test_every_recipe_kind_is_built_once_then_reused(large, tiny_corpus, tmp_path, capsys):
    config = _config(tmp_path, tiny_corpus, large, "topk", f"""
[cascade]
m = [[60, 40, 30, 20]]
k = [1, 5]
[[levels]]
distill = {DISTILL}
[[levels]]
token_mask = {{drop = 0.5}}
[[levels]]
head_sensitivity = {{num_heads = 1}}
[[levels]]
fisher = {{mac_constraint = 0.65}}
""")
    main(["--config", str(config), "--json", str(tmp_path / "first.json"), "--log-level", "warning"])
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["levels"][:4] == ["distill mobilenet_v3_small", "token_mask drop=0.5", "head_sensitivity 1 heads",
                                   "fisher mac=0.65"]
    rows = {row["system"]: row for row in first["rows"]}
    assert set(rows) == {"large alone", "level 1 alone", "cascade m=60,40,30,20"}
    assert rows["cascade m=60,40,30,20"]["levels"][0]["encoded"] == 72  # level 1 indexed the gallery
    built = sorted((tmp_path / "cache").glob("*/recipe.json"))
    assert [p.parent.name.split("-")[0] for p in built] == ["distill", "fisher", "head_sensitivity", "token_mask"]

    # what each recipe made, rebuilt from its checkpoint like any of our models
    models = {kind: compress.load(path) for kind, path in zip(("distill", "token_mask", "heads", "fisher"),
                                                               first["checkpoints"][:4])}
    assert models["distill"].model_spec["image_tower"]["name"] == "mobilenet_v3_small"
    assert models["token_mask"].model_spec["token_mask"] == {"drop": 0.5, "seed": 0, "per_image": True}
    blocks = models["heads"].model_spec["blocks"]
    heads = [block["heads"] for name, block in blocks.items() if name.startswith("visual")]
    assert sum(heads) == 2 * 2 - 1  # clipc-vit-t2-32's image tower: 2 layers of 2 heads, one removed
    assert models["fisher"].model_spec["kind"] == "compact_clip" and models["fisher"].model_spec["blocks"]

    stamps = {p: p.stat().st_mtime_ns for p in built}
    main(["--config", str(config), "--json", str(tmp_path / "second.json"), "--log-level", "warning"])
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["checkpoints"] == first["checkpoints"]
    assert {p: p.stat().st_mtime_ns for p in built} == stamps  # found in the cache, nothing rebuilt
    assert sorted((tmp_path / "cache").glob("*/recipe.json")) == built

    # casCLIP's distilling_* experiment: the same distill recipe is the cached student, scored beside its teacher
    distilling = _config(tmp_path, tiny_corpus, large, "distill", f"[[levels]]\ndistill = {DISTILL}",
                         name="distilling")
    main(["--config", str(distilling), "--json", str(tmp_path / "distill.json"), "--log-level", "warning"])
    summary = json.loads((tmp_path / "distill.json").read_text())
    assert summary["student"] == first["checkpoints"][0] and summary["built"] is False
    for role in ("student", "teacher"):
        assert {f"zeroshot/shapes/acc{k}" for k in (1, 3, 5, 10, 20)} <= set(summary["zeroshot"][role])
    assert "from the cache" in capsys.readouterr().out


def test_the_key_follows_the_recipe_its_defaults_and_the_source(large, tmp_path):
    settings = BuildSettings(cache_dir=str(tmp_path))
    source = LevelSource(checkpoint=str(large))
    half = recipe_key("token_mask", normalize_recipe("token_mask", {"drop": 0.5}), source, settings)
    assert half == recipe_key("token_mask", normalize_recipe("token_mask", {"drop": 0.5, "seed": 0}), source, settings)
    assert half != recipe_key("token_mask", normalize_recipe("token_mask", {"drop": 0.74}), source, settings)
    other = tmp_path / "other.pt"
    checkpoint = torch.load(large, weights_only=True)
    checkpoint["state_dict"]["logit_scale"] = checkpoint["state_dict"]["logit_scale"] + 1
    torch.save(checkpoint, other)
    assert half != recipe_key("token_mask", normalize_recipe("token_mask", {"drop": 0.5}),
                              LevelSource(checkpoint=str(other)), settings)


def test_bad_recipes_are_one_line_naming_the_parameter():
    with pytest.raises(UserError, match=r"token_mask.dorp: unknown parameter"):
        normalize_recipe("token_mask", {"dorp": 0.5})
    with pytest.raises(UserError, match=r"fisher.mac_constraint: missing"):
        normalize_recipe("fisher", {})
    with pytest.raises(UserError, match=r"token_mask.drop = 1.0"):
        normalize_recipe("token_mask", {"drop": 1.0})
    with pytest.raises(UserError, match="exactly one of num_heads and fraction"):
        normalize_recipe("head_sensitivity", {"num_heads": 2, "fraction": 0.5})
    with pytest.raises(UserError, match="several recipes"):
        recipe_kind({"token_mask": {"drop": 0.5}, "fisher": {"mac_constraint": 0.5}})


@pytest.mark.parametrize("name", CASCLIP_CONFIGS)
def test_every_casclip_experiment_has_a_config_with_valid_recipes(name):
    import tomllib

    config = tomllib.loads((REPO / "scripts" / "experiments" / f"{name}.toml").read_text())
    assert config["name"] == name
    kind = name.split("_")[1] if name.startswith("2lvl") else "distilling"
    expected = {"distill": "distill", "flip": "token_mask", "sensitivity": "head_sensitivity", "fisher": "fisher",
                "distilling": "distill"}[kind]
    levels = config["levels"]
    assert len(levels) == 2 and recipe_kind(levels[0]) == expected and "checkpoint" in levels[1]
    params = normalize_recipe(expected, levels[0][expected])
    assert config["experiment"] == ("distill" if name.startswith("distilling") else name.split("_")[2])
    if expected == "distill":
        arch = {"mobilenetv3-S": "mobilenet_v3_small", "mobilenetv3-L": "mobilenet_v3_large", "resnet34": "resnet34",
                "resnet50": "resnet50"}[name.rsplit("_", 1)[1]]
        assert params["student"] == arch
        # a 2lvl_distill experiment uses the student its distilling_* config trains (one cache entry)
        partner = "distilling_" + name.rsplit("_", 1)[1]
        other = tomllib.loads((REPO / "scripts" / "experiments" / f"{partner}.toml").read_text())
        assert normalize_recipe("distill", other["levels"][0]["distill"]) == params
    if expected == "token_mask":
        assert params["drop"] == {"2x": 0.5, "3x": 0.74}[name.rsplit("_", 1)[1]]
    if expected == "head_sensitivity":
        assert round(params["fraction"] * 144) == int(name.rsplit("_", 1)[1])  # of ViT-B/32's 144 image heads
    if expected == "fisher":
        assert params["mac_constraint"] == 0.65


def demo_outputs():
    """What scripts/demo.sh writes (with DEMO_DIR unset, relative to where it runs), read from the script: its
    corpus's eval root and training TSV, the demo CLIP and the distilled student."""
    script = (REPO / "scripts" / "demo.sh").read_text()
    variables = {"ROOT": "", "REPO": ""}
    for name, value in re.findall(r'^(CORPUS|LOGS|EVAL|DENSE|STUDENT)="([^"]+)"$', script, flags=re.M):
        for known, replacement in variables.items():
            value = value.replace(f"${{{known}:-$REPO}}", replacement).replace(f"${known}", replacement)
        variables[name] = value.replace("${DEMO_DIR}", "")
    found = {key: variables[key].lstrip("/") for key in ("EVAL", "DENSE", "STUDENT", "CORPUS")}
    assert found == {"EVAL": "data/demo/eval", "DENSE": "logs/demo/clip/checkpoints/epoch_3.pt",
                     "STUDENT": "logs/demo/distill_student/checkpoints/epoch_1.pt", "CORPUS": "data/demo"}
    assert '"$CORPUS/train.tsv"' in script
    return {"eval": found["EVAL"], "train": f"{found['CORPUS']}/train.tsv", "clip": found["DENSE"],
            "student": found["STUDENT"]}


NO_OVERRIDES = dict(levels=None, large=None, eval_data_dir=None, dataset=None, calib_data=None, train_data=None,
                    cache_dir=None, max_images=None, max_queries=None, device=None, plot=None, repeats=None,
                    log_level="warning")


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")))
def test_every_config_reads_what_the_demo_writes(name):
    """Run as shipped after `bash scripts/demo.sh`, each config finds every input: its gallery, its training and
    calibration data and its checkpoints are paths the demo writes."""
    outputs = demo_outputs()
    assert experiment_config(name) == EXPERIMENTS_DIR / f"{name}.toml"
    exp = read_experiment(str(experiment_config(name)), argparse.Namespace(**NO_OVERRIDES))
    inputs = {exp.eval_data_dir, exp.build.train_data, exp.build.calib_data} - {None}
    inputs |= {level["checkpoint"] if isinstance(level, dict) else level for level in exp.levels
               if isinstance(level, str) or "checkpoint" in level}
    assert inputs and inputs <= set(outputs.values()), inputs - set(outputs.values())
    assert outputs["clip"] in inputs  # the large model is the demo CLIP


def test_a_name_that_is_no_experiment_is_one_line_listing_them():
    for bad in ("2lvl_flip_topk_9x", "../experiments/2lvl_flip_topk_2x", ".hidden", ""):
        with pytest.raises(UserError, match="no experiment of that name .*known: 2lvl_distill_speedup"):
            experiment_config(bad)
    assert experiment_config("2lvl_flip_topk_2x.toml") == EXPERIMENTS_DIR / "2lvl_flip_topk_2x.toml"


@pytest.mark.slow
def test_a_config_runs_by_name_with_no_overrides_after_the_demo(large, tiny_corpus, tmp_path, monkeypatch, capsys):
    """A stand-in for what the demo writes (the tiny corpus's eval root, a CLIP where the demo's lies), then
    casCLIP's `run.py --name 2lvl_flip_topk_2x`: the table on the console and in its own log folder."""
    outputs = demo_outputs()
    shutil.copytree(tiny_corpus / "eval", tmp_path / outputs["eval"])
    (tmp_path / outputs["clip"]).parent.mkdir(parents=True)
    shutil.copy(large, tmp_path / outputs["clip"])
    monkeypatch.chdir(tmp_path)
    import utils.cascade

    # the command line's own default (the file's cascade_logs_in_tmp fixture moved it), relative to tmp_path here
    monkeypatch.setattr(utils.cascade, "DEFAULT_LOG_DIR", "logs/cascade")
    main(["--name", "2lvl_flip_topk_2x", "--log-level", "warning"])
    console = capsys.readouterr()
    table = console.out.strip()
    assert "large alone" in table and "cascade m=5" in table
    logs = list((tmp_path / "logs" / "cascade" / "2lvl_flip_topk_2x").glob("*.log"))
    assert len(logs) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.log", logs[0].name)
    text = logs[0].read_text()
    assert text.startswith("# clipcompress cascade ")
    assert f"# config: {EXPERIMENTS_DIR / '2lvl_flip_topk_2x.toml'}" in text
    assert text.rstrip().endswith(table)
    assert f"log: {Path('logs/cascade/2lvl_flip_topk_2x') / logs[0].name}" in console.err
    # a second run keeps the first's log
    main(["--name", "2lvl_flip_topk_2x", "--log-level", "warning", "--max-queries", "20"])
    assert len(list((tmp_path / "logs" / "cascade" / "2lvl_flip_topk_2x").glob("*.log"))) == 2


def test_a_block_left_without_heads_saves_and_loads():
    """casCLIP's 132-of-144 (or the demo CLIP losing all 4 of its heads) leaves blocks without attention: their
    spec has heads = 0, which the schema accepts and the rebuilt model computes the same."""
    from compress.models.registry import build_model, open_clip_spec
    from compress.ops.heads import prune_heads_by_sensitivity

    torch.manual_seed(0)
    dense = build_model(open_clip_spec("clipc-vit-t2-32")).eval()
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        text = torch.randint(1, 1000, (8, dense.context_length), generator=generator)
        text[:, -1] = 49407  # end of text: the text tower pools there
        batches.append({"image": torch.randn(8, 3, 32, 32, generator=generator), "text": text})
    pruned = prune_heads_by_sensitivity(dense, 4, batches)
    assert [block["heads"] for block in pruned.model_spec["blocks"].values()] == [0, 0]
    reloaded = compress.load({"model_spec": pruned.model_spec, "state_dict": pruned.state_dict()})
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), pruned.encode_image(images))
