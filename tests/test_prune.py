"""UPop structured pruning: schedule, allocation, surgery equivalence, checkpoints, and the `--job prune` run."""
from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import compress
from compress.models import pruning
from compress.models.compact_clip import CompactBlock, clone, compact_spec, refresh_spec, to_compact, tower_blocks
from compress.models.registry import build_model
from compress.ops.profile import params_and_macs
from foundation.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = "clipc-vit-t2-32"


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model({"kind": "open_clip", "model": MODEL}).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 1000, (4, 16), generator=g)


def random_hard_masks(model, prune_heads: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = pruning.init_masks(model, prune_heads=prune_heads)
    for mask in masks.values():
        mask.copy_((torch.rand(mask.shape, generator=g) < 0.5).float())
        mask[torch.randint(mask.numel(), (1,), generator=g)] = 1.0  # every layer keeps a unit
    return masks


# --- schedule -------------------------------------------------------------------------------------------


def test_schedule_endpoints_and_shape():
    p, T = 0.5, 4
    # t = 0: p·sqrt((1 − cos(π/4)) / 2) = 0.5 · sqrt((1 − 0.70710678) / 2) = 0.5 · 0.38268343
    assert pruning.upop_target(p, 0, T) == pytest.approx(0.19134172, abs=1e-7)
    assert pruning.upop_target(p, T - 1, T) == pytest.approx(p, abs=1e-12)  # the search ends at p
    values = [pruning.upop_target(0.75, t, 100) for t in range(100)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.75)


# --- allocation ----------------------------------------------------------------------------------------


def test_allocation_matches_hand_computed_cut():
    scores = {
        "image.0.head_dim": torch.tensor([2.0, -2.0]),
        "text.0.head_dim": torch.tensor([0.5, -0.5]),
        "image.0.mlp": torch.tensor([4.0, 1.0, 0.0, -1.0]),
        "text.0.mlp": torch.tensor([0.5, -0.5, -2.0, -2.0]),
    }
    costs = {"image.0.head_dim": 3, "text.0.head_dim": 3, "image.0.mlp": 1, "text.0.mlp": 1}
    # standardised per group (mean 0; std 1.6833 attention, 1.9457 mlp), sorted high → low with costs:
    # vm0 2.056 (1), va0 1.188 (3), vm1 0.514 (1), ta0 0.297 (3), tm0 0.257 (1), vm2 0 (1), tm1 (1),
    # ta1 (3), vm3 (1), tm2 (1), tm3 (1), va1 (3); cumulative 1 4 5 8 9 10 11 14 15 16 17 20 of 20.
    # target 0.4 → 8 params: the first four are cut, at value 1 − 0.4/0.8 = 0.5
    masks = pruning.allocate_masks(scores, costs, target=0.4, p=0.8)
    assert masks["image.0.head_dim"].tolist() == [0.5, 1.0]
    assert masks["text.0.head_dim"].tolist() == [0.5, 1.0]
    assert masks["image.0.mlp"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert masks["text.0.mlp"].tolist() == [1.0, 1.0, 1.0, 1.0]
    # target p = 0.8 → 16 params: the first ten are cut (value 0); that would empty text attention and the
    # visual MLP, so each keeps its most important entry (ta1, vm3)
    masks = pruning.allocate_masks(scores, costs, target=0.8, p=0.8)
    assert masks["image.0.head_dim"].tolist() == [0.0, 1.0]
    assert masks["text.0.head_dim"].tolist() == [0.0, 1.0]
    assert masks["image.0.mlp"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert masks["text.0.mlp"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_every_layer_keeps_a_unit_at_extreme_targets(dense):
    model = to_compact(copy.deepcopy(dense))
    masks = pruning.init_masks(model)
    scores = {k: torch.randn(m.shape) for k, m in masks.items()}
    final = pruning.allocate_masks(scores, pruning.mask_costs(model, masks), target=0.99, p=0.99)
    assert all(bool((m == 1).any()) for m in final.values())
    assert set(torch.cat(list(final.values())).tolist()) <= {0.0, 1.0}
    small = pruning.prune_clip(model, final)
    layers = small.model_spec["blocks"].values()
    assert len(layers) == 4  # every layer of both towers (2 + 2)
    assert all(shape["heads"] >= 1 and shape["head_dim"] >= 1 and shape["mlp_width"] >= 1 for shape in layers)


def test_mask_costs_are_the_parameters_removed(dense):
    model = to_compact(copy.deepcopy(dense))
    for prune_heads in (False, True):
        masks = random_hard_masks(model, prune_heads)
        costs = pruning.mask_costs(model, masks)
        # width 64, 2 heads of 32: a head dim carries 2·(3·65 + 64) = 518 params, a head 32·259, an MLP unit 129
        assert costs["image.0.head" if prune_heads else "image.0.head_dim"] == (32 * 259 if prune_heads else 518)
        assert costs["text.1.mlp"] == 129
        removed = sum(costs[k] * int((m == 0).sum()) for k, m in masks.items())
        small = pruning.prune_clip(model, masks)
        dense_params = sum(p.numel() for p in model.parameters())
        assert dense_params - sum(p.numel() for p in small.parameters()) == removed


# --- surgery -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune_heads", [False, True])
def test_surgery_equals_hard_masked_model(dense, inputs, prune_heads):
    images, tokens = inputs
    masked = to_compact(copy.deepcopy(dense))
    masks = random_hard_masks(masked, prune_heads, seed=3)
    pruning.attach_masks(masked, masks)
    small = pruning.prune_clip(masked, masks)
    with torch.no_grad():
        assert not torch.allclose(masked.encode_image(images), dense.encode_image(images), atol=1e-3)
        torch.testing.assert_close(small.encode_image(images), masked.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(small.encode_text(tokens), masked.encode_text(tokens), atol=1e-5, rtol=0)
    # genuinely smaller: sliced shapes, fewer parameters
    kept = {k: int((m != 0).sum()) for k, m in masks.items()}
    unit = "head" if prune_heads else "head_dim"
    layer = small.model_spec["blocks"]["visual.transformer.resblocks.0"]
    assert layer["heads" if prune_heads else "head_dim"] == kept[f"image.0.{unit}"]
    assert layer["mlp_width"] == kept["image.0.mlp"] == small.visual.transformer.resblocks[0].mlp.c_fc.out_features
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())


def test_soft_mask_values_are_folded_into_the_weights(dense, inputs):
    images, tokens = inputs
    masked = to_compact(copy.deepcopy(dense))
    masks = random_hard_masks(masked, False, seed=5)
    for mask in masks.values():
        mask.mul_(torch.linspace(0.3, 1.0, mask.numel()))  # kept entries at fractional values (mid-search)
    pruning.attach_masks(masked, masks)
    small = pruning.prune_clip(masked, masks)
    with torch.no_grad():
        torch.testing.assert_close(small.encode_image(images), masked.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(small.encode_text(tokens), masked.encode_text(tokens), atol=1e-5, rtol=0)


def test_checkpoint_round_trip_through_compress_load(dense, inputs, tmp_path):
    images, tokens = inputs
    model = to_compact(copy.deepcopy(dense))
    masks = random_hard_masks(model, False, seed=7)
    small = pruning.prune_clip(model, masks)
    torch.save({"model_spec": small.model_spec, "state_dict": small.state_dict()}, tmp_path / "pruned.pt")
    loaded = compress.load(tmp_path / "pruned.pt")
    assert loaded.model_spec["kind"] == "pruned_clip"
    assert pruning.layer_shapes(loaded) == pruning.layer_shapes(small)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), small.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), small.encode_text(tokens), atol=0, rtol=0)

    # a mid-search checkpoint (masked_clip) rebuilds with its masks multiplied in
    pruning.attach_masks(model, masks)
    spec = pruning.masked_spec({"kind": "open_clip", "model": MODEL}, masks)
    torch.save({"model_spec": spec, "state_dict": model.state_dict()}, tmp_path / "search.pt")
    searched = compress.load(tmp_path / "search.pt")
    with torch.no_grad():
        torch.testing.assert_close(searched.encode_image(images), small.encode_image(images), atol=1e-5, rtol=0)


def packed_like_before_compact_blocks(state_dict):
    """A state dict as the code before the compact block wrote it: UPop's attention (PrunedAttention) held
    nn.MultiheadAttention's names, q, k and v packed as [q; k; v] rows of `in_proj_weight`/`in_proj_bias`."""
    qkv = ("q_proj", "k_proj", "v_proj")
    packed = {key: value for key, value in state_dict.items() if not any(f".attn.{n}." in key for n in qkv)}
    for key in state_dict:
        for part in ("weight", "bias"):
            if key.endswith(f".attn.q_proj.{part}"):
                prefix = key[: -len(f"q_proj.{part}")]
                packed[f"{prefix}in_proj_{part}"] = torch.cat([state_dict[f"{prefix}{n}.{part}"] for n in qkv])
    return packed


def test_checkpoints_in_the_format_before_compact_blocks_still_load(dense, inputs, tmp_path):
    images, tokens = inputs
    model = to_compact(copy.deepcopy(dense))
    masks = random_hard_masks(model, False, seed=11)
    small = pruning.prune_clip(model, masks)
    # the old pruned_clip spec: the dense config and per-tower lists of layer shapes, towers named visual/text
    shapes = pruning.layer_shapes(small)
    old_spec = {"kind": "pruned_clip", "model": MODEL, "towers": {"visual": shapes["image"], "text": shapes["text"]}}

    # nothing cut: the old code wrote the dense CLIP's own state dict, and the model computed the dense function
    full = {"kind": "pruned_clip", "model": MODEL, "towers": {
        "visual": [{"heads": 2, "head_dim": 32, "mlp_width": 256}] * 2,
        "text": [{"heads": 2, "head_dim": 32, "mlp_width": 256}] * 2}}
    torch.save({"model_spec": full, "state_dict": dense.state_dict()}, tmp_path / "old_full.pt")
    unpruned = compress.load(tmp_path / "old_full.pt")
    assert all(isinstance(block, CompactBlock) for tower in ("image", "text")
               for block in tower_blocks(unpruned, tower))
    with torch.no_grad():
        torch.testing.assert_close(unpruned.encode_image(images), dense.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(unpruned.encode_text(tokens), dense.encode_text(tokens), atol=1e-5, rtol=0)

    # pruned: the same shapes, weights and function; cut head dims keep the dense head width's softmax scale
    torch.save({"model_spec": old_spec, "state_dict": packed_like_before_compact_blocks(small.state_dict())},
               tmp_path / "old_pruned.pt")
    loaded = compress.load(tmp_path / "old_pruned.pt")
    assert loaded.model_spec == old_spec and pruning.layer_shapes(loaded) == shapes
    attn = loaded.visual.transformer.resblocks[0].attn
    assert attn.head_dim < 32 and attn.softmax_scale == pytest.approx(32 ** -0.5)
    assert compact_spec(loaded)["blocks"] == compact_spec(small)["blocks"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), small.encode_image(images), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), small.encode_text(tokens), atol=0, rtol=0)

    # the old masked_clip: mask names with the visual tower, the dense weights under their packed names
    old_masks = {key.replace("image.", "visual.", 1): mask for key, mask in masks.items()}
    old_search = pruning.masked_spec({"kind": "open_clip", "model": MODEL}, old_masks)
    torch.save({"model_spec": old_search, "state_dict": dense.state_dict()}, tmp_path / "old_search.pt")
    searched = compress.load(tmp_path / "old_search.pt")
    assert set(pruning.attached_masks(searched)) == set(masks)
    with torch.no_grad():
        torch.testing.assert_close(searched.encode_image(images), small.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(searched.encode_text(tokens), small.encode_text(tokens), atol=1e-5, rtol=0)


class _Records(logging.Handler):
    """A fresh root handler: pytest's caplog handler lives for the whole session, and an in-process CLI test
    before this one (run_tool's quiet_open_clip) may have put open_clip's filter on it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_compress_load_does_not_report_a_random_model(dense, tmp_path):
    """open_clip warns that a model built without weights "initialized randomly"; compress.load fills the
    weights right after, so none of its builds may say so."""
    import open_clip

    root, handler = logging.getLogger(), _Records()
    old_level = root.level

    def random_init_warnings():
        return [r for r in handler.records if "initialized randomly" in r.getMessage()]

    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        open_clip.create_model(MODEL, pretrained=None)
        assert random_init_warnings()  # the record reaches a handler when nothing silences it
        _load_each_kind_quietly(dense, tmp_path, handler, random_init_warnings)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _load_each_kind_quietly(dense, tmp_path, handler, random_init_warnings):
    model = to_compact(copy.deepcopy(dense))
    masks = random_hard_masks(model, False)
    small = pruning.prune_clip(model, masks)
    pruning.attach_masks(model, masks)
    checkpoints = {"open_clip": (dense.model_spec, dense), "pruned_clip": (small.model_spec, small),
                   "compact_clip": (refresh_spec(clone(small)).model_spec, small),
                   "masked_clip": (pruning.masked_spec(dense.model_spec, masks), model)}
    for kind, (spec, weights) in checkpoints.items():
        torch.save({"model_spec": spec, "state_dict": weights.state_dict()}, tmp_path / f"{kind}.pt")
        handler.records.clear()
        loaded = compress.load(tmp_path / f"{kind}.pt")
        assert loaded.model_spec["kind"] == kind
        assert not random_init_warnings(), kind


def test_params_and_macs_count_attention_and_shrink(dense):
    size = params_and_macs(dense)
    # image tower by hand: 17 tokens (16 patches + class), width 64, 2 layers: per layer 12·64² MACs per
    # token in the projections + 2·17·64 for QKᵀ and AV; patch conv 16·(3·8·8)·64; projection 64·64
    per_layer = 17 * 12 * 64 * 64 + 2 * 17 * 17 * 64
    assert size["macs_image"] == 2 * per_layer + 16 * 192 * 64 + 64 * 64
    model = to_compact(copy.deepcopy(dense))
    small = pruning.prune_clip(model, random_hard_masks(model, False))
    assert params_and_macs(small)["macs_image"] < size["macs_image"]


# --- the job -------------------------------------------------------------------------------------------


def job_args(logs, name, *extra):
    return ["--job", "prune", "--train-data", "synthetic", "--train-num-samples", "96", "--model", MODEL,
            "--batch-size", "32", "--workers", "0", "--epochs", "2", "--search-epochs", "1", "--p", "0.5",
            "--search-interval", "1", "--KD", "--warmup", "2", "--logs", str(logs), "--name", name,
            "--log-level", "warning", "--report-to", "none", "--log-every-n-steps", "1", *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Search (1 epoch) + surgery + fine-tune (1 epoch) through the command line."""
    logs = tmp_path_factory.mktemp("logs")
    # one thread here and in the resumed in-process run: BLAS reductions then add in the same order
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "training.main", *job_args(logs, "full")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return logs / "full" / "checkpoints"


@pytest.mark.slow
def test_search_surgery_finetune_end_to_end(full_run):
    after_search = torch.load(full_run / "epoch_1.pt", weights_only=True)
    final = torch.load(full_run / "epoch_2.pt", weights_only=True)
    # the end of the search: hard 0/1 masks, about p of the prunable parameters cut
    assert after_search["model_spec"]["kind"] == "masked_clip"
    values = torch.cat([torch.tensor(v) for v in after_search["model_spec"]["masks"].values()])
    assert set(values.tolist()) <= {0.0, 1.0} and 0 < (values == 0).sum() < values.numel()
    # fine-tuned on a smaller architecture that compress.load rebuilds
    assert final["model_spec"]["kind"] == "pruned_clip"
    model = compress.load(full_run / "epoch_2.pt")
    dense = compress.load(full_run / "epoch_1.pt")
    n_small, n_dense = (sum(p.numel() for p in m.parameters()) for m in (model, dense))
    assert n_small < n_dense
    macs_small, macs_dense = params_and_macs(model), params_and_macs(dense)
    for tower in ("image", "text"):
        assert macs_small[f"macs_{tower}"] < 0.8 * macs_dense[f"macs_{tower}"]
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        assert model.encode_image(images).shape == (2, 64) and model.encode_text(tokens).shape == (2, 64)


@pytest.mark.slow
def test_finetune_restarts_the_learning_rate_schedule_at_surgery(full_run):
    """UPop fine-tunes on its own warm-up + cosine: 3 search steps, surgery, 3 fine-tune steps, warm-up 2."""
    import json

    from training.main import cosine_schedule

    rows = [json.loads(line) for line in open(full_run.parent / "results.jsonl") if '"train/lr"' in line]
    lr = {row["step"]: row["train/lr"] for row in rows}  # the rate set after optimizer step s = schedule(s)
    base = 5e-4
    assert lr[1] == pytest.approx(base)  # search: warm-up step 2 of 2
    assert lr[3] == pytest.approx(base / 2)  # the first fine-tune step warms up again
    assert lr[4] == pytest.approx(base)
    assert lr[5] == pytest.approx(base)  # the fine-tune's cosine starts after its warm-up ...
    assert lr[6] == pytest.approx(0.0, abs=1e-12)  # ... and ends at 0 with the run
    # `--finetune-schedule continue`: one schedule over both phases (no restart at step 3)
    args = types.SimpleNamespace(lr=base, warmup=2, lr_scheduler="cosine")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    single = cosine_schedule(optimizer, args, 6, [0])
    assert single(3) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.slow
def test_resume_mid_search_is_exact(full_run, tmp_path):
    """Stopped after step 2 of the 3-step search, resumed: the same final weights as the uninterrupted run."""
    from training.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(job_args(tmp_path, "resumed", "--stop-after-steps", "2"))
        stopped = torch.load(tmp_path / "resumed" / "checkpoints" / "epoch_latest.pt", weights_only=True)
        assert stopped["model_spec"]["kind"] == "masked_clip" and stopped["job_state"]["search_steps"] == 3
        main(job_args(tmp_path, "resumed", "--resume", "latest"))
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "epoch_2.pt", weights_only=True)
    reference = torch.load(full_run / "epoch_2.pt", weights_only=True)
    assert resumed["model_spec"] == reference["model_spec"]
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_the_monitor_names_each_stage_and_costs_the_search_checkpoint_as_pruned(full_run, tiny_corpus, capsys):
    """UPop's table reports R@1 right after pruning and after fine-tuning: the monitor names the two rows, and the
    after-search checkpoint (dense weights + hard masks) costs what surgery leaves, not the dense model."""
    import csv

    from utils import evaluate_checkpoints as monitor_cli

    run = full_run.parent
    assert monitor_cli.main(["--logs-dir", str(run), "--eval-data-dir", str(tiny_corpus / "eval"), "--once",
                             "--benchmarks", "retrieval", "--datasets", "coco2017", "--workers", "0", "--device",
                             "cpu", "--profile-batch-size", "2"]) == 0
    with open(run / "evaluation_metrics_all.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = {row["checkpoint"]: row for row in reader}
    assert reader.fieldnames[:4] == ["checkpoint", "epoch", "step", "stage"]
    assert {name: row["stage"] for name, row in rows.items()} == {"epoch_1.pt": "after search",
                                                                  "epoch_2.pt": "after fine-tune"}
    masked = compress.load(full_run / "epoch_1.pt")
    dense, pruned = params_and_macs(masked), params_and_macs(pruning.prune_clip(masked, pruning.attached_masks(masked)))
    after_search = rows["epoch_1.pt"]
    for key in ("params", "macs_image", "macs_text"):
        assert float(after_search[key]) == pruned[key] < dense[key], key
    # surgery changes nothing the fine-tune starts from: the after-fine-tune model has the same shape
    assert float(rows["epoch_2.pt"]["params"]) == pruned["params"]
    assert float(after_search["retrieval/coco2017/text_retrieval_recall@1"]) >= 0
    table = capsys.readouterr().out
    stage_line = next(line for line in table.splitlines() if line.startswith("stage"))
    assert stage_line.split()[1:] == ["after", "search", "after", "fine-tune"]


def test_the_stage_of_each_prune_checkpoint():
    from utils.evaluate_checkpoints import training_stage

    masked, small = (types.SimpleNamespace(model_spec={"kind": kind}) for kind in ("masked_clip", "pruned_clip"))
    search = {"job": "prune", "job_state": {"search_steps": 30}, "args": {"epochs": 4}}
    assert training_stage({**search, "step": 20, "epoch": 1}, masked, {}) == "search"
    assert training_stage({**search, "step": 30, "epoch": 2}, masked, {}) == "after search"
    assert training_stage({"job": "prune", "step": 45, "epoch": 3, "args": {"epochs": 4}}, small, {}) == "fine-tune"
    assert training_stage({"job": "prune", "step": 60, "epoch": 4, "args": {"epochs": 4}}, small, {}) == \
        "after fine-tune"
    # an open_clip_train checkpoint has no job or args: params.txt says which run it was
    assert training_stage({"epoch": 4}, small, {"job": "prune", "epochs": 4}) == "after fine-tune"
    # a mangled job_state is no stage it is not: still searching
    assert training_stage({"job": "prune", "step": 30, "job_state": {"search_steps": "30"}}, masked, {}) == "search"
    assert training_stage({"job": "clip", "epoch": 4}, small, {}) == ""


def test_bad_epoch_split_is_one_clear_line(tmp_path, capsys):
    from training.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(job_args(tmp_path, "bad", "--search-epochs", "2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: need 1 <= search epochs (2) < --epochs (2): the pruned model is fine-tuned" in err
    assert "Traceback" not in err


# --- UPop / CLIP-KDPruning fidelity of the search -------------------------------------------------------


def search_job(tmp_path, *extra):
    """A --job prune on its own (no trainer): the hooks driven by hand, one rank, 4 search steps."""
    from training.distributed import DistInfo
    from training.jobs.prune import PruneJob
    from training.params import parse_args

    args = parse_args(job_args(tmp_path, "unit", "--train-num-samples", "128", "--batch-size", "16",
                               "--search-interval", "2", *extra))
    job = PruneJob(args, DistInfo())
    torch.manual_seed(0)
    model = job.build_model()
    ctx = types.SimpleNamespace(unwrapped_model=model, data=types.SimpleNamespace(num_batches=4), step=0,
                                scaler=None, log_scalars=lambda scalars: None)
    job.on_train_start(ctx)
    return job, model, ctx


def search_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(16, 3, 32, 32, generator=g), "text": torch.randint(1, 1000, (16, 16), generator=g)}


def take_step(job, model, ctx, seed, poison=False):
    losses = job.loss(model, search_batch(seed))
    total = losses["loss"] * float("nan") if poison else losses["loss"]
    if poison:
        job.step_finite = False  # what loss() records for a non-finite loss
    total.backward()
    grads = {k: m.grad.clone() for k, m in job.masks.items()}
    model.zero_grad(set_to_none=True)  # the optimizer's zero_grad: it does not own the masks
    ctx.step += 1
    job.on_step_end(ctx)
    return grads, losses


def test_importance_accumulates_from_the_start_of_the_search(tmp_path):
    """UPop: mask gradients are never cleared, so every update sees the sum since the search began."""
    job, model, ctx = search_job(tmp_path)
    assert job.interval == 2 and job.search_steps == 4
    total = None
    for seed in range(3):  # steps 0, 1, 2: updates after steps 0 and 2
        grads, _ = take_step(job, model, ctx, seed)
        total = grads if total is None else {k: total[k] + g for k, g in grads.items()}
    for key, value in job._reduced_mask_grads().items():
        torch.testing.assert_close(value, total[key])
    state = job.state_dict()  # the accumulated importance is job state: a resume continues the sum
    for key, value in state["mask_grads"].items():
        torch.testing.assert_close(value, total[key].cpu())


def test_a_skipped_nonfinite_step_leaves_the_importance_untouched(tmp_path):
    job, model, ctx = search_job(tmp_path)
    grads, _ = take_step(job, model, ctx, 0)
    poisoned, _ = take_step(job, model, ctx, 1, poison=True)
    assert not all(bool(torch.isfinite(g).all()) for g in poisoned.values())
    for key, value in job._reduced_mask_grads().items():
        torch.testing.assert_close(value, grads[key])  # step 1 left out, nothing NaN
    take_step(job, model, ctx, 2)  # the mask update after step 2 decides on finite importance
    assert all(bool(torch.isfinite(m).all()) for m in job.masks.values())


def test_kd_terms_are_left_out_of_mask_update_steps_and_the_finetune(tmp_path):
    """CLIP-KDPruning: teacher softmax targets on every search step, L_same + L_diff only off update steps."""
    job, model, ctx = search_job(tmp_path)  # job_args pass --KD
    assert job.args.w_kd_soft_target == 1.0 and job.args.w_kd_logits == 1.0 and job.args.w_kd_feat == 1.0
    for seed in range(3):
        update = job._is_update_step(ctx.step)
        _, losses = take_step(job, model, ctx, seed)
        kd = job.args.w_kd_feat * losses["kd_feat_loss"] + job.args.w_kd_logits * losses["kd_logits_loss"]
        expected = losses["contrastive_loss"] + losses["sparsity_loss"] + (0 if update else kd)
        torch.testing.assert_close(losses["loss"], expected)
        if not update:  # the masks cut after step 0 make the student differ from its teacher
            assert kd.item() > 0
        assert update == (seed in (0, 2))
    ctx.step = 4
    pruned = job.on_epoch_start(1, ctx)
    assert job.teacher is None  # the fine-tune trains without the teacher
    assert set(job.loss(pruned, search_batch(5))) == {"contrastive_loss", "loss"}


def test_upop_finetunes_as_many_epochs_as_it_searched(tmp_path):
    from training.distributed import DistInfo
    from training.jobs.prune import PruneJob
    from training.params import parse_args

    args = parse_args(["--job", "prune", "--train-data", "synthetic", "--epochs", "6", "--logs", str(tmp_path)])
    assert PruneJob(args, DistInfo()).search_epochs == 3
    odd = parse_args(["--job", "prune", "--train-data", "synthetic", "--epochs", "5", "--logs", str(tmp_path)])
    with pytest.raises(UserError, match="--epochs 5 is odd"):
        PruneJob(odd, DistInfo())
