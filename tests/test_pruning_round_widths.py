"""`allocate_masks(..., round_to=r)`: every head-dim and MLP width a multiple of r (or whole), within the kept
parameter budget of the unrounded cut, the most important entries kept; the pruned model has those widths."""
import pytest
import torch

from compress.models import pruning
from compress.models.compact_clip import clone, to_compact
from compress.models.registry import build_model

MODEL = "clipc-vit-t2-32"


def kept_cost(masks, costs):
    return sum(costs[k] * int((m >= 1).sum()) for k, m in masks.items())


def test_rounding_by_hand():
    # one head-dim mask (cost 10 an entry) and one MLP mask (cost 1), scores standardised within each group
    scores = {"image.0.head_dim": torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]),
              "image.0.mlp": torch.arange(16, dtype=torch.float32).flip(0)}  # entry 15 most important
    costs = {"image.0.head_dim": 10, "image.0.mlp": 1}
    plain = pruning.allocate_masks(scores, costs, target=0.5, p=0.5)
    rounded = pruning.allocate_masks(scores, costs, target=0.5, p=0.5, round_to=4)
    for key, mask in rounded.items():
        assert int((mask >= 1).sum()) % 4 == 0, key
    assert kept_cost(rounded, costs) <= kept_cost(plain, costs)
    # the kept entries are the lowest-scored (most important) of each layer
    for key, mask in rounded.items():
        count = int((mask >= 1).sum())
        assert set(torch.nonzero(mask >= 1).flatten().tolist()) == set(
            torch.argsort(scores[key])[:count].tolist()), key


def test_without_rounding_nothing_changes():
    generator = torch.Generator().manual_seed(0)
    scores = {"image.0.head_dim": torch.randn(6, generator=generator),
              "image.0.mlp": torch.randn(20, generator=generator), "text.0.head": torch.randn(3, generator=generator)}
    costs = {"image.0.head_dim": 7, "image.0.mlp": 2, "text.0.head": 30}
    assert all(torch.equal(a, b) for a, b in zip(pruning.allocate_masks(scores, costs, 0.4, 0.4).values(),
                                                  pruning.allocate_masks(scores, costs, 0.4, 0.4, round_to=1).values()))


@pytest.mark.parametrize("round_to", [8, 16])
def test_pruned_model_has_rounded_widths_within_the_budget(round_to):
    torch.manual_seed(0)
    model = to_compact(clone(build_model({"kind": "open_clip", "model": MODEL}).eval()))
    masks = pruning.init_masks(model)
    scores, costs = pruning.magnitude_prune_scores(model, masks), pruning.mask_costs(model, masks)
    plain = pruning.allocate_masks(scores, costs, target=0.6, p=0.6)
    rounded = pruning.allocate_masks(scores, costs, target=0.6, p=0.6, round_to=round_to)
    assert kept_cost(rounded, costs) <= kept_cost(plain, costs)
    assert kept_cost(rounded, costs) > 0.8 * kept_cost(plain, costs)  # the budget is used, not given away
    shapes = pruning.layer_shapes(pruning.prune_clip(model, rounded))
    for tower in ("image", "text"):
        for layer in shapes[tower]:
            assert layer["head_dim"] % round_to == 0 or layer["head_dim"] == 32
            assert layer["mlp_width"] % round_to == 0
