"""Structured pruning of open_clip ViT CLIPs, as UPop does it: masks, importance, schedule, surgery.

Model → model operations, usable without the trainer:

    model = with_prunable_attention(model)          # nn.MultiheadAttention → PrunedAttention (same weights)
    masks = init_masks(model)                       # all-ones masks, both towers
    attach_masks(model, masks)                      # the model now multiplies them in (search)
    masks = allocate_masks(scores, mask_costs(model, masks), target=p, p=p)  # UPop's unified cut
    small = prune_clip(model, masks)                # a genuinely smaller model (sliced weights)

Masks (a dict `"{tower}.{layer}.{unit}" → 1-D tensor`, tower in visual/text):
- `head_dim`: one entry per head dimension, shared by all heads of the layer, multiplied into q, k and v;
- `head` (the `prune_heads` option): one entry per whole head, multiplied into q, k and v;
- `mlp`: one entry per hidden unit, multiplied in after the activation (the input of `c_proj`).
Residual width and depth are untouched. A 0 entry is removed by `prune_clip`; any other value is folded
into the kept weights, so a masked model and its pruned twin compute the same function.

Two model kinds are registered with `compress.registry`:
- `pruned_clip`: the open_clip config named by `model` with per-layer `heads`, `head_dim` and `mlp_width`
  in `towers`; its attention is `PrunedAttention`, whose parameter names match nn.MultiheadAttention's.
- `masked_clip`: a model under search — the dense `base` spec with its current `masks` multiplied in, so
  a checkpoint written mid-search is scored as the model that was actually being trained.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.registry import build_model, register_model_kind

TOWERS = ("visual", "text")
ATTENTION_UNITS = ("head_dim", "head")
Masks = Dict[str, torch.Tensor]


# --- the attention module that can hold any head count and head dim ------------------------------


class PrunedAttention(nn.Module):
    """Multi-head self-attention with `num_heads` heads of `head_dim` (any values, unlike
    nn.MultiheadAttention, whose head dim is embed_dim / num_heads).

    Parameter names match nn.MultiheadAttention (`in_proj_weight` [3·H·d, W] = q;k;v, `in_proj_bias`,
    `out_proj`), so an unpruned one loads a stock open_clip state dict. `scale` stays the *original*
    1/sqrt(head dim): dropping head dimensions must not change the softmax temperature of the rest.
    One fused q/k/v matmul and `F.scaled_dot_product_attention` keep the pruned model fast.
    During search `unit_mask` (per head dim, or per head) scales q, k and v. It is a plain attribute, not
    a buffer, on purpose: DDP would broadcast buffers in place every step, which autograd forbids on a
    tensor that collects gradients; it follows the activations' device instead.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, scale: Optional[float] = None,
                 batch_first: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.batch_first = batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner))
        self.out_proj = nn.Linear(inner, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self.mask_unit: Optional[str] = None
        self.unit_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "PrunedAttention":
        if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ValueError("only nn.MultiheadAttention with packed q/k/v projections and biases can be pruned")
        module = cls(mha.embed_dim, mha.num_heads, mha.head_dim, batch_first=mha.batch_first)
        module.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            module.in_proj_weight.copy_(mha.in_proj_weight)
            module.in_proj_bias.copy_(mha.in_proj_bias)
            module.out_proj.load_state_dict(mha.out_proj.state_dict())
        return module

    def _project(self, query, key, value) -> torch.Tensor:
        """q, k, v stacked as (3, B, N, H, d)."""
        if key is None or (key is query and value is query):
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            return qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).movedim(-3, 0)
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3)
        parts = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
        return torch.stack([p.unflatten(-1, (self.num_heads, self.head_dim)) for p in parts])

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **unused):
        if need_weights:
            raise ValueError("PrunedAttention does not return attention weights")
        if not self.batch_first:
            query, key, value = (None if t is None else t.transpose(0, 1) for t in (query, key, value))
        qkv = self._project(query, key, value)  # (3, B, N, H, d)
        if self.unit_mask is not None:
            mask = self.unit_mask.to(qkv.device, qkv.dtype)
            qkv = qkv * (mask if self.mask_unit == "head_dim" else mask[:, None])
        q, k, v = qkv.transpose(2, 3).unbind(0)  # (B, H, N, d) each
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def _mask_mlp_input(module: nn.Module, args):
    """Forward pre-hook on `mlp.c_proj`: the MLP mask multiplies the activations (UPop)."""
    mask = getattr(module, "unit_mask", None)
    if mask is None:
        return None
    return (args[0] * mask.to(args[0].device, args[0].dtype),) + tuple(args[1:])


