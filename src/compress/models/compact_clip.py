"""The `compact_clip` model kind: an open_clip CLIP whose transformer blocks were reshaped after training.

Every post-training tool (low-rank, head pruning, Fisher pruning, token masking, text-layer dropping) edits a
live open_clip CLIP by swapping modules, and they compose: a model can be pruned, then factorised, then
token-masked. What changed is read back from the live model (`compact_spec`), so the spec stays true whatever
order the tools ran in, and `build_compact_clip(spec)` rebuilds exactly those shapes:

    {"kind": "compact_clip", "model": "<open_clip config>", "model_kwargs": {...},
     "text_layers": [kept original indices] | None,            # text-encoder layer dropping
     "token_mask": {"drop": p, "seed": s} | None,              # FLIP masking at inference
     "blocks": {"visual.transformer.resblocks.0": {"heads": h, "head_dim": d, "mlp_width": f,
                                                   "ranks": {"q_proj": r, ..., "c_fc": r, ...}}}}

nn.MultiheadAttention keeps q, k and v packed in one `in_proj_weight`, which can neither be factorised per
projection nor lose heads without re-implementing its forward. A `CompactBlock` therefore computes attention
from separate q/k/v Linears (each possibly a `FactorizedLinear`) with any number of heads, through
`F.scaled_dot_product_attention`; converted from a dense block it reproduces the block's outputs exactly.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.registry import register_model_kind
from foundation.model_configs import register_model_configs

KIND = "compact_clip"
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_LINEARS = ("c_fc", "c_proj")
TOWER_PREFIXES = {"image": "visual.transformer.resblocks", "text": "transformer.resblocks"}


class FactorizedLinear(nn.Module):
    """y = up(down(x)): a rank-r bottleneck standing in for an out×in Linear (r·(in+out) weights)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def make_linear(in_features: int, out_features: int, rank: Optional[int] = None, bias: bool = True) -> nn.Module:
    with warnings.catch_warnings():  # a layer whose heads/neurons were all pruned has 0 features: legal, no news
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if rank is None:
            return nn.Linear(in_features, out_features, bias=bias)
        return FactorizedLinear(in_features, out_features, rank, bias=bias)


def linear_rank(layer: nn.Module) -> Optional[int]:
    return layer.rank if isinstance(layer, FactorizedLinear) else None


class SplitAttention(nn.Module):
    """Self-attention with separate q/k/v/out Linears and any number of heads of width `head_dim`.

    `head_mask` (one value per head, set only while searching what to prune) scales each head's output
    before out_proj, so its gradient measures the head's importance. `scale` is the softmax scale when it
    is not 1/sqrt(head_dim): a UPop-pruned block keeps its original head width's scale after losing
    head dimensions (see compress.pruning.PrunedAttention).
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, ranks: Optional[Dict[str, int]] = None,
                 scale: Optional[float] = None):
        super().__init__()
        ranks = ranks or {}
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        self.q_proj = make_linear(width, inner, ranks.get("q_proj"))
        self.k_proj = make_linear(width, inner, ranks.get("k_proj"))
        self.v_proj = make_linear(width, inner, ranks.get("v_proj"))
        self.out_proj = make_linear(inner, width, ranks.get("out_proj"))
        self.head_mask: Optional[torch.Tensor] = None

    def head_outputs(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-head attention outputs, (batch, tokens, heads, head_dim), before out_proj."""
        batch, tokens, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # pruning whole heads leaves every head's width, so its scale, unchanged
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        if self.num_heads == 0:  # every head pruned: the sub-layer adds out_proj's bias only
            return self.out_proj(x.new_zeros(batch, tokens, 0))
        heads = self.head_outputs(x, attn_mask)
        if self.head_mask is not None:
            heads = heads * self.head_mask.view(1, 1, -1, 1).to(heads.dtype)
        return self.out_proj(heads.reshape(batch, tokens, self.num_heads * self.head_dim))


class CompactMLP(nn.Module):
    """c_fc → activation → c_proj (open_clip's names), any hidden width; `neuron_mask` as `head_mask`."""

    def __init__(self, width: int, hidden: int, activation: nn.Module, ranks: Optional[Dict[str, int]] = None):
        super().__init__()
        ranks = ranks or {}
        self.c_fc = make_linear(width, hidden, ranks.get("c_fc"))
        self.gelu = activation
        self.c_proj = make_linear(hidden, width, ranks.get("c_proj"))
        self.neuron_mask: Optional[torch.Tensor] = None

    @property
    def hidden(self) -> int:
        return self.c_fc.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gelu(self.c_fc(x))
        if self.neuron_mask is not None:
            hidden = hidden * self.neuron_mask.to(hidden.dtype)
        return self.c_proj(hidden)


class CompactBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (same call signature and norms) around SplitAttention/CompactMLP."""

    def __init__(self, dense_block: nn.Module, heads: int, head_dim: int, mlp_width: int,
                 ranks: Optional[Dict[str, int]] = None, scale: Optional[float] = None):
        super().__init__()
        width = dense_block.ln_1.normalized_shape[0]
        # norms, layer scales and the activation are reused as they are: they carry the config's choices
        # (LayerNorm vs LayerNormFp32, GELU vs QuickGELU, ls_init_value)
        self.ln_1, self.ls_1 = dense_block.ln_1, dense_block.ls_1
        self.ln_2, self.ls_2 = dense_block.ln_2, dense_block.ls_2
        self.attn = SplitAttention(width, heads, head_dim, ranks, scale)
        self.mlp = CompactMLP(width, mlp_width, dense_block.mlp.gelu, ranks)

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: Optional[torch.Tensor] = None):
        if attn_mask is not None:
            attn_mask = attn_mask.to(q_x.dtype)
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks its first block for the cast dtype
        return self.ln_1.weight.dtype

    def describe(self) -> Dict[str, Any]:
        ranks = {name: linear_rank(getattr(self.attn, name)) for name in ATTENTION_LINEARS}
        ranks.update({name: linear_rank(getattr(self.mlp, name)) for name in MLP_LINEARS})
        shape = {"heads": self.attn.num_heads, "head_dim": self.attn.head_dim, "mlp_width": self.mlp.hidden,
                 "ranks": {name: r for name, r in ranks.items() if r is not None}}
        if self.attn.scale is not None:
            shape["scale"] = self.attn.scale
        return shape


# --- converting a dense open_clip CLIP ---------------------------------------------------------------


def compact_block_from_dense(block: nn.Module) -> CompactBlock:
    """A CompactBlock computing exactly what the ResidualAttentionBlock `block` computes: a dense one
    (nn.MultiheadAttention), or one reshaped by UPop pruning (PrunedAttention: any heads × head width,
    softmax scale of the original head width)."""
    from compress.models.pruning import PrunedAttention

    if isinstance(block, CompactBlock):
        return block
    attn = block.attn
    if isinstance(attn, PrunedAttention):
        if attn.unit_mask is not None or not attn.batch_first:
            raise ValueError("cannot convert a PrunedAttention that is still under search (masks attached) "
                             "or not batch-first")
        heads, head_dim = attn.num_heads, attn.head_dim
        scale = None if head_dim and abs(attn.scale - head_dim ** -0.5) < 1e-12 else attn.scale
    elif isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_weight is not None:
        heads, head_dim, scale = attn.num_heads, attn.embed_dim // attn.num_heads, None
    else:
        raise ValueError(f"cannot convert {type(block).__name__}: expected a batch-first nn.MultiheadAttention "
                         "with a packed in_proj (open_clip's default ResidualAttentionBlock) or a UPop-pruned "
                         "PrunedAttention")
    inner = heads * head_dim  # q, k and v are packed as [q; k; v] rows in both
    compact = CompactBlock(block, heads, head_dim, block.mlp.c_fc.out_features, scale=scale)
    with torch.no_grad():
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            getattr(compact.attn, name).weight.copy_(attn.in_proj_weight[i * inner:(i + 1) * inner])
            getattr(compact.attn, name).bias.copy_(attn.in_proj_bias[i * inner:(i + 1) * inner])
        compact.attn.out_proj.weight.copy_(attn.out_proj.weight)
        compact.attn.out_proj.bias.copy_(attn.out_proj.bias)
        compact.mlp.c_fc.load_state_dict(block.mlp.c_fc.state_dict())
        compact.mlp.c_proj.load_state_dict(block.mlp.c_proj.state_dict())
    return compact.to(device=attn.in_proj_weight.device, dtype=attn.in_proj_weight.dtype)


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The resblocks ModuleList of `tower` ("image" or "text")."""
    if tower not in TOWER_PREFIXES:
        raise ValueError(f"unknown tower {tower!r}; choose from {sorted(TOWER_PREFIXES)}")
    owner = model.visual.transformer if tower == "image" else getattr(model, "transformer", None)
    if owner is None or not hasattr(owner, "resblocks"):
        raise ValueError(f"this model has no open_clip {tower} transformer to compress")
    return owner.resblocks


def compact_blocks(model: nn.Module, towers=("image", "text"),
                   layers: Optional[List[int]] = None) -> Iterator[Tuple[str, CompactBlock]]:
    """Convert the chosen blocks to CompactBlocks in place (once) and yield (qualified name, block)."""
    for tower in towers:
        blocks = tower_blocks(model, tower)
        chosen = range(len(blocks)) if layers is None else layers
        for index in chosen:
            if not 0 <= index < len(blocks):
                raise ValueError(f"--layers {index} is out of range: the {tower} tower has {len(blocks)} layers")
            blocks[index] = compact_block_from_dense(blocks[index])
            yield f"{TOWER_PREFIXES[tower]}.{index}", blocks[index]


# --- the spec ---------------------------------------------------------------------------------------


