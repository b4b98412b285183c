"""Post-training compression tools: low-rank (SVD/FWSVD), head pruning, Fisher pruning under a MAC budget,
token masking, text-layer dropping, and their checkpoints. Tiny `clipc-vit-t2-32` models, random data."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compress
from compress.models.compact_clip import (
    FactorizedLinear,
    clone,
    compact_blocks,
    image_keys,
    keep_heads,
    keep_neurons,
    refresh_spec,
    to_compact,
)
from compress.models.registry import build_model, open_clip_spec
from compress.ops.calibration import squared_gradients
from compress.ops.fisher_prune import _block_inputs, fisher_prune, rearrange, rescale_block, search_under_constraint
from compress.ops.heads import prune_heads_by_sensitivity
from compress.ops.lowrank import factorize_linear, fisher_row_weights, low_rank, rank_for_ratio, svd_factors
from compress.ops.text_layers import drop_text_layers
from compress.ops.token_mask import mask_tokens

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(open_clip_spec("clipc-vit-t2-32")).eval()


@pytest.fixture(scope="module")
def inputs(dense):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    text = torch.randint(1, 1000, (4, dense.context_length), generator=generator)
    text[:, -1] = 49407  # an end-of-text token: the text tower pools at the argmax
    return images, text


@pytest.fixture(scope="module")
def batches(dense):
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(3):
        text = torch.randint(1, 1000, (8, dense.context_length), generator=generator)
        text[:, -1] = 49407
        out.append({"image": torch.randn(8, 3, 32, 32, generator=generator), "text": text})
    return out


def roundtrip(model):
    return compress.load({"model_spec": model.model_spec, "state_dict": model.state_dict()})


def image_macs(model):
    # under no_grad, nn.MultiheadAttention takes a fused fast path that FlopCounterMode does not see;
    # with grad enabled every block's attention is counted
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model.encode_image(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


# --- low-rank ------------------------------------------------------------------------------------


def test_rank_for_ratio_keeps_the_asked_fraction():
    assert rank_for_ratio(768, 768, 0.5) == 192  # 0.5·768·768/1536
    assert rank_for_ratio(3072, 768, 0.5) == 307  # ⌊0.5·3072·768/3840⌋ = ⌊307.2⌋
    for m, n, ratio in [(768, 768, 0.5), (3072, 768, 0.3), (100, 7, 0.9)]:
        r = rank_for_ratio(m, n, ratio)
        assert r * (m + n) <= ratio * m * n < (r + 1) * (m + n)
    # rounded down to a multiple (low_rank's default 8), only where the rank is at least that
    assert rank_for_ratio(3072, 768, 0.5, round_to=8) == 304
    assert rank_for_ratio(768, 768, 0.5, round_to=8) == 192
    assert rank_for_ratio(100, 7, 0.9, round_to=8) == 5


def test_low_rank_rounds_ranks_unless_told_not_to(dense):
    # clipc-vit-t2-32 (width 64, MLP 256): rank ⌊0.5·256·64/320⌋ = 25 for c_fc and c_proj
    block = "visual.transformer.resblocks.0"
    assert low_rank(dense, 0.5, targets=("mlp",)).model_spec["blocks"][block]["ranks"] == {"c_fc": 24, "c_proj": 24}
    exact = low_rank(dense, 0.5, targets=("mlp",), round_to=1)
    assert exact.model_spec["blocks"][block]["ranks"] == {"c_fc": 25, "c_proj": 25}


def test_full_rank_svd_reproduces_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    factorized = factorize_linear(linear, rank=16)
    assert isinstance(factorized, FactorizedLinear)
    assert factorized.down.weight.shape == (16, 24) and factorized.up.weight.shape == (16, 16)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factorized(x), linear(x), atol=1e-5, rtol=1e-5)


def test_truncated_svd_error_is_the_discarded_spectrum():
    torch.manual_seed(0)
    weight = torch.randn(12, 9)
    up, down = svd_factors(weight, rank=4)
    singular = torch.linalg.svdvals(weight)
    assert torch.isclose(torch.linalg.norm(weight - up @ down), singular[4:].norm(), rtol=1e-4)


def test_fwsvd_row_weights_from_known_gradients():
    # loss = a · (W x): ∂loss/∂W = a xᵀ, so Σ_batches (∂loss/∂W)² = a² (x1² + x2²)ᵀ and the row weights
    # are a_i² (|x1|² + |x2|²)
    a = torch.tensor([1.0, -2.0, 3.0])
    xs = [torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.5, 0.0, 1.0, 1.0])]
    model = nn.Linear(4, 3, bias=False)
    fisher = squared_gradients(model, [model.weight], [{"x": x} for x in xs],
                               loss_fn=lambda m, batch: a @ m(batch["x"]))[0]
    expected = (a[:, None] ** 2) * (xs[0] ** 2 + xs[1] ** 2)[None, :]
    torch.testing.assert_close(fisher, expected)
    torch.testing.assert_close(fisher_row_weights(fisher), a ** 2 * (xs[0].square().sum() + xs[1].square().sum()))


def test_fwsvd_follows_the_hand_formula_and_favours_heavy_rows():
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    row_weights = torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0, 1.0])
    up, down = svd_factors(weight, rank=2, row_weights=row_weights, eps=0.0)
    scale = row_weights.sqrt()
    u, s, vh = torch.linalg.svd(scale[:, None] * weight, full_matrices=False)
    torch.testing.assert_close(up @ down, (u[:, :2] * s[:2] / scale[:, None]) @ vh[:2], atol=1e-5, rtol=1e-4)
    plain_up, plain_down = svd_factors(weight, rank=2)
    heavy_error = (weight[0] - (up @ down)[0]).norm()
    assert heavy_error < (weight[0] - (plain_up @ plain_down)[0]).norm()
    assert heavy_error < 1e-2 * weight[0].norm()


def test_factorised_model_matches_dense_at_full_rank(dense, inputs):
    images, text = inputs
    model = clone(dense)
    for _, block in compact_blocks(model, ("image", "text")):
        for owner, names in ((block.attn, ("q_proj", "k_proj", "v_proj", "out_proj")), (block.mlp, ("c_fc", "c_proj"))):
            for name in names:
                layer = getattr(owner, name)
                setattr(owner, name, factorize_linear(layer, min(layer.weight.shape)))
    refresh_spec(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), dense.encode_image(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(text), dense.encode_text(text), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(roundtrip(model).encode_text(text), model.encode_text(text))


def test_low_rank_is_physically_smaller_and_reloads(dense, inputs):
    images, _ = inputs
    model = low_rank(dense, 0.5, towers=("image",), targets=("attn", "mlp"))
    width, hidden = 64, 256  # clipc-vit-t2-32: width 64, mlp_ratio 4
    r_attn, r_mlp = rank_for_ratio(width, width, 0.5, 8), rank_for_ratio(hidden, width, 0.5, 8)
    per_block_saved = (4 * (width * width - r_attn * 2 * width)  # q, k, v, out
                       + 2 * (hidden * width - r_mlp * (hidden + width)))  # c_fc, c_proj
    saved = sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in model.parameters())
    assert saved == 2 * per_block_saved
    assert model.model_spec["blocks"]["visual.transformer.resblocks.1"]["ranks"] == {
        "q_proj": r_attn, "k_proj": r_attn, "v_proj": r_attn, "out_proj": r_attn, "c_fc": r_mlp, "c_proj": r_mlp}
    assert image_macs(model) < image_macs(dense)
    with torch.no_grad():
        torch.testing.assert_close(roundtrip(model).encode_image(images), model.encode_image(images))


def test_fwsvd_needs_and_uses_calibration(dense, batches):
    with pytest.raises(ValueError, match="calibration"):
        low_rank(dense, 0.5, method="fwsvd")
    weighted = low_rank(dense, 0.5, towers=("image",), layers=[0], targets=("c_fc",), method="fwsvd", batches=batches)
    plain = low_rank(dense, 0.5, towers=("image",), layers=[0], targets=("c_fc",))
    w_up = weighted.visual.transformer.resblocks[0].mlp.c_fc.up.weight
    p_up = plain.visual.transformer.resblocks[0].mlp.c_fc.up.weight
    assert w_up.shape == p_up.shape and not torch.allclose(w_up, p_up)
    assert all(p.requires_grad for p in weighted.parameters())  # gradient bookkeeping restored


# --- token masking -----------------------------------------------------------------------------------


def test_token_masking_with_p0_equals_dense(dense, inputs):
    images, _ = inputs
    with torch.no_grad():
        torch.testing.assert_close(mask_tokens(dense, 0.0).encode_image(images), dense.encode_image(images))


def test_token_masking_keeps_patches_with_their_own_positions(dense, inputs):
    images, _ = inputs
    masked = mask_tokens(dense, 0.5, seed=3)
    seen = []
    handle = masked.visual.ln_pre.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        first = masked.encode_image(images)
        second = masked.encode_image(images)
    handle.remove()
    torch.testing.assert_close(first, second)  # seeded: same tokens every call
    visual = dense.visual
    with torch.no_grad():  # by hand: 4x4 patches + positions 1..16, the class token with position 0
        patches = visual.conv1(images).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
        cls = visual.class_embedding + visual.positional_embedding[0]
    # each image's own draw, seeded by the keyed hash of its pixels
    kept = torch.stack([torch.rand(16, generator=torch.Generator().manual_seed(key))
                        for key in image_keys(images, 3)]).topk(8, dim=1).indices.sort(dim=1).values
    expected = torch.cat([cls.expand(4, 1, -1), torch.stack([patches[b, kept[b]] for b in range(4)])], dim=1)
    assert seen[0].shape == (4, 1 + 8, 64)
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(mask_tokens(dense, 0.5, seed=4).encode_image(images), first)
    torch.testing.assert_close(roundtrip(masked).encode_image(images), first)


# --- head pruning by sensitivity -----------------------------------------------------------------------


def test_head_pruning_physically_removes_params_and_loads(dense, inputs, batches, tmp_path):
    images, text = inputs
    pruned = prune_heads_by_sensitivity(dense, 2, batches, towers=("image", "text"))
    heads = {name: shape["heads"] for name, shape in pruned.model_spec["blocks"].items()}
    assert sum(heads.values()) == 8 - 2
    width, head_dim = 64, 32
    per_head = 3 * (width * head_dim + head_dim) + width * head_dim  # q/k/v rows + biases, out_proj columns
    assert sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in pruned.parameters()) == 2 * per_head
    path = tmp_path / "heads.pt"
    torch.save({"model_spec": pruned.model_spec, "state_dict": pruned.state_dict(), "epoch": 0, "step": 0}, path)
    reloaded = compress.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), pruned.encode_image(images))
        torch.testing.assert_close(reloaded.encode_text(text), pruned.encode_text(text))


def test_keep_heads_equals_zeroing_their_mask(dense, inputs):
    images, _ = inputs
    model = clone(dense)
    block = dict(compact_blocks(model, ("image",), [0]))["visual.transformer.resblocks.0"]
    block.attn.head_mask = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        masked = model.encode_image(images)
    block.attn.head_mask = None
    keep_heads(block, [1])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), masked, atol=1e-5, rtol=1e-5)


# --- Fisher pruning under a MAC constraint -----------------------------------------------------------


def test_search_under_constraint_by_hand():
    # heads cost 10, neurons 1; budget 14. Options: 1 head + 4 neurons = 5 + (4+3+2+1) = 15;
    # 0 heads + 5 neurons = 4+3+2+1+0.5 = 10.5; so keep the better head and 4 best neurons.
    keep_h, keep_n = search_under_constraint(torch.tensor([2.0, 5.0]), torch.tensor([10.0, 10.0]),
                                             torch.tensor([1.0, 4.0, 0.5, 3.0, 2.0]), torch.ones(5), budget=14.0)
    assert keep_h.tolist() == [False, True]
    assert keep_n.tolist() == [True, True, False, True, True]


def test_rearrangement_uses_interactions_within_a_layer():
    # per-batch gradients of three units: u0 and u1 cancel, so pruning them together costs almost nothing,
    # although the diagonal prefers pruning u0 and u2
    gradients = torch.tensor([[0.5, -0.6, 0.55], [0.5, -0.6, -0.55]])
    diagonal_choice = torch.tensor([False, True, False])
    assert rearrange(gradients, diagonal_choice).tolist() == [False, False, True]
    # never worse than the diagonal choice
    lone = torch.tensor([True, False, False])
    assert rearrange(torch.tensor([[1.0, 0.0, 0.0]]), lone).tolist() == [True, False, False]


def test_fisher_pruning_meets_the_mac_constraint(dense, inputs, batches):
    images, _ = inputs
    constraint = 0.5
    pruned = fisher_prune(dense, batches, constraint, towers=("image",))
    nothing = clone(dense)
    for _, block in compact_blocks(nothing, ("image",)):
        keep_heads(block, [])
        keep_neurons(block, [])
    refresh_spec(nothing)
    prunable = image_macs(dense) - image_macs(nothing)  # measured MACs of all heads and neurons
    assert prunable > 0
    assert image_macs(pruned) - image_macs(nothing) <= constraint * prunable
    assert image_macs(pruned) - image_macs(nothing) > 0.3 * prunable  # the budget is used, not wasted
    with torch.no_grad():
        torch.testing.assert_close(roundtrip(pruned).encode_image(images), pruned.encode_image(images))


def test_rescaling_reduces_the_layer_error(dense, batches):
    model = clone(dense)
    blocks = dict(compact_blocks(model, ("image",), [0]))
    block = blocks["visual.transformer.resblocks.0"]
    reference = clone(block).eval()
    keep_heads(block, [0])
    keep_neurons(block, list(range(0, 256, 3)))
    data = _block_inputs(model, block, "image", batches)

    def error():
        with torch.no_grad():
            return sum(float((block(x) - reference(x)).square().sum()) for x, _ in data)

    before = error()
    rescale_block(block, reference, data, damping=1e-8)
    assert error() < before


# --- text layers, and the command lines ---------------------------------------------------------------


def test_text_layer_dropping(dense, inputs):
    _, text = inputs
    dropped = drop_text_layers(dense, keep_first=1)
    assert len(dropped.transformer.resblocks) == 1 and dropped.model_spec["text_layers"] == [0]
    block_params = sum(p.numel() for p in dense.transformer.resblocks[1].parameters())
    assert sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in dropped.parameters()) == block_params
    twice = drop_text_layers(drop_text_layers(dense, drop=[0]), keep_first=1)
    assert twice.model_spec["text_layers"] == [1]
    with torch.no_grad():
        torch.testing.assert_close(roundtrip(twice).encode_text(text), twice.encode_text(text))


@pytest.fixture(scope="module")
def upop_pruned(dense):
    """UPop's output: head dimensions (so the softmax scale no longer matches the head width) and MLP
    units cut at random from both towers, every layer keeping at least one."""
    from compress.models import pruning

    model = to_compact(clone(dense))
    generator = torch.Generator().manual_seed(7)
    masks = pruning.init_masks(model, prune_heads=False)
    for mask in masks.values():
        mask.copy_((torch.rand(mask.shape, generator=generator) < 0.6).float())
        mask[0] = 1.0
    return pruning.prune_clip(model, masks).eval()


def test_upop_pruned_model_converts_exactly_and_every_tool_takes_it(upop_pruned, inputs, batches):
    images, text = inputs
    assert upop_pruned.model_spec["kind"] == "pruned_clip"
    with torch.no_grad():
        reference_image, reference_text = upop_pruned.encode_image(images), upop_pruned.encode_text(text)

    # converted but otherwise untouched (FLIP at p=0): the same function, all shapes in the compact spec
    converted = refresh_spec(clone(upop_pruned))
    blocks = converted.model_spec["blocks"]
    assert converted.model_spec["kind"] == "compact_clip" and len(blocks) == 4  # 2 image + 2 text layers
    pruned_block = upop_pruned.visual.transformer.resblocks[0].attn
    assert blocks["visual.transformer.resblocks.0"]["head_dim"] == pruned_block.head_dim < 32
    assert blocks["visual.transformer.resblocks.0"]["scale"] == pytest.approx(32 ** -0.5)
    reloaded = roundtrip(converted)
    with torch.no_grad():
        for model in (converted, reloaded):
            torch.testing.assert_close(model.encode_image(images), reference_image, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.encode_text(text), reference_text, atol=1e-5, rtol=1e-5)

    # each tool on the pruned model: a smaller (or masked) model that reloads to the same function
    outputs = {
        "lowrank": low_rank(upop_pruned, 0.5, towers=("image", "text"), targets=("attn", "mlp")),
        "heads": prune_heads_by_sensitivity(upop_pruned, 1, batches, towers=("image",)),
        "fisher": fisher_prune(upop_pruned, batches, 0.7, towers=("image",)),
        "flip": mask_tokens(upop_pruned, 0.5, seed=0),
        "text_layers": drop_text_layers(upop_pruned, drop=[1]),
    }
    pruned_params = sum(p.numel() for p in upop_pruned.parameters())
    for tool, model in outputs.items():
        assert model.model_spec["kind"] == "compact_clip", tool
        again = roundtrip(model)
        with torch.no_grad():
            torch.testing.assert_close(again.encode_image(images), model.encode_image(images), atol=1e-5,
                                       rtol=1e-5, msg=tool)
            torch.testing.assert_close(again.encode_text(text), model.encode_text(text), atol=1e-5, rtol=1e-5,
                                       msg=tool)
        if tool != "flip":
            assert sum(p.numel() for p in model.parameters()) < pruned_params, tool
    # the input is left as it was
    assert upop_pruned.model_spec["kind"] == "pruned_clip"


def test_command_lines_chain_and_write_loadable_runs(tiny_corpus, tmp_path, dense, capsys):
    from eval import load_encoder
    from utils import fisher_prune as fisher_cli
    from utils import lowrank as lowrank_cli
    from utils import token_mask as token_cli

    source = tmp_path / "dense.pt"
    torch.save({"model_spec": dense.model_spec, "state_dict": dense.state_dict(), "epoch": 3, "step": 30}, source)
    calib = ["--calib-data", str(tiny_corpus / "train.tsv"), "--calib-batches", "2", "--calib-batch-size", "8"]
    fisher_cli.main(["--pretrained", str(source), "--out", str(tmp_path / "fisher"), "--mac-constraint", "0.6", *calib])
    fisher_ckpt = tmp_path / "fisher" / "checkpoints" / "epoch_0.pt"
    lowrank_cli.main(["--pretrained", str(fisher_ckpt), "--out", str(tmp_path / "lr"), "--ratio", "0.5",
                      "--method", "fwsvd", "--calib-data", str(tiny_corpus / "eval"), "--calib-batches", "2",
                      "--calib-batch-size", "8"])  # calibration on the eval root's COCO captions
    token_cli.main(["--pretrained", str(tmp_path / "lr" / "checkpoints" / "epoch_0.pt"),
                    "--out", str(tmp_path / "flip"), "--drop", "0.5"])
    checkpoint = torch.load(tmp_path / "flip" / "checkpoints" / "epoch_0.pt", weights_only=True)
    assert checkpoint["job"] == "token_mask" and checkpoint["epoch"] == 0 and checkpoint["name"] == "flip"
    spec = checkpoint["model_spec"]
    assert spec["kind"] == "compact_clip" and spec["token_mask"] == {"drop": 0.5, "seed": 0, "per_image": True}
    assert spec["blocks"]["visual.transformer.resblocks.0"]["ranks"]  # low-rank on top of the pruned shapes
    assert "job: token_mask" in (tmp_path / "flip" / "params.txt").read_text()
    encoder = load_encoder(str(tmp_path / "flip" / "checkpoints" / "epoch_0.pt"))
    assert encoder.encode_text(["a red circle"]).shape == (1, 64)

    with pytest.raises(SystemExit) as exit_info:
        fisher_cli.main(["--pretrained", str(source), "--out", str(tmp_path / "x"), "--mac-constraint", "0.5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: this tool needs calibration data: pass --calib-data TRAIN.tsv (image paths + captions) "
        "or --calib-data EVAL_DIR (with coco2017/ or flickr30k/)"]