# --- finding the blocks ------------------------------------------------------------------------------


def tower_blocks(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """The residual attention blocks of each tower of an open_clip ViT CLIP."""
    visual = getattr(getattr(model, "visual", None), "transformer", None)
    if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
        text = model.transformer
    else:
        text = getattr(getattr(model, "text", None), "transformer", None)
    if visual is None or text is None or not hasattr(visual, "resblocks"):
        raise ValueError("structured pruning needs an open_clip CLIP with transformer towers (a ViT image tower)")
    blocks = {"visual": list(visual.resblocks), "text": list(text.resblocks)}
    for tower, layers in blocks.items():
        for i, block in enumerate(layers):
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            if not isinstance(attn, (nn.MultiheadAttention, PrunedAttention)) or not hasattr(mlp, "c_fc"):
                raise ValueError(f"{tower} block {i} ({type(block).__name__}) is not a standard open_clip "
                                 f"ResidualAttentionBlock (attn + mlp.c_fc/c_proj); cannot prune it")
    return blocks


def with_prunable_attention(model: nn.Module) -> nn.Module:
    """Replace every nn.MultiheadAttention of both towers by an equivalent PrunedAttention (in place)."""
    for layers in tower_blocks(model).values():
        for block in layers:
            if isinstance(block.attn, nn.MultiheadAttention):
                block.attn = PrunedAttention.from_multihead(block.attn)
    return model


def _split_key(key: str) -> Tuple[str, int, str]:
    tower, layer, unit = key.split(".")
    if tower not in TOWERS or unit not in ATTENTION_UNITS + ("mlp",):
        raise ValueError(f"bad mask name {key!r}: expected '<visual|text>.<layer>.<head_dim|head|mlp>'")
    return tower, int(layer), unit


# --- masks ---------------------------------------------------------------------------------------------


def init_masks(model: nn.Module, prune_heads: bool = False, towers: Sequence[str] = TOWERS) -> Masks:
    """All-ones masks for every attention layer (per head dim, or per head) and MLP of `towers`."""
    masks: Masks = {}
    for tower, layers in tower_blocks(model).items():
        if tower not in towers:
            continue
        for i, block in enumerate(layers):
            device = block.mlp.c_fc.weight.device
            attn = block.attn
            if prune_heads:
                masks[f"{tower}.{i}.head"] = torch.ones(attn.num_heads, device=device)
            else:
                masks[f"{tower}.{i}.head_dim"] = torch.ones(attn.head_dim, device=device)
            masks[f"{tower}.{i}.mlp"] = torch.ones(block.mlp.c_fc.out_features, device=device)
    return masks


def attach_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Make the model multiply `masks` in (in place; attention must already be PrunedAttention).

    The model holds the tensors themselves (plain attributes, not buffers or parameters), so later in-place
    updates of the masks take effect without re-attaching; they are not in the state dict, and `.to()`
    does not move them (the forward moves them to the activations' device when needed).
    """
    blocks = tower_blocks(model)
    for key, mask in masks.items():
        tower, layer, unit = _split_key(key)
        block = blocks[tower][layer]
        if unit == "mlp":
            c_proj = block.mlp.c_proj
            c_proj.unit_mask = mask
            if not getattr(c_proj, "_has_mask_hook", False):
                c_proj.register_forward_pre_hook(_mask_mlp_input)
                c_proj._has_mask_hook = True
        else:
            if not isinstance(block.attn, PrunedAttention):
                raise ValueError("attach_masks: call with_prunable_attention(model) first")
            block.attn.mask_unit = unit
            block.attn.unit_mask = mask
    return model


def attached_masks(model: nn.Module) -> Masks:
    """The mask tensors a model currently multiplies in (the same tensors, not copies)."""
    masks: Masks = {}
    for tower, layers in tower_blocks(model).items():
        for i, block in enumerate(layers):
            if isinstance(block.attn, PrunedAttention) and block.attn.unit_mask is not None:
                masks[f"{tower}.{i}.{block.attn.mask_unit}"] = block.attn.unit_mask
            if getattr(block.mlp.c_proj, "unit_mask", None) is not None:
                masks[f"{tower}.{i}.mlp"] = block.mlp.c_proj.unit_mask
    return masks


def mask_costs(model: nn.Module, masks: Masks) -> Dict[str, int]:
    """Parameters one entry of each mask carries (weights and biases removed with it):
    head dim: H·(3·(W+1) + W) — a q, k and v row and an out-proj column in every head;
    head: d·(3·(W+1) + W); MLP unit: (W+1) + W — a c_fc row and a c_proj column."""
    blocks = tower_blocks(model)
    costs = {}
    for key in masks:
        tower, layer, unit = _split_key(key)
        block = blocks[tower][layer]
        width = block.mlp.c_fc.in_features
        per_qkv_row = 3 * (width + 1) + width
        if unit == "head_dim":
            costs[key] = block.attn.num_heads * per_qkv_row
        elif unit == "head":
            costs[key] = block.attn.head_dim * per_qkv_row
        else:
            costs[key] = 2 * width + 1
    return costs


def upop_target(p: float, step: int, total_steps: int) -> float:
    """UPop's progressive target π_t = p·sqrt((1 − cos(π(t+1)/T)) / 2): from ≈0 at t = 0 to p at t = T−1."""
    fraction = min(1.0, (step + 1) / max(1, total_steps))
    return p * math.sqrt((1 - math.cos(math.pi * fraction)) / 2)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    centred = x - x.mean()
    return centred / std if std > 0 else centred


def allocate_masks(prune_scores: Masks, costs: Dict[str, int], target: float, p: float) -> Masks:
    """UPop's unified allocation: the new mask values for a target fraction `target` of prunable params.

    `prune_scores`: per mask, a higher score means "prune first" (UPop: the accumulated gradient of the
    loss w.r.t. the mask — raising an entry that raises the loss is useless). Scores are standardised
    within the attention group and within the MLP group, each pooled over both towers, so the two
    groups and the two towers compete on one scale. Entries are sorted, each weighed by the parameters
    it carries, and cut where the cumulative cost comes closest to `target` × the total. Cut entries get
    1 − target/p (0 once target = p), the rest 1. Every layer keeps at least its best entry.
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
    blocks = tower_blocks(model)
    scores: Masks = {}
    with torch.no_grad():
        for key in masks:
            tower, layer, unit = _split_key(key)
            block = blocks[tower][layer]
            if unit == "mlp":
                norm = block.mlp.c_fc.weight.pow(2).sum(1) + block.mlp.c_proj.weight.pow(2).sum(0)
            else:
                attn = block.attn
                h, d = attn.num_heads, attn.head_dim
                w_in = attn.in_proj_weight.view(3, h, d, -1).pow(2).sum((0, 3))  # (H, d)
                w_out = attn.out_proj.weight.view(-1, h, d).pow(2).sum(0)  # (H, d)
                norm = (w_in + w_out).sum(0 if unit == "head_dim" else 1)
            scores[key] = -norm.sqrt()
    return scores


# --- surgery ---------------------------------------------------------------------------------------------


def _slice_attention(attn: PrunedAttention, mask: torch.Tensor, unit: str) -> PrunedAttention:
    h, d, width = attn.num_heads, attn.head_dim, attn.embed_dim
    keep = torch.nonzero(mask).flatten()
    values = mask[keep].to(attn.in_proj_weight.dtype)
    w_in = attn.in_proj_weight.detach().view(3, h, d, width)
    b_in = attn.in_proj_bias.detach().view(3, h, d)
    w_out = attn.out_proj.weight.detach().view(width, h, d)
    if unit == "head_dim":
        # a kept mask value v scales q, k and v alike: fold it into their rows
        w_in, b_in = w_in[:, :, keep] * values[:, None], b_in[:, :, keep] * values
        w_out = w_out[:, :, keep]
        new_h, new_d = h, keep.numel()
    else:
        w_in, b_in = w_in[:, keep] * values[:, None, None], b_in[:, keep] * values[:, None]
        w_out = w_out[:, keep]
        new_h, new_d = keep.numel(), d
    new = PrunedAttention(width, new_h, new_d, scale=attn.scale, batch_first=attn.batch_first)
    new.to(device=attn.in_proj_weight.device, dtype=attn.in_proj_weight.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(w_in.reshape(3 * new_h * new_d, width))
        new.in_proj_bias.copy_(b_in.reshape(-1))
        new.out_proj.weight.copy_(w_out.reshape(width, new_h * new_d))
        new.out_proj.bias.copy_(attn.out_proj.bias)
    return new


def _slice_mlp(mlp: nn.Module, mask: torch.Tensor) -> None:
    keep = torch.nonzero(mask).flatten()
    values = mask[keep].to(mlp.c_fc.weight.dtype)
    c_fc, c_proj = mlp.c_fc, mlp.c_proj
    new_fc = nn.Linear(c_fc.in_features, keep.numel()).to(c_fc.weight)
    new_proj = nn.Linear(keep.numel(), c_proj.out_features).to(c_proj.weight)
    with torch.no_grad():
        new_fc.weight.copy_(c_fc.weight[keep])
        new_fc.bias.copy_(c_fc.bias[keep])
        new_proj.weight.copy_(c_proj.weight[:, keep] * values)  # the mask multiplied c_proj's input
        new_proj.bias.copy_(c_proj.bias)
    mlp.c_fc, mlp.c_proj = new_fc, new_proj


def clear_masks(model: nn.Module) -> nn.Module:
    """Stop multiplying masks in (in place)."""
    for layers in tower_blocks(model).values():
        for block in layers:
            if isinstance(block.attn, PrunedAttention):
                block.attn.unit_mask, block.attn.mask_unit = None, None
            if getattr(block.mlp.c_proj, "unit_mask", None) is not None:
                block.mlp.c_proj.unit_mask = None
    return model


def layer_shapes(model: nn.Module) -> Dict[str, List[Dict[str, int]]]:
    """Per tower, per layer: heads, head_dim, mlp_width."""
    return {tower: [{"heads": b.attn.num_heads, "head_dim": b.attn.head_dim, "mlp_width": b.mlp.c_fc.out_features}
                    for b in layers]
            for tower, layers in tower_blocks(model).items()}


def _base_spec(spec: Dict) -> Dict:
    """The dense open_clip spec a pruned or masked spec derives from."""
    if spec.get("kind") == "masked_clip":
        return _base_spec(spec["base"])
    base = {"kind": "open_clip", "model": spec["model"]}
    if spec.get("model_kwargs"):
        base["model_kwargs"] = spec["model_kwargs"]
    return base


def pruned_spec(model: nn.Module) -> Dict:
    """The `pruned_clip` spec of a model: its base open_clip config and its per-layer shapes."""
    base = _base_spec(getattr(model, "model_spec", None) or {})
    return {**base, "kind": "pruned_clip", "towers": layer_shapes(model)}


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
    pruned = copy.deepcopy(model)
    with_prunable_attention(clear_masks(pruned))
    blocks = tower_blocks(pruned)
    for key, mask in masks.items():
        tower, layer, unit = _split_key(key)
        block = blocks[tower][layer]
        mask = mask.detach().to(block.mlp.c_fc.weight.device)
        if unit == "mlp":
            _slice_mlp(block.mlp, mask)
        else:
            block.attn = _slice_attention(block.attn, mask, unit)
    pruned.model_spec = pruned_spec(pruned)
    return pruned


def reshape_layers(model: nn.Module, towers: Dict[str, List[Dict[str, int]]]) -> nn.Module:
    """Give a freshly built dense model the per-layer shapes of a `pruned_clip` spec (weights unset)."""
    blocks = tower_blocks(with_prunable_attention(model))
    for tower, shapes in towers.items():
        if len(shapes) != len(blocks[tower]):
            raise ValueError(f"pruned spec has {len(shapes)} {tower} layers, the model {len(blocks[tower])}")
        for block, shape in zip(blocks[tower], shapes):
            attn = block.attn
            block.attn = PrunedAttention(attn.embed_dim, shape["heads"], shape["head_dim"], scale=attn.scale,
                                         batch_first=attn.batch_first)
            width = block.mlp.c_fc.in_features
            block.mlp.c_fc = nn.Linear(width, shape["mlp_width"])
            block.mlp.c_proj = nn.Linear(shape["mlp_width"], width)
    return model


@register_model_kind("pruned_clip")
def build_pruned_clip(spec: Dict) -> nn.Module:
    return reshape_layers(build_model(_base_spec(spec)), spec["towers"])


def masked_spec(base_spec: Dict, masks: Masks) -> Dict:
    """The `masked_clip` spec of a model under search (masks as plain lists, checkpoint-safe)."""
    return {"kind": "masked_clip", "model": base_spec.get("model"), "base": base_spec,
            "masks": {k: [float(v) for v in m.detach().cpu().tolist()] for k, m in masks.items()}}


@register_model_kind("masked_clip")
def build_masked_clip(spec: Dict) -> nn.Module:
    model = with_prunable_attention(build_model(spec["base"]))
    return attach_masks(model, {k: torch.tensor(v) for k, v in spec["masks"].items()})
