"""Structured pruning of open_clip ViT CLIPs, as UPop does it: masks, importance, schedule, surgery.

Model → model operations, usable without the trainer:

    model = to_compact(model)                       # every block → CompactBlock (same function, same weights)
    masks = init_masks(model)                       # all-ones masks, both towers
    attach_masks(model, masks)                      # the model now multiplies them in (search)
    masks = allocate_masks(scores, mask_costs(model, masks), target=p, p=p)  # UPop's unified cut
    small = prune_clip(model, masks)                # a genuinely smaller model (sliced weights)

The pruned model is made of the same `CompactBlock`s every post-training tool edits (compress.models.compact_clip):
per-layer heads, head width and MLP width, and the dense head width's softmax scale where head dimensions
were cut. Masks exist only during the search, as the blocks' `qkv_mask` and `neuron_mask`.

Masks (a dict `"{tower}.{layer}.{unit}" → 1-D tensor`, tower in image/text):
- `head_dim`: one entry per head dimension, shared by all heads of the layer, multiplied into q, k and v;
- `head` (the `prune_heads` option): one entry per whole head, multiplied into q, k and v;
- `mlp`: one entry per hidden unit, multiplied in after the activation (the input of `c_proj`).
Residual width and depth are untouched. A 0 entry is removed by `prune_clip`; any other value is folded
into the kept weights, so a masked model and its pruned twin compute the same function.

EVA's blocks: their attention rotates pairs of head dimensions (rotary position embedding), so its masks are
whole heads whatever `prune_heads` says (one warning line); their inner norms (over the heads' outputs, over the
SwiGLU's hidden units) see a masked unit as a zero in their statistics, as the pruned block's KeptLayerNorm
counts a removed one, and the mask multiplies the norm's output too, so the equality holds through them (a kept
value folds into the Linears on both sides of the norm).

Two model kinds are registered with `compress.models.registry`:
- `pruned_clip`: UPop's output, in the compact_clip spec format (`--job prune` resumes it as its own kind).
  The spec may instead hold per-tower `towers` lists of layer shapes (with packed q/k/v weights in the
  state dict); `build_pruned_clip` converts that format into compact blocks.
- `masked_clip`: a model under search — the dense `base` spec with its current `masks` multiplied in, so
  a checkpoint written mid-search is scored as the model that was actually being trained.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from compress.models.compact_clip import (
    QKV_LINEARS,
    TOWERS,
    CompactBlock,
    build_compact_clip,
    clone,
    compact_spec,
    dense_weight,
    keep_head_dims,
    keep_heads,
    keep_neurons,
    normalised_scale,
    place_compact_blocks,
    scale_inputs,
    scale_outputs,
    to_compact,
    tower_blocks,
    tower_prefix,
    transformer_towers,
)
from compress.models.registry import build_model, create_open_clip, register_model_kind

PRUNED_KIND = "pruned_clip"
MASKED_KIND = "masked_clip"
ATTENTION_UNITS = ("head_dim", "head")
# mask names and `towers` entries may call the image tower `visual` (open_clip's attribute): it is `image` here
LEGACY_TOWER_NAMES = {"visual": "image"}
Masks = Dict[str, torch.Tensor]


# --- mask names ------------------------------------------------------------------------------------------


def current_mask_name(key: str) -> str:
    """A mask name with the towers named as everywhere else ("visual.0.mlp" → "image.0.mlp")."""
    tower, rest = key.split(".", 1)
    return f"{LEGACY_TOWER_NAMES.get(tower, tower)}.{rest}"


def current_mask_names(named: Dict[str, Any]) -> Dict[str, Any]:
    """`named` (masks, their gradients…) under the current mask names."""
    return {current_mask_name(key): value for key, value in named.items()}


def _split_key(key: str) -> Tuple[str, int, str]:
    tower, layer, unit = key.split(".")
    if tower not in TOWERS or unit not in ATTENTION_UNITS + ("mlp",):
        raise ValueError(f"bad mask name {key!r}: expected '<{'|'.join(TOWERS)}>.<layer>.<head_dim|head|mlp>'")
    return tower, int(layer), unit


def _compact_block(model: nn.Module, tower: str, layer: int) -> CompactBlock:
    block = tower_blocks(model, tower)[layer]
    if not isinstance(block, CompactBlock):
        raise ValueError("masks act on CompactBlocks: call to_compact(model) first")
    return block


# --- masks ---------------------------------------------------------------------------------------------


def init_masks(model: nn.Module, prune_heads: bool = False, towers: Optional[Sequence[str]] = None) -> Masks:
    """All-ones masks for every attention layer (per head dim, or per head) and MLP of `towers` (default: every
    transformer tower of the model; an RN50's or a ConvNeXt's image tower is none). A rotary attention (EVA's)
    is masked per head even without `prune_heads`, with one warning line."""
    masks: Masks = {}
    rotary = []
    for tower in transformer_towers(model) if towers is None else towers:
        for i in range(len(tower_blocks(model, tower))):
            block = _compact_block(model, tower, i)
            device = block.mlp.c_fc.weight.device
            if not prune_heads and block.attn.rotary is not None:
                rotary.append(f"{tower}.{i}")
            if prune_heads or block.attn.rotary is not None:
                masks[f"{tower}.{i}.head"] = torch.ones(block.attn.num_heads, device=device)
            else:
                masks[f"{tower}.{i}.head_dim"] = torch.ones(block.attn.head_dim, device=device)
            masks[f"{tower}.{i}.mlp"] = torch.ones(block.mlp.hidden, device=device)
    if rotary:
        logging.getLogger(__name__).warning(
            "the attention of %s rotates pairs of head dimensions (EVA's rotary position embedding): UPop searches "
            "it by whole heads", f"{rotary[0]}..{rotary[-1].rsplit('.', 1)[1]}" if len(rotary) > 1 else rotary[0])
    return masks


def attach_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Make the model multiply `masks` in (in place; its blocks must be CompactBlocks, see `to_compact`).

    The model holds the tensors themselves (plain attributes, not buffers or parameters), so later in-place
    updates of the masks take effect without re-attaching; they are not in the state dict, and `.to()`
    does not move them (the forward moves them to the activations' device when needed).
    """
    for key, mask in masks.items():
        tower, layer, unit = _split_key(key)
        block = _compact_block(model, tower, layer)
        if unit == "mlp":
            block.mlp.neuron_mask = mask
        elif unit == "head_dim" and block.attn.rotary is not None:
            raise ValueError(f"mask {key}: EVA's attention rotates pairs of head dimensions (rotary position "
                             "embedding), so it is masked by whole heads ('<tower>.<layer>.head')")
        else:
            block.attn.qkv_mask_unit, block.attn.qkv_mask = unit, mask
    return model


def _named_blocks(model: nn.Module):
    for tower in transformer_towers(model):
        for i, block in enumerate(tower_blocks(model, tower)):
            yield tower, i, block


def attached_masks(model: nn.Module) -> Masks:
    """The mask tensors a model currently multiplies in (the same tensors, not copies)."""
    masks: Masks = {}
    for tower, i, block in _named_blocks(model):
        if isinstance(block, CompactBlock):
            if block.attn.qkv_mask is not None:
                masks[f"{tower}.{i}.{block.attn.qkv_mask_unit}"] = block.attn.qkv_mask
            if block.mlp.neuron_mask is not None:
                masks[f"{tower}.{i}.mlp"] = block.mlp.neuron_mask
    return masks


def clear_masks(model: nn.Module) -> nn.Module:
    """Stop multiplying masks in (in place)."""
    for _, _, block in _named_blocks(model):
        if isinstance(block, CompactBlock):
            block.attn.qkv_mask = block.attn.qkv_mask_unit = None
            block.mlp.neuron_mask = None
    return model


def _norm_parameters(norm: nn.Module) -> int:
    """Parameters one unit of an inner norm carries (its weight and bias entries; none for Identity)."""
    return sum(1 for name in ("weight", "bias") if getattr(norm, name, None) is not None)


def mask_costs(model: nn.Module, masks: Masks) -> Dict[str, int]:
    """Parameters one entry of each mask carries (weights and biases removed with it):
    head dim: H·(3·(W+1) + W) — a q, k and v row and an out-proj column in every head;
    head: d·(3·(W+1) + W); MLP unit: (W+1) + W — a c_fc row and a c_proj column; a gated MLP's unit adds its
    c_gate row (W+1), and an inner norm (EVA's) its weight and bias entries per unit."""
    costs = {}
    for key in masks:
        tower, layer, unit = _split_key(key)
        block = _compact_block(model, tower, layer)
        width = block.mlp.c_fc.in_features
        per_qkv_row = 3 * (width + 1) + width + _norm_parameters(block.attn.norm)
        if unit == "head_dim":
            costs[key] = block.attn.num_heads * per_qkv_row
        elif unit == "head":
            costs[key] = block.attn.head_dim * per_qkv_row
        else:
            gate = width + 1 if block.mlp.c_gate is not None else 0
            costs[key] = 2 * width + 1 + gate + _norm_parameters(block.mlp.norm)
    return costs


def upop_target(p: float, step: int, total_steps: int) -> float:
    """UPop's progressive target π_t = p·sqrt((1 − cos(π(t+1)/T)) / 2): from ≈0 at t = 0 to p at t = T−1."""
    fraction = min(1.0, (step + 1) / max(1, total_steps))
    return p * math.sqrt((1 - math.cos(math.pi * fraction)) / 2)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    centred = x - x.mean()
    return centred / std if std > 0 else centred


def allocate_masks(prune_scores: Masks, costs: Dict[str, int], target: float, p: float, round_to: int = 1) -> Masks:
    """UPop's unified allocation: the new mask values for a target fraction `target` of prunable params.

    `prune_scores`: per mask, a higher score means "prune first" (UPop: the accumulated gradient of the
    loss w.r.t. the mask — raising an entry that raises the loss is useless). Scores are standardised
    within the attention group and within the MLP group, each pooled over both towers, so the two
    groups and the two towers compete on one scale. Entries are sorted, each weighed by the parameters
    it carries, and cut where the cumulative cost comes closest to `target` × the total. Cut entries get
    1 − target/p (0 once target = p), the rest 1. Every layer keeps at least its best entry.

    `round_to` r > 1: every head-dim and MLP mask keeps a multiple of r entries (or all of them), the widths
    GEMM kernels run fastest at (8 or 16 on CPUs, 64 for GPU tensor cores); whole-head masks are left as they
    are (a head is already head_dim wide), and head dims round to at most half the head width. The budget
    still holds: each layer first keeps the multiple of r
    at or below what the unrounded cut kept (at least r), blocks of r are taken from the least important
    layers while that costs more than the unrounded cut kept, then given back, most important first (per
    parameter), only while the total kept cost stays within the unrounded cut's. (Only a model whose layers
    cannot all keep r entries within the budget ends above it, at r entries each.)
    """
    keys = list(prune_scores)
    groups = {"attention": [k for k in keys if not k.endswith(".mlp")], "mlp": [k for k in keys if k.endswith(".mlp")]}
    standardised: Dict[str, torch.Tensor] = {}
    for group_keys in groups.values():
        if not group_keys:
            continue
        pooled = _standardise(torch.cat([prune_scores[k].detach().float().flatten() for k in group_keys]))
        for k, chunk in zip(group_keys, pooled.split([prune_scores[k].numel() for k in group_keys])):
            standardised[k] = chunk
    scores = torch.cat([standardised[k] for k in keys])
    cost = torch.cat([torch.full((standardised[k].numel(),), float(costs[k]), device=scores.device) for k in keys])
    order = torch.argsort(scores, descending=True, stable=True)
    cumulative = torch.cat([cost.new_zeros(1), torch.cumsum(cost[order], 0)])
    n_cut = int(torch.argmin((cumulative - target * cost.sum()).abs()))
    cut = torch.zeros_like(scores, dtype=torch.bool)
    cut[order[:n_cut]] = True
    if round_to > 1:
        cut = _round_cut(keys, cut, scores, standardised, costs, round_to)

    pruned_value = 1.0 - target / p if p > 0 else 1.0
    new_masks: Masks = {}
    for k, cut_k, score_k in zip(keys, cut.split([standardised[k].numel() for k in keys]),
                                 scores.split([standardised[k].numel() for k in keys])):
        cut_k = cut_k.clone()
        if cut_k.all():  # every layer keeps its most important entry
            cut_k[torch.argmin(score_k)] = False
        values = torch.where(cut_k, torch.full_like(score_k, pruned_value), torch.ones_like(score_k))
        new_masks[k] = values.to(prune_scores[k].device)
    return new_masks


def _round_cut(keys: List[str], cut: torch.Tensor, scores: torch.Tensor, standardised: Dict[str, torch.Tensor],
               costs: Dict[str, int], round_to: int) -> torch.Tensor:
    """`cut` with every head-dim/MLP mask keeping a multiple of `round_to` entries, within the kept cost of
    `cut` (allocate_masks explains the rule). Within a layer the entries with the lowest scores are kept."""
    import heapq

    sizes = [standardised[k].numel() for k in keys]
    cuts, layer_scores = list(cut.split(sizes)), list(scores.split(sizes))
    rounded = [not k.endswith(".head") for k in keys]
    # entries of each layer, most important (lowest prune score) first
    ranked = [torch.argsort(layer_scores[i], stable=True) for i in range(len(keys))]

    def widths(i: int) -> List[int]:
        """The kept counts layer i may have: multiples of its multiple up to its size, and its size. A head
        dim rounds to at most half the head width: a multiple as wide as the head would leave its attention
        nothing to cut (64-wide heads at --round-to 64), so its cost would fall on the MLPs alone."""
        n = sizes[i]
        if not rounded[i]:
            return list(range(1, n + 1))
        multiple = min(round_to, max(1, n // 2)) if keys[i].endswith(".head_dim") else round_to
        return sorted({*range(multiple, n + 1, multiple), n})

    # what the unrounded cut keeps, each layer at least one entry (as allocate_masks then makes sure)
    counts = [max(1, int((~c).sum())) for c in cuts]
    budget = sum(float(costs[k]) * m for k, m in zip(keys, counts))
    kept = [max([w for w in widths(i) if w <= counts[i]] or [widths(i)[0]]) for i in range(len(keys))]
    spent = sum(float(costs[k]) * m for k, m in zip(keys, kept))

    # a layer whose cut kept fewer than round_to entries now keeps round_to: pay for it from the other
    # layers, least important block (per parameter) first
    while spent > budget + 1e-6:
        best = None
        for i in range(len(keys)):
            narrower = [w for w in widths(i) if w < kept[i]]
            if narrower:
                lost = -float(layer_scores[i][ranked[i][narrower[-1]:kept[i]]].sum())
                key = (lost / (costs[keys[i]] * (kept[i] - narrower[-1])), i, narrower[-1])
                best = key if best is None or key < best else best
        if best is None:
            break  # every layer at its narrowest: the narrowest widths are what rounding costs
        _, i, new = best
        spent -= float(costs[keys[i]]) * (kept[i] - new)
        kept[i] = new

    def step(i: int):
        """(-importance per cost, i, new count) of giving layer i its next allowed width, or None."""
        larger = [w for w in widths(i) if w > kept[i]]
        if not larger:
            return None
        new = larger[0]
        gained = -float(layer_scores[i][ranked[i][kept[i]:new]].sum())
        return (-gained / (costs[keys[i]] * (new - kept[i])), i, new)

    heap = [s for s in (step(i) for i in range(len(keys))) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, i, new = heapq.heappop(heap)
        extra = float(costs[keys[i]]) * (new - kept[i])
        if spent + extra > budget + 1e-6:
            continue  # does not fit; a narrower step of another layer still may
        kept[i], spent = new, spent + extra
        following = step(i)
        if following is not None:
            heapq.heappush(heap, following)
    out = []
    for i, c in enumerate(cuts):
        layer_cut = torch.ones_like(c)
        layer_cut[ranked[i][:kept[i]]] = False
        out.append(layer_cut)
    return torch.cat(out)


def kept_fraction(masks: Masks, costs: Dict[str, int]) -> Dict[str, float]:
    """Fraction of prunable parameters whose mask entries are non-zero (and were not cut), per group."""
    def fraction(keys):
        total = sum(costs[k] * masks[k].numel() for k in keys)
        kept = sum(costs[k] * float((masks[k] >= 1).sum()) for k in keys)
        return kept / total if total else 1.0

    attention = [k for k in masks if not k.endswith(".mlp")]
    mlp = [k for k in masks if k.endswith(".mlp")]
    return {"attention": fraction(attention), "mlp": fraction(mlp), "all": fraction(list(masks))}


def magnitude_prune_scores(model: nn.Module, masks: Masks) -> Masks:
    """Data-free scores for one-shot pruning: minus the L2 norm of the weights each entry carries (small
    weights are cut first). Used by the speed benchmark; the job uses gradients instead."""
    scores: Masks = {}
    with torch.no_grad():
        for key in masks:
            tower, layer, unit = _split_key(key)
            block = _compact_block(model, tower, layer)
            if unit == "mlp":
                mlp = block.mlp
                norm = dense_weight(mlp.c_fc).pow(2).sum(1) + dense_weight(mlp.c_proj).pow(2).sum(0)
                if mlp.c_gate is not None:
                    norm = norm + dense_weight(mlp.c_gate).pow(2).sum(1)
            else:
                attn = block.attn
                h, d = attn.num_heads, attn.head_dim
                w_in = torch.stack([dense_weight(getattr(attn, name)) for name in QKV_LINEARS])
                w_in = w_in.view(3, h, d, -1).pow(2).sum((0, 3))  # (H, d)
                w_out = dense_weight(attn.out_proj).view(-1, h, d).pow(2).sum(0)  # (H, d)
                norm = (w_in + w_out).sum(0 if unit == "head_dim" else 1)
            scores[key] = -norm.sqrt()
    return scores


# --- surgery ---------------------------------------------------------------------------------------------


def _cut_block(block: CompactBlock, unit: str, mask: torch.Tensor) -> None:
    """In place: the units of `block` whose mask entry is 0 removed, every other entry folded into the weights."""
    keep = torch.nonzero(mask).flatten()
    values = mask[keep]
    if unit == "mlp":
        mlp = block.mlp
        keep_neurons(block, keep)
        if mlp.c_gate is not None:  # a gated unit is linear in c_fc's row: the value folds in before any norm
            scale_outputs(mlp.c_fc, values)
        if mlp.c_gate is None or not isinstance(mlp.norm, nn.Identity):
            scale_inputs(mlp.c_proj, values)  # the mask multiplied c_proj's input (again after a norm)
        return
    if unit == "head":
        keep_heads(block, keep)
        row_values = values.repeat_interleave(block.attn.head_dim)  # rows run head by head
    else:
        keep_head_dims(block, keep)
        row_values = values.repeat(block.attn.num_heads)
    for name in QKV_LINEARS:  # a kept mask value v scales q, k and v alike: fold it into their rows
        scale_outputs(getattr(block.attn, name), row_values)
    if not isinstance(block.attn.norm, nn.Identity):  # and multiplies the norm's output: out_proj's columns
        scale_inputs(block.attn.out_proj, row_values)


def layer_shapes(model: nn.Module) -> Dict[str, List[Dict[str, int]]]:
    """Per tower, per layer: heads, head_dim, mlp_width."""
    return {tower: [{"heads": b.attn.num_heads, "head_dim": b.attn.head_dim, "mlp_width": b.mlp.c_fc.out_features}
                    for b in tower_blocks(model, tower)]
            for tower in transformer_towers(model)}


def _base_spec(spec: Dict) -> Dict:
    """The dense open_clip spec a pruned or masked spec derives from."""
    if spec.get("kind") == MASKED_KIND:
        return _base_spec(spec["base"])
    base = {"kind": "open_clip", "model": spec["model"]}
    if spec.get("model_cfg"):  # an architecture no config file describes (compress.models.hf_clip)
        base["model_cfg"] = spec["model_cfg"]
    if spec.get("model_kwargs"):
        base["model_kwargs"] = spec["model_kwargs"]
    return base


def prune_clip(model: nn.Module, masks: Masks) -> nn.Module:
    """A genuinely smaller copy of `model`: every 0 entry of `masks` removed from the weights (q/k/v rows,
    out-proj columns, c_fc rows, c_proj columns), every other value folded into the kept weights, so the
    result computes what the masked model computed. The input model is left as it was.
    """
    if not hasattr(model, "model_spec"):
        raise ValueError("prune_clip needs model.model_spec (the dense model's spec) to describe the result")
    for key, mask in masks.items():
        if not bool((mask != 0).any()):
            raise ValueError(f"mask {key} removes every unit of its layer; keep at least one")
    pruned = clone(model)
    to_compact(clear_masks(pruned))
    for key, mask in masks.items():
        tower, layer, unit = _split_key(key)
        block = _compact_block(pruned, tower, layer)
        _cut_block(block, unit, mask.detach().to(block.mlp.c_fc.weight.device))
    pruned.model_spec = _base_spec(pruned.model_spec)  # compact_spec reads the dense config from the model's spec
    pruned.model_spec = compact_spec(pruned, kind=PRUNED_KIND)
    return pruned


def _legacy_pruned_blocks(model: nn.Module, towers: Dict[str, List[Dict[str, int]]]) -> Dict[str, Dict[str, Any]]:
    """The compact `blocks` of a pruned_clip spec in the `towers` format: per-tower lists of
    {heads, head_dim, mlp_width} for every layer, whose attention keeps the softmax scale of the dense head
    width (`model`, freshly built dense, has that width)."""
    blocks = {}
    for written_tower, shapes in towers.items():
        tower = LEGACY_TOWER_NAMES.get(written_tower, written_tower)
        dense_blocks, prefix = tower_blocks(model, tower), tower_prefix(model, tower)
        if len(shapes) != len(dense_blocks):
            raise ValueError(f"pruned spec has {len(shapes)} {tower} layers, the model {len(dense_blocks)}")
        for i, (shape, block) in enumerate(zip(shapes, dense_blocks)):
            blocks[f"{prefix}.{i}"] = {"heads": shape["heads"], "head_dim": shape["head_dim"],
                                       "mlp_width": shape["mlp_width"],
                                       "scale": normalised_scale(block.attn.head_dim ** -0.5, shape["head_dim"])}
    return blocks


@register_model_kind(PRUNED_KIND)
def build_pruned_clip(spec: Dict) -> nn.Module:
    if "towers" not in spec:
        return build_compact_clip(spec)
    model = create_open_clip(spec["model"], **spec.get("model_kwargs", {}))
    return place_compact_blocks(model, {"blocks": _legacy_pruned_blocks(model, spec["towers"])})


def masked_spec(base_spec: Dict, masks: Masks) -> Dict:
    """The `masked_clip` spec of a model under search (masks as plain lists, checkpoint-safe)."""
    return {"kind": MASKED_KIND, "model": base_spec.get("model"), "base": base_spec,
            "masks": {k: [float(v) for v in m.detach().cpu().tolist()] for k, m in masks.items()}}


@register_model_kind(MASKED_KIND)
def build_masked_clip(spec: Dict) -> nn.Module:
    model = to_compact(build_model(spec["base"]))
    return attach_masks(model, {k: torch.tensor(v) for k, v in current_mask_names(spec["masks"]).items()})