def base_model_name(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    spec = getattr(model, "model_spec", None) or {}
    if spec.get("kind") not in ("open_clip", "pruned_clip", KIND):
        raise ValueError("post-training tools take an open_clip CLIP, a UPop-pruned pruned_clip or a "
                         f"compact_clip; got kind {spec.get('kind')!r}")
    return spec["model"], dict(spec.get("model_kwargs", {}))


def compact_pruned_blocks(model: nn.Module) -> nn.Module:
    """In place: every UPop-pruned block (PrunedAttention) becomes a CompactBlock, so a pruned_clip's
    shapes are all described by the compact_clip spec, including blocks no tool touched."""
    from compress.models.pruning import PrunedAttention

    for tower in TOWER_PREFIXES:
        try:
            blocks = tower_blocks(model, tower)
        except ValueError:
            continue
        for index, block in enumerate(blocks):
            if isinstance(getattr(block, "attn", None), PrunedAttention):
                blocks[index] = compact_block_from_dense(block)
    return model


def compact_spec(model: nn.Module) -> Dict[str, Any]:
    """The spec that rebuilds `model`'s current shapes (read from the live modules)."""
    name, kwargs = base_model_name(model)
    old = getattr(model, "model_spec", {}) or {}
    blocks = {name_: module.describe() for name_, module in model.named_modules() if isinstance(module, CompactBlock)}
    token_mask = getattr(model.visual, "patch_dropout", None)
    return {
        "kind": KIND,
        "model": name,
        "model_kwargs": kwargs,
        "text_layers": old.get("text_layers"),
        "token_mask": token_mask.describe() if hasattr(token_mask, "describe") else None,
        "blocks": blocks,
    }


def refresh_spec(model: nn.Module, **updates: Any) -> nn.Module:
    """Set `model.model_spec` to the spec of its current shapes (plus `updates`, e.g. text_layers)."""
    spec = getattr(model, "model_spec", None) or {}
    if spec.get("kind") == "pruned_clip":
        compact_pruned_blocks(model)
    spec = {**spec, **updates}
    model.model_spec = spec
    model.model_spec = compact_spec(model)
    return model


# --- inference-time structure edits the spec records (text layers kept, image tokens masked) ----------


def keep_text_layers(model: nn.Module, kept: Sequence[int], _refresh: bool = True) -> nn.Module:
    """In place: keep only text blocks `kept` (indices into the current blocks, in order)."""
    blocks = tower_blocks(model, "text")
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise ValueError("cannot drop every text layer")
    if kept[0] < 0 or kept[-1] >= len(blocks):
        raise ValueError(f"text layer indices {kept} out of range: the text tower has {len(blocks)} layers")
    model.transformer.resblocks = nn.ModuleList([blocks[i] for i in kept])
    model.transformer.layers = len(kept)
    if _refresh:
        # compact block names are re-read from the live model (positions in the new list); the spec keeps
        # the original indices, which the builder applies to a fresh model before placing those blocks
        original = (getattr(model, "model_spec", None) or {}).get("text_layers") or list(range(len(blocks)))
        refresh_spec(model, text_layers=[original[i] for i in kept])
    return model


class TokenMask(nn.Module):
    """Keep max(1, round((1 − drop)·N)) of the N patch tokens of each image (random, seeded); the class token stays."""

    def __init__(self, drop: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"token drop fraction must be in [0, 1); got {drop}")
        self.drop, self.seed = float(drop), int(seed)

    def describe(self) -> Dict[str, Any]:
        return {"drop": self.drop, "seed": self.seed}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop == 0.0:
            return x
        cls_token, patches = x[:, :1], x[:, 1:]
        batch, num_patches, _ = patches.shape
        keep = max(1, round((1.0 - self.drop) * num_patches))
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(batch, num_patches, generator=generator)
        # sorted indices keep the surviving patches in raster order (irrelevant to attention, nicer to inspect)
        kept = scores.topk(keep, dim=1).indices.sort(dim=1).values.to(x.device)
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_token, patches], dim=1)


@register_model_kind(KIND)
def build_compact_clip(spec: Dict[str, Any]) -> nn.Module:
    import open_clip

    register_model_configs()
    model = open_clip.create_model(spec["model"], pretrained=None, **spec.get("model_kwargs", {}))
    if spec.get("text_layers") is not None:
        keep_text_layers(model, spec["text_layers"], _refresh=False)
    for name, shape in spec.get("blocks", {}).items():
        parent_name, index = name.rsplit(".", 1)
        blocks = model.get_submodule(parent_name)
        blocks[int(index)] = CompactBlock(blocks[int(index)], shape["heads"], shape["head_dim"],
                                          shape["mlp_width"], shape.get("ranks"), shape.get("scale"))
    if spec.get("token_mask"):
        model.visual.patch_dropout = TokenMask(**spec["token_mask"])
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the spec (tools return new models; the input stays untouched)."""
    copied = copy.deepcopy(model)
    copied.model_spec = copy.deepcopy(getattr(model, "model_spec", None))
    return copied
