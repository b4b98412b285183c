"""The compact transformer block, and the `compact_clip` model kind: an open_clip CLIP whose blocks were reshaped.

Every compression that changes a block's shape produces a `CompactBlock`: UPop's surgery (compress.models.pruning)
and each post-training tool (low-rank, head pruning, Fisher pruning), as well as token masking and text-layer
dropping, which the same spec records. They compose: a model can be pruned, then factorised, then token-masked.
What changed is read back from the live model (`compact_spec`), so the spec stays true whatever order the tools
ran in, and `build_compact_clip(spec)` rebuilds exactly those shapes:

    {"kind": "compact_clip", "model": "<open_clip config>", "model_kwargs": {...},
     "text_layers": [kept original indices] | None,            # text-encoder layer dropping
     "token_mask": {"drop": p, "seed": s, "per_image": true} | None,   # FLIP masking at inference
     "blocks": {"visual.transformer.resblocks.0": {"heads": h, "head_dim": d, "mlp_width": f,
                                                   "ranks": {"q_proj": r, ..., "c_fc": r, ...},
                                                   "scale": s}},   # "scale" only where not 1/sqrt(d)
     "linear_ranks": {"visual.trunk.stages.0.blocks.0.mlp.fc1": r}}  # Linears factorised outside the blocks

nn.MultiheadAttention keeps q, k and v packed in one `in_proj_weight`, which can neither be factorised per
projection nor lose heads or head dimensions without re-implementing its forward. A `CompactBlock` therefore
computes attention from separate q/k/v Linears (each possibly a `FactorizedLinear`) with any number of heads of
any width, through `F.scaled_dot_product_attention`; converted from a dense block it reproduces the block's
outputs. A state dict with the packed `in_proj_weight` (a dense CLIP's, or a pruned_clip checkpoint in the per-tower
`towers` spec format) loads into it directly.

The blocks may be open_clip's (`ResidualAttentionBlock`, under `...transformer.resblocks`) or those of a timm
image tower under `visual.trunk.blocks`: a `VisionTransformer`'s (SigLIP's: timm's pre-norm `Block` with a fused
`qkv` Linear, `proj`, `ls1/ls2`, `norm1/norm2` and an `Mlp` `fc1/act/fc2`) or EVA's `EvaBlock` (rotary position
embedding on q and k, q/k/v separate or fused with q/v biases only, a LayerNorm over the heads' outputs before
`proj`, a SwiGLU MLP `fc1_g/fc1_x/act/norm/fc2`, `gamma_1/gamma_2` layer scales). Each is one pre-norm residual
block, so one `CompactBlock` stands for any of them, under open_clip's names, and reuses the dense block's norms,
layer scales and activation; EVA's rotary attention, gated MLP and inner norms are parts of it (SplitAttention,
CompactMLP, KeptLayerNorm). A timm block with a part the compact block does not compute (q/k norms, a norm inside
a plain ViT block, a gated attention, a packed GLU MLP, dropout, stochastic depth) leaves its tower unconverted;
`tower_refusal` names the part. A timm tower's attention-pool head (SigLIP's `attn_pool`) is no block and stays
as it is.

Towers are named "image" and "text" everywhere (`TOWERS`); a block's qualified name is its module path.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.registry import create_open_clip, register_model_kind

KIND = "compact_clip"
TOWERS = ("image", "text")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj")
QKV_LINEARS = ATTENTION_LINEARS[:3]
# c_gate: the gate of a gated (SwiGLU) MLP, whose hidden units are act(c_gate(x)) · c_fc(x)
MLP_LINEARS = ("c_fc", "c_gate", "c_proj")
# a softmax scale this close to 1/sqrt(head_dim) is that default (the spec then leaves it out)
SCALE_TOLERANCE = 1e-12


# --- Linears: dense or factorised, sliced and rescaled alike -------------------------------------------


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


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The out×in matrix a Linear or FactorizedLinear applies."""
    if isinstance(layer, FactorizedLinear):
        return layer.up.weight @ layer.down.weight
    return layer.weight


def output_bias(layer: nn.Module) -> Optional[torch.Tensor]:
    return layer.up.bias if isinstance(layer, FactorizedLinear) else layer.bias


def keep_outputs(layer: nn.Module, index: torch.Tensor) -> nn.Module:
    """`layer` restricted to output features `index`."""
    if isinstance(layer, FactorizedLinear):
        layer.up = keep_outputs(layer.up, index)
        layer.out_features = layer.up.out_features
        return layer
    new = make_linear(layer.in_features, len(index), bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[index])
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


def keep_inputs(layer: nn.Module, index: torch.Tensor) -> nn.Module:
    """`layer` restricted to input features `index` (bias unchanged)."""
    if isinstance(layer, FactorizedLinear):
        layer.down = keep_inputs(layer.down, index)
        layer.in_features = layer.down.in_features
        return layer
    new = make_linear(len(index), layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:, index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


@torch.no_grad()
def scale_outputs(layer: nn.Module, factors: torch.Tensor) -> None:
    """In place: output feature i (its weights and bias) times factors[i]."""
    target = layer.up if isinstance(layer, FactorizedLinear) else layer
    factors = factors.to(target.weight)
    target.weight.mul_(factors[:, None])
    if target.bias is not None:
        target.bias.mul_(factors)


@torch.no_grad()
def scale_inputs(layer: nn.Module, factors: torch.Tensor) -> None:
    """In place: input feature j times factors[j] (the bias is untouched)."""
    target = layer.down if isinstance(layer, FactorizedLinear) else layer
    target.weight.mul_(factors.to(target.weight)[None, :])


def normalised_scale(scale: float, head_dim: int) -> Optional[float]:
    """`scale`, or None where it is the default 1/sqrt(head_dim) that the spec leaves out."""
    return None if head_dim and abs(scale - head_dim ** -0.5) < SCALE_TOLERANCE else scale


# --- the block ---------------------------------------------------------------------------------------------


class KeptLayerNorm(nn.Module):
    """A LayerNorm over the `features` units of a dense layer of which only some remain (`weight`/`bias` of the kept
    ones): the removed units count as zeros in its mean and variance.

    EVA's inner norms (over the heads' concatenated outputs before `proj`, over a SwiGLU's hidden units before
    `fc2`) take their statistics over every unit. A unit masked to 0 still counts there, as a zero; this norm
    counts it the same way once the unit is removed, so a pruned block computes exactly what the masked block did
    (masks multiply a unit before such a norm and again after it: see SplitAttention and CompactMLP)."""

    def __init__(self, dense: nn.LayerNorm, kept: int):
        super().__init__()
        self.features, self.eps = int(dense.normalized_shape[0]), dense.eps
        self.weight = nn.Parameter(dense.weight.detach()[:kept].clone()) if dense.weight is not None else None
        self.bias = nn.Parameter(dense.bias.detach()[:kept].clone()) if dense.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.shape[-1]
        if kept == self.features:
            return F.layer_norm(x, (kept,), self.weight, self.bias, self.eps)
        mean = x.sum(-1, keepdim=True) / self.features
        centred = x - mean
        # the removed units, zeros, each contribute mean² to the summed squared deviations
        variance = (centred.pow(2).sum(-1, keepdim=True) + (self.features - kept) * mean.pow(2)) / self.features
        out = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """In place: only units `index` (of the current ones) remain."""
        for name in ("weight", "bias"):
            if getattr(self, name) is not None:
                setattr(self, name, nn.Parameter(getattr(self, name)[index].clone()))


def _kept_norm(dense: Optional[nn.Module], kept: int) -> nn.Module:
    return nn.Identity() if dense is None else KeptLayerNorm(dense, kept)


def _mask_after_norm(norm: nn.Module, x: torch.Tensor, factors: Optional[torch.Tensor]) -> torch.Tensor:
    """`norm(x)`, and where `norm` is one (not Identity) the mask `factors` multiplied in again after it: a unit
    masked to 0 then adds nothing downstream, as once it is removed; a kept value v folds into the Linears on both
    sides of the norm."""
    if isinstance(norm, nn.Identity):
        return x
    out = norm(x)
    return out if factors is None else out * factors.to(out.device, out.dtype)


class SplitAttention(nn.Module):
    """Self-attention with separate q/k/v/out Linears and any number of heads of width `head_dim`.

    `scale` is the softmax scale when it is not 1/sqrt(head_dim): UPop cuts head dimensions but keeps the
    original head width's softmax temperature for the rest.

    EVA's attention adds two parts, taken from the dense block: `rotary` ({"prefix_tokens", "half"}), with which
    the `rope` tensor EVA hands each block rotates q and k of every token after the prefix tokens, per head, by
    timm's own `apply_rot_embed_cat` (it rotates pairs of head dimensions, so whole heads may go, single dimensions
    not: `keep_head_dims` refuses a rotary attention); and `norm`, a KeptLayerNorm over the heads' concatenated
    outputs before out_proj (Identity where there is none).

    Two kinds of mask, set only while searching what to prune (plain attributes, not buffers: DDP would
    broadcast buffers in place every step, which autograd forbids on a tensor that collects gradients; they
    follow the activations' device instead):
    - `head_mask`, one value per head, scales each head's output before out_proj, so its gradient measures
      the head's importance (Michel et al.; Kwon et al.);
    - `qkv_mask` (UPop), one value per head dimension shared by all heads (`qkv_mask_unit` "head_dim") or one
      per head ("head"), multiplies q, k and v alike.
    """

    def __init__(self, width: int, num_heads: int, head_dim: int, ranks: Optional[Dict[str, int]] = None,
                 scale: Optional[float] = None, biases: Optional[Dict[str, bool]] = None,
                 norm: Optional[nn.Module] = None, rotary: Optional[Dict[str, Any]] = None):
        super().__init__()
        ranks, biases = ranks or {}, biases or {}
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        for name in ATTENTION_LINEARS:
            shape = (inner, width) if name == "out_proj" else (width, inner)
            setattr(self, name, make_linear(*shape, ranks.get(name), bias=biases.get(name, True)))
        self.norm = norm if norm is not None else nn.Identity()
        self.rotary = dict(rotary) if rotary is not None else None
        self.head_mask: Optional[torch.Tensor] = None
        self.qkv_mask: Optional[torch.Tensor] = None
        self.qkv_mask_unit: Optional[str] = None
        self.register_load_state_dict_pre_hook(_unpack_in_proj)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    def head_outputs(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     rope: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """Per-head attention outputs, (batch, tokens, heads, head_dim), before the norm and out_proj."""
        batch, tokens, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] > 1:
            # nn.MultiheadAttention's (batch × heads, L, S) mask (CoCa's text tower: its cls token's padding
            # mask, one copy per head of the dense block), as one (batch, 1, L, S) mask for every head kept
            attn_mask = attn_mask.view(batch, -1, *attn_mask.shape[-2:])[:, :1]
        if self.qkv_mask is not None:
            mask = self.qkv_mask.to(q.device, q.dtype)
            mask = mask.view(1, 1, 1, -1) if self.qkv_mask_unit == "head_dim" else mask.view(1, -1, 1, 1)
            q, k, v = q * mask, k * mask, v * mask
        if rope is not None:
            if self.rotary is None:
                raise ValueError("a rotary position embedding was passed to an attention without one (not EVA's)")
            from timm.layers import apply_rot_embed_cat

            prefix, half = self.rotary["prefix_tokens"], self.rotary["half"]
            q, k = (torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)],
                              dim=2).type_as(v) for t in (q, k))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale, is_causal=is_causal)
        return out.transpose(1, 2)

    def _mask_factors(self) -> Optional[torch.Tensor]:
        """The masks set on this attention as one factor per head and dimension, flattened, or None."""
        factors = None
        for mask, per_head in ((self.head_mask, True), (self.qkv_mask, self.qkv_mask_unit == "head")):
            if mask is not None:
                grid = mask.view(-1, 1) if per_head else mask.view(1, -1)
                factors = grid if factors is None else factors * grid.to(factors)
        return None if factors is None else factors.expand(self.num_heads, self.head_dim).reshape(-1)

    def proj_input(self, heads: torch.Tensor) -> torch.Tensor:
        """What out_proj receives from the per-head outputs `heads` (batch, tokens, heads, head_dim): the head mask
        multiplied in, the heads concatenated, normalised where the attention has a norm."""
        batch, tokens = heads.shape[:2]
        if self.head_mask is not None:
            heads = heads * self.head_mask.to(heads.device, heads.dtype).view(1, 1, -1, 1)
        flat = heads.reshape(batch, tokens, self.num_heads * self.head_dim)
        return _mask_after_norm(self.norm, flat, self._mask_factors())

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        batch, tokens, width = x.shape
        if self.num_heads == 0:  # every head pruned: the sub-layer adds out_proj's bias only
            return self.out_proj(x.new_zeros(batch, tokens, 0))
        return self.out_proj(self.proj_input(self.head_outputs(x, attn_mask, rope, is_causal)))


def _unpack_in_proj(module: SplitAttention, state_dict: Dict[str, torch.Tensor], prefix: str, *_args) -> None:
    """load_state_dict pre-hook: a packed `in_proj_weight`/`in_proj_bias` ([q; k; v] rows, nn.MultiheadAttention's
    names, also those of a pruned_clip checkpoint in the per-tower `towers` format) becomes the q/k/v Linears'
    entries."""
    weight = state_dict.pop(prefix + "in_proj_weight", None)
    if weight is None:
        return
    bias = state_dict.pop(prefix + "in_proj_bias", None)  # timm's qkv may have none
    inner = weight.shape[0] // 3
    for index, (name, w) in enumerate(zip(QKV_LINEARS, weight.view(3, inner, weight.shape[1]))):
        state_dict[f"{prefix}{name}.weight"] = w
        if bias is not None:
            state_dict[f"{prefix}{name}.bias"] = bias.view(3, inner)[index]


class CompactMLP(nn.Module):
    """c_fc → activation → c_proj (open_clip's names), any hidden width; gated (EVA's SwiGLU), the hidden units
    are activation(c_gate(x)) · c_fc(x), and `norm` (EVA's inner norm, a KeptLayerNorm; else Identity)
    normalises them before c_proj.

    `neuron_mask` (one value per hidden unit, set only while searching, like SplitAttention's masks)
    multiplies the hidden units (before the norm, and again after it where there is one)."""

    def __init__(self, width: int, hidden: int, activation: nn.Module, ranks: Optional[Dict[str, int]] = None,
                 biases: Optional[Dict[str, bool]] = None, gated: bool = False, norm: Optional[nn.Module] = None):
        super().__init__()
        ranks, biases = ranks or {}, biases or {}
        self.c_fc = make_linear(width, hidden, ranks.get("c_fc"), bias=biases.get("c_fc", True))
        self.c_gate = make_linear(width, hidden, ranks.get("c_gate"), bias=biases.get("c_gate", True)) \
            if gated else None
        self.gelu = activation
        self.norm = norm if norm is not None else nn.Identity()
        self.c_proj = make_linear(hidden, width, ranks.get("c_proj"), bias=biases.get("c_proj", True))
        self.neuron_mask: Optional[torch.Tensor] = None

    @property
    def hidden(self) -> int:
        return self.c_fc.out_features

    def units(self, x: torch.Tensor) -> torch.Tensor:
        """The input of c_proj: the hidden units, masked and normalised."""
        if self.c_gate is not None:
            hidden = self.gelu(self.c_gate(x)) * self.c_fc(x)
        else:
            hidden = self.gelu(self.c_fc(x))
        if self.neuron_mask is not None:
            hidden = hidden * self.neuron_mask.to(hidden.device, hidden.dtype)
        return _mask_after_norm(self.norm, hidden, self.neuron_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.units(x))


def _is_timm_block(block: nn.Module) -> bool:
    return hasattr(block, "norm1") and hasattr(block, "attn") and hasattr(block, "mlp")


def _is_eva_block(block: nn.Module) -> bool:
    from timm.models.eva import EvaBlock

    return isinstance(block, EvaBlock)


def _has_bias(module: Optional[nn.Module]) -> bool:
    return module is not None and module.bias is not None


def _layer_scale(gamma: Optional[torch.Tensor]) -> nn.Module:
    """EVA's `gamma_1`/`gamma_2` parameter as timm's LayerScale module (Identity where the block has none)."""
    from timm.layers import LayerScale

    if gamma is None:
        return nn.Identity()
    scale = LayerScale(len(gamma))
    with torch.no_grad():
        scale.gamma.copy_(gamma)
    return scale


def _inner_norm(norm: nn.Module) -> Optional[nn.Module]:
    return None if isinstance(norm, nn.Identity) else norm


def _eva_parts(block: nn.Module) -> Dict[str, Any]:
    attn, mlp = block.attn, block.mlp
    gated = hasattr(mlp, "fc1_g")  # timm's SwiGLU (fc1_g, fc1_x); else timm's Mlp (fc1)
    fused = attn.qkv is not None  # q/k/v packed in one Linear with separate q_bias/v_bias (k has none)
    return {"norms": (block.norm1, block.norm2), "scales": (_layer_scale(block.gamma_1), _layer_scale(block.gamma_2)),
            "activation": mlp.act, "gated": gated, "attn_norm": _inner_norm(attn.norm),
            "mlp_norm": _inner_norm(mlp.norm),
            "rotary": {"prefix_tokens": int(attn.num_prefix_tokens), "half": bool(attn.rotate_half)},
            "biases": {"q_proj": attn.q_bias is not None if fused else _has_bias(attn.q_proj),
                       "k_proj": False if fused else _has_bias(attn.k_proj),
                       "v_proj": attn.v_bias is not None if fused else _has_bias(attn.v_proj),
                       "out_proj": _has_bias(attn.proj), "c_fc": _has_bias(mlp.fc1_x if gated else mlp.fc1),
                       "c_gate": gated and _has_bias(mlp.fc1_g), "c_proj": _has_bias(mlp.fc2)}}


def _dense_parts(block: nn.Module) -> Dict[str, Any]:
    """The pieces of a dense block (open_clip's ResidualAttentionBlock, timm's ViT Block or EVA's EvaBlock) a
    CompactBlock reuses or mirrors: its norms, layer scales and activation, which of its Linears carry a bias, and
    EVA's extras (a gated MLP, inner norms, rotary attention)."""
    plain = {"gated": False, "attn_norm": None, "mlp_norm": None, "rotary": None}
    if _is_eva_block(block):
        return _eva_parts(block)
    if _is_timm_block(block):
        qkv_bias = block.attn.qkv.bias is not None
        return {**plain, "norms": (block.norm1, block.norm2), "scales": (block.ls1, block.ls2),
                "activation": block.mlp.act,
                "biases": {**{name: qkv_bias for name in QKV_LINEARS}, "out_proj": block.attn.proj.bias is not None,
                           "c_fc": block.mlp.fc1.bias is not None, "c_proj": block.mlp.fc2.bias is not None}}
    return {**plain, "norms": (block.ln_1, block.ln_2), "scales": (block.ls_1, block.ls_2),
            "activation": block.mlp.gelu, "biases": {name: True for name in ATTENTION_LINEARS + MLP_LINEARS}}


# a timm ViT Block's entries under the names of the CompactBlock that stands for it (q/k/v unpack on loading)
TIMM_BLOCK_NAMES = {"norm1.": "ln_1.", "ls1.": "ls_1.", "norm2.": "ln_2.", "ls2.": "ls_2.",
                    "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                    "attn.proj.": "attn.out_proj.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
# an EvaBlock's entries likewise (its separate q_proj/k_proj/v_proj and inner norms already have the compact names)
EVA_BLOCK_NAMES = {"norm1.": "ln_1.", "norm2.": "ln_2.", "gamma_1": "ls_1.gamma", "gamma_2": "ls_2.gamma",
                   "attn.qkv.weight": "attn.in_proj_weight", "attn.q_bias": "attn.q_proj.bias",
                   "attn.v_bias": "attn.v_proj.bias", "attn.proj.": "attn.out_proj.", "mlp.fc1_x.": "mlp.c_fc.",
                   "mlp.fc1_g.": "mlp.c_gate.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


class CompactBlock(nn.Module):
    """A pre-norm residual attention block (open_clip's ResidualAttentionBlock, with its call signature, timm's
    ViT Block, or EVA's EvaBlock, called with the `rope` EVA passes) around SplitAttention/CompactMLP, under
    open_clip's names."""

    def __init__(self, dense_block: nn.Module, heads: int, head_dim: int, mlp_width: int,
                 ranks: Optional[Dict[str, int]] = None, scale: Optional[float] = None):
        super().__init__()
        parts = _dense_parts(dense_block)
        width = parts["norms"][0].normalized_shape[0]
        # norms, layer scales and the activation are reused as they are: they carry the config's choices
        # (LayerNorm vs LayerNormFp32, GELU vs QuickGELU vs tanh GELU, ls_init_value); the Linears keep the dense
        # block's biases or their absence (timm's qkv_bias=False)
        (self.ln_1, self.ln_2), (self.ls_1, self.ls_2) = parts["norms"], parts["scales"]
        # EVA's inner norms count the dense widths' units in their statistics (KeptLayerNorm)
        biases = parts["biases"]
        self.attn = SplitAttention(width, heads, head_dim, ranks, scale, biases,
                                   _kept_norm(parts["attn_norm"], heads * head_dim), parts["rotary"])
        self.mlp = CompactMLP(width, mlp_width, parts["activation"], ranks, biases, parts["gated"],
                              _kept_norm(parts["mlp_norm"], mlp_width))

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None and attn_mask.is_floating_point():  # an additive mask; a boolean one stays boolean
            attn_mask = attn_mask.to(q_x.dtype)
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), attn_mask=attn_mask, rope=rope, is_causal=is_causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer asks its first block for the cast dtype
        return self.ln_1.weight.dtype

    def describe(self) -> Dict[str, Any]:
        ranks = {name: linear_rank(getattr(self.attn, name)) for name in ATTENTION_LINEARS}
        ranks.update({name: linear_rank(getattr(self.mlp, name)) for name in MLP_LINEARS
                      if getattr(self.mlp, name) is not None})
        shape = {"heads": self.attn.num_heads, "head_dim": self.attn.head_dim, "mlp_width": self.mlp.hidden,
                 "ranks": {name: r for name, r in ranks.items() if r is not None}}
        if self.attn.scale is not None:
            shape["scale"] = self.attn.scale
        return shape


# --- physical slicing of a block (heads, head dimensions, MLP units) -----------------------------------------


def _keep_attention_features(attn: SplitAttention, index: torch.Tensor) -> None:
    for name in QKV_LINEARS:
        setattr(attn, name, keep_outputs(getattr(attn, name), index))
    attn.out_proj = keep_inputs(attn.out_proj, index)
    if isinstance(attn.norm, KeptLayerNorm):
        attn.norm.keep(index)
    attn.head_mask = attn.qkv_mask = attn.qkv_mask_unit = None


def keep_heads(block: CompactBlock, heads: Sequence[int]) -> CompactBlock:
    """In place: keep only attention heads `heads` of `block`."""
    attn = block.attn
    heads = sorted(int(h) for h in heads)
    device = next(block.parameters()).device
    index = torch.tensor([h * attn.head_dim + i for h in heads for i in range(attn.head_dim)],
                         dtype=torch.long, device=device)
    _keep_attention_features(attn, index)
    attn.num_heads = len(heads)
    return block


def keep_head_dims(block: CompactBlock, dims: Sequence[int]) -> CompactBlock:
    """In place: keep only dimensions `dims` of every head of `block` (UPop's head-dim unit). The softmax
    keeps the scale it had: cutting dimensions must not change the temperature of the others. A rotary
    attention (EVA's) is refused: its position embedding rotates pairs of dimensions within each head."""
    attn = block.attn
    if attn.rotary is not None:
        raise ValueError("EVA's attention rotates pairs of head dimensions by its rotary position embedding: it "
                         "loses whole heads only, not head dimensions")
    dims = sorted(int(i) for i in dims)
    device = next(block.parameters()).device
    index = torch.tensor([h * attn.head_dim + i for h in range(attn.num_heads) for i in dims],
                         dtype=torch.long, device=device)
    scale = attn.softmax_scale
    _keep_attention_features(attn, index)
    attn.head_dim = len(dims)
    attn.scale = normalised_scale(scale, attn.head_dim)
    return block


def keep_neurons(block: CompactBlock, neurons: Sequence[int]) -> CompactBlock:
    """In place: keep only MLP hidden units `neurons` of `block`."""
    mlp = block.mlp
    index = torch.tensor(sorted(int(n) for n in neurons), dtype=torch.long, device=next(block.parameters()).device)
    mlp.c_fc = keep_outputs(mlp.c_fc, index)
    if mlp.c_gate is not None:
        mlp.c_gate = keep_outputs(mlp.c_gate, index)
    if isinstance(mlp.norm, KeptLayerNorm):
        mlp.norm.keep(index)
    mlp.c_proj = keep_inputs(mlp.c_proj, index)
    mlp.neuron_mask = None
    return block


# --- finding and converting the blocks of a CLIP's transformer towers ------------------------------------------


def _open_clip_transformer(model: nn.Module, tower: str) -> Optional[Tuple[str, nn.Module]]:
    """(module path, open_clip Transformer) of `tower`, or None; the text tower is the CLIP's own or a
    CustomTextCLIP's."""
    if tower == "image":
        candidates = [("visual.transformer", getattr(getattr(model, "visual", None), "transformer", None))]
    else:
        candidates = [("transformer", getattr(model, "transformer", None)),
                      ("text.transformer", getattr(getattr(model, "text", None), "transformer", None))]
    for path, owner in candidates:
        if hasattr(owner, "resblocks"):
            return path, owner
    return None


def _timm_transformer_blocks(model: nn.Module) -> Optional[nn.Module]:
    """The block list of a timm transformer image tower (open_clip's TimmModel around a timm ViT or EVA: `trunk`
    with a `blocks` list of attention blocks), or None (a ConvNeXt's or FastViT's trunk has stages instead)."""
    blocks = getattr(getattr(getattr(model, "visual", None), "trunk", None), "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(
            _is_timm_block(block) or isinstance(block, CompactBlock) for block in blocks):
        return blocks
    return None


def _tower_block_list(model: nn.Module, tower: str) -> Tuple[str, nn.Module]:
    """(module path, block list) of `tower`: open_clip's `resblocks`, or a timm ViT image tower's `blocks`."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; choose from {', '.join(TOWERS)}")
    found = _open_clip_transformer(model, tower)
    if found is not None:
        return found[0] + ".resblocks", found[1].resblocks
    if tower == "image" and _timm_transformer_blocks(model) is not None:
        return "visual.trunk.blocks", _timm_transformer_blocks(model)
    raise ValueError(f"this model has no {tower} transformer (an open_clip or timm ViT image tower, an open_clip text "
                     "transformer) to compress")


def tower_blocks(model: nn.Module, tower: str) -> nn.Module:
    """The block list of `tower` ("image" or "text"): open_clip's resblocks or a timm ViT's blocks."""
    return _tower_block_list(model, tower)[1]


def tower_prefix(model: nn.Module, tower: str) -> str:
    """Module path of `tower`'s block list: a block's qualified name is `{prefix}.{index}`."""
    return _tower_block_list(model, tower)[0]


def _eva_block_refusal(block: nn.Module) -> Optional[str]:
    """None when EVA's `block` is one a CompactBlock computes exactly; otherwise the part it does not compute."""
    from timm.layers import Mlp, SwiGLU
    from timm.models.eva import EvaAttention

    attn, mlp = block.attn, block.mlp
    if type(attn) is not EvaAttention:
        return f"attn {type(attn).__name__} (not EVA's EvaAttention)"
    if attn.gate is not None:
        return "attn.gate (a sigmoid gate)"
    if type(mlp) not in (SwiGLU, Mlp) or not all(type(getattr(mlp, name, None)) in (nn.Linear, type(None))
                                                 for name in ("fc1", "fc1_g", "fc1_x", "fc2")):
        return f"mlp {type(mlp).__name__} (not a SwiGLU with separate gate and value Linears, nor a plain Mlp)"
    # a norm over an ungated MLP's units would sit after its activation, through which no mask value folds
    ungated_norm = ("mlp.norm",) if type(mlp) is Mlp else ()
    for part in ("attn.q_norm", "attn.k_norm", "drop_path1", "drop_path2") + ungated_norm:
        module = block.get_submodule(part)
        if not isinstance(module, nn.Identity):
            return f"{part} {type(module).__name__} (not Identity)"
    for part in ("attn.norm", "mlp.norm"):
        module = block.get_submodule(part)
        if not isinstance(module, (nn.Identity, nn.LayerNorm)) or \
                (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1):
            return f"{part} {type(module).__name__} (neither a LayerNorm nor Identity)"
    for part in ("attn.attn_drop", "attn.proj_drop", "mlp.drop1", "mlp.drop2"):
        if getattr(block.get_submodule(part), "p", 0.0):
            return f"{part} (dropout {block.get_submodule(part).p})"
    return None


def timm_block_refusal(block: nn.Module) -> Optional[str]:
    """None when the timm block `block` is a pre-norm ViT `Block` or an EVA `EvaBlock` a CompactBlock computes
    exactly; otherwise the part of it that a CompactBlock does not compute."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    if isinstance(block, CompactBlock):
        return None
    if _is_eva_block(block):
        return _eva_block_refusal(block)
    if type(block.attn) is not Attention or getattr(block.attn, "gate", None) is not None:
        what = "rotary position embedding on q and k" if hasattr(block.attn, "rotate_half") else "no plain attention"
        what = "a sigmoid gate" if getattr(block.attn, "gate", None) is not None else what
        return f"attn {type(block.attn).__name__} ({what})"
    if type(block.mlp) is not Mlp or type(block.mlp.fc1) is not nn.Linear or type(block.mlp.fc2) is not nn.Linear:
        return f"mlp {type(block.mlp).__name__} (gated or convolutional hidden units)"
    if type(block) is not Block:
        return f"{type(block).__name__} blocks, not timm's pre-norm ViT Block"
    for part in ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm", "drop_path1", "drop_path2"):
        module = block.get_submodule(part)
        if not isinstance(module, nn.Identity):
            return f"{part} {type(module).__name__} (not Identity)"
    for part in ("attn.attn_drop", "attn.proj_drop", "mlp.drop1", "mlp.drop2"):
        if getattr(block.get_submodule(part), "p", 0.0):
            return f"{part} (dropout {block.get_submodule(part).p})"
    return None


def tower_refusal(model: nn.Module, tower: str) -> Optional[str]:
    """None when `tower` is a transformer whose blocks convert to CompactBlocks; otherwise why it is not, as
    one line."""
    try:
        prefix, blocks = _tower_block_list(model, tower)
    except ValueError:
        owner = getattr(model, "visual", None) if tower == "image" else getattr(model, "text", model)
        return f"the {tower} tower of this model ({type(owner).__name__}) is no open_clip transformer"
    if prefix.startswith("visual.trunk."):
        reasons = [timm_block_refusal(block) for block in blocks]
        reason = next((reason for reason in reasons if reason is not None), None)
        if reason is not None:
            return (f"the {tower} tower of this model ({type(model.visual.trunk).__name__}) is no open_clip "
                    f"transformer, and its timm blocks have {reason}, which a compact block does not compute")
    return None


def timm_block_shape(block: nn.Module) -> Dict[str, int]:
    """Heads, head width and MLP width of a dense timm ViT Block or EvaBlock."""
    mlp = block.mlp
    return {"heads": block.attn.num_heads, "head_dim": block.attn.head_dim,
            "mlp_width": (mlp.fc1_x if hasattr(mlp, "fc1_x") else mlp.fc1).out_features}


def timm_compact_names(block: nn.Module) -> Dict[str, str]:
    """Each state-dict entry of a dense timm ViT Block or EvaBlock -> the name it has in the CompactBlock that
    stands for it (a fused `qkv` becomes the packed `attn.in_proj_*`, which the q/k/v Linears unpack on loading)."""
    names = EVA_BLOCK_NAMES if _is_eva_block(block) else TIMM_BLOCK_NAMES
    mapping = {}
    for name in block.state_dict():
        old = next((old for old in names if name.startswith(old)), "")
        mapping[name] = names.get(old, "") + name[len(old):]
    return mapping


def compact_block_from_dense(block: nn.Module) -> CompactBlock:
    """A CompactBlock computing what open_clip's ResidualAttentionBlock, timm's ViT Block or EVA's EvaBlock
    `block` computes (itself if it is one)."""
    if isinstance(block, CompactBlock):
        return block
    if _is_timm_block(block):
        reason = timm_block_refusal(block)
        if reason is not None:
            raise ValueError(f"cannot convert timm's {type(block).__name__}: it has {reason}")
        shape = timm_block_shape(block)
        compact = CompactBlock(block, shape["heads"], shape["head_dim"], shape["mlp_width"])
        names = timm_compact_names(block)
        state = {names[name]: tensor for name, tensor in block.state_dict().items()}
        weight = block.norm1.weight
    else:
        attn = getattr(block, "attn", None)
        if not (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_weight is not None
                and attn.in_proj_bias is not None and attn.bias_k is None
                and hasattr(getattr(block, "mlp", None), "c_fc")):
            raise ValueError(f"cannot convert {type(block).__name__}: expected open_clip's default "
                             "ResidualAttentionBlock (a batch-first nn.MultiheadAttention with packed, biased q/k/v, "
                             "and mlp.c_fc/c_proj)")
        compact = CompactBlock(block, attn.num_heads, attn.embed_dim // attn.num_heads, block.mlp.c_fc.out_features)
        state, weight = block.state_dict(), attn.in_proj_weight
    compact.to(device=weight.device, dtype=weight.dtype)
    compact.load_state_dict(state)  # the packed q/k/v unpack on the way (_unpack_in_proj)
    return compact


def compact_blocks(model: nn.Module, towers: Sequence[str] = TOWERS,
                   layers: Optional[List[int]] = None) -> Iterator[Tuple[str, CompactBlock]]:
    """Convert the chosen blocks to CompactBlocks in place (once) and yield (qualified name, block).

    A chosen tower that is no transformer a compact block stands for (an RN50's, a ConvNeXt's, a timm tower whose
    blocks have parts it does not compute) is left as it is, with one log line saying why, and the others are
    converted; a ValueError when none of the chosen towers is one."""
    present = transformer_towers(model)
    for tower in towers:
        if tower in TOWERS and tower not in present:
            message = f"{tower_refusal(model, tower)}: block operations do not apply to it"
            if not any(other in present for other in towers):
                raise ValueError(message)
            logging.getLogger(__name__).warning("%s; it is left as it is", message)
    for tower in [tower for tower in towers if tower not in TOWERS or tower in present]:
        blocks, prefix = tower_blocks(model, tower), tower_prefix(model, tower)
        chosen = range(len(blocks)) if layers is None else layers
        for index in chosen:
            if not 0 <= index < len(blocks):
                raise ValueError(f"--layers {index} is out of range: the {tower} tower has {len(blocks)} layers")
            blocks[index] = compact_block_from_dense(blocks[index])
            yield f"{prefix}.{index}", blocks[index]


def transformer_towers(model: nn.Module) -> List[str]:
    """The towers of `model` whose blocks are, or convert to, CompactBlocks (an RN50's image tower is none)."""
    return [tower for tower in TOWERS if tower_refusal(model, tower) is None]


def to_compact(model: nn.Module) -> nn.Module:
    """In place: every block of the transformer towers (`transformer_towers`) becomes a CompactBlock (same function,
    same weights)."""
    for _ in compact_blocks(model, transformer_towers(model)):
        pass
    return model


# --- the spec ---------------------------------------------------------------------------------------


def base_model_name(model: nn.Module) -> Tuple[str, Dict[str, Any]]:
    spec = getattr(model, "model_spec", None) or {}
    if spec.get("kind") not in ("open_clip", "pruned_clip", KIND):
        raise ValueError("post-training tools take an open_clip CLIP, a UPop-pruned pruned_clip or a "
                         f"compact_clip; got kind {spec.get('kind')!r}")
    return spec["model"], dict(spec.get("model_kwargs", {}))


def compact_spec(model: nn.Module, kind: str = KIND) -> Dict[str, Any]:
    """The spec that rebuilds `model`'s current shapes (read from the live modules), under `kind`."""
    name, kwargs = base_model_name(model)
    old = getattr(model, "model_spec", {}) or {}
    blocks = {name_: module.describe() for name_, module in model.named_modules() if isinstance(module, CompactBlock)}
    # factorised Linears outside the blocks: those of an image tower that is no open_clip transformer
    linear_ranks = {name_: module.rank for name_, module in model.named_modules()
                    if isinstance(module, FactorizedLinear) and not any(name_.startswith(b + ".") for b in blocks)}
    token_mask = installed_token_mask(model.visual)
    return {
        "kind": kind,
        "model": name,
        **({"model_cfg": old["model_cfg"]} if old.get("model_cfg") else {}),  # an architecture no file has
        "model_kwargs": kwargs,
        "text_layers": old.get("text_layers"),
        "token_mask": token_mask.describe() if token_mask is not None else None,
        "blocks": blocks,
        **({"linear_ranks": linear_ranks} if linear_ranks else {}),
    }


def refresh_spec(model: nn.Module, **updates: Any) -> nn.Module:
    """Set `model.model_spec` to the compact_clip spec of its current shapes (plus `updates`, e.g. text_layers).

    A pruned_clip becomes a compact_clip here: its blocks already are CompactBlocks, and once a tool has
    edited it the model is no longer UPop's output, which `--job prune` resumes as its own."""
    spec = {**(getattr(model, "model_spec", None) or {}), **updates}
    model.model_spec = spec
    model.model_spec = compact_spec(model)
    return model


# --- inference-time structure edits the spec records (text layers kept, image tokens masked) ----------


def keep_text_layers(model: nn.Module, kept: Sequence[int], _refresh: bool = True) -> nn.Module:
    """In place: keep only text blocks `kept` (indices into the current blocks, in order)."""
    found = _open_clip_transformer(model, "text")
    if found is None:
        raise ValueError("this model has no open_clip text transformer whose layers to keep")
    transformer = found[1]
    blocks = transformer.resblocks
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise ValueError("cannot drop every text layer")
    if kept[0] < 0 or kept[-1] >= len(blocks):
        raise ValueError(f"text layer indices {kept} out of range: the text tower has {len(blocks)} layers")
    transformer.resblocks = nn.ModuleList([blocks[i] for i in kept])
    transformer.layers = len(kept)
    if _refresh:
        # compact block names are re-read from the live model (positions in the new list); the spec keeps
        # the original indices, which the builder applies to a fresh model before placing those blocks
        original = (getattr(model, "model_spec", None) or {}).get("text_layers") or list(range(len(blocks)))
        refresh_spec(model, text_layers=[original[i] for i in kept])
    return model


class TokenMask(nn.Module):
    """Keep max(1, round((1 − drop)·N)) of the N patch tokens of each image (random, seeded); the `prefix_tokens`
    leading tokens (open_clip's class token; a timm ViT's or EVA's class and register tokens, none in SigLIP) stay.
With `with_indices` (EVA's hook) it also returns the kept patches' indices, by which EVA selects their rotary
    position embeddings.

    FLIP's masking at inference: a random choice of tokens, seeded. With `per_image` (what `utils.token_mask`
    records in every spec it writes) the choice is a function of the image and the seed alone: the image tower's forward
    pre-hook (`install_token_mask`) hands the mask the input pixels, each image's pixel bytes are hashed with
    the seed as key (`image_keys`: neither the batch nor the device changes the hash), and the image's token
    scores come from a generator seeded with that hash. The same image therefore keeps the
    same tokens alone, at any position of any batch, and in every later search: a cascade that embeds a
    candidate lazily, in whatever batch, gets the feature the index was built with.

    Without `per_image` (a spec that lacks the field) one generator draw covers the whole batch, so an
    image's tokens depend on its position in the batch; such a checkpoint keeps that rule, so it scores as it
    did when it was written.
    """

    def __init__(self, drop: float, seed: int = 0, per_image: bool = False):
        super().__init__()
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"token drop fraction must be in [0, 1); got {drop}")
        self.drop, self.seed, self.per_image = float(drop), int(seed), bool(per_image)
        # set where it is installed (install_token_mask): properties of the tower, not of the spec
        self.prefix_tokens, self.with_indices = 1, False
        self._image_keys: Optional[List[int]] = None  # set by the tower's pre-hook for the next forward

    def describe(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"drop": self.drop, "seed": self.seed}
        if self.per_image:
            spec["per_image"] = True
        return spec

    def observe_pixels(self, images: torch.Tensor) -> None:
        """Remember one key per image of the batch the tower is about to embed."""
        self._image_keys = image_keys(images, self.seed) if self.per_image and self.drop > 0 else None

    def forward(self, x: torch.Tensor):
        if self.drop == 0.0:
            return (x, None) if self.with_indices else x
        prefix, patches = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        batch, num_patches, _ = patches.shape
        keep = max(1, round((1.0 - self.drop) * num_patches))
        if self.per_image:
            keys, self._image_keys = self._image_keys, None
            if keys is None or len(keys) != batch:
                raise RuntimeError("a per-image TokenMask needs the image tower's input pixels: put it in place "
                                   "with compress.models.compact_clip.install_token_mask")
            scores = torch.stack([torch.rand(num_patches, generator=torch.Generator().manual_seed(key))
                                  for key in keys])
        else:
            scores = torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(self.seed))
        # sorted indices keep the surviving patches in raster order (irrelevant to attention, nicer to inspect)
        kept = scores.topk(keep, dim=1).indices.sort(dim=1).values.to(x.device)
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = torch.cat([prefix, patches], dim=1)
        return (x, kept) if self.with_indices else x


def image_keys(images: torch.Tensor, seed: int) -> List[int]:
    """One generator seed per image: a keyed BLAKE2 hash of the image's pixel bytes (float32) and `seed`.
    A hash of the bytes, not of arithmetic on them, so the key does not depend on the rest of the batch, on
    summation order or on the device."""
    pixels = images.detach().float().cpu().contiguous().numpy()
    salt = int(seed).to_bytes(8, "little", signed=False)
    return [int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8, key=salt).digest(), "little") >> 1
            for image in pixels]


def token_mask_site(visual: nn.Module) -> Optional[Tuple[nn.Module, str, int, bool]]:
    """(module, attribute, prefix tokens, with indices) of the hook where an image tower's patch tokens can be
    dropped after the positional embedding, or None (a ResNet, ConvNeXt, FastViT): open_clip ViT's `patch_dropout`
    (one class token before the patches), a timm ViT's `trunk.patch_drop` (`trunk.num_prefix_tokens` before them)
    or EVA's `trunk.patch_drop` (None in its inference form; what is put there returns the kept patches' indices
    too, which EVA applies to its rotary embedding). Each is dropout in training only, seeded by nothing; a
    TokenMask put there acts in eval mode, seeded."""
    if isinstance(getattr(visual, "patch_dropout", None), nn.Module):
        return visual, "patch_dropout", 1, False
    trunk = getattr(visual, "trunk", None)
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(trunk, VisionTransformer) and isinstance(getattr(trunk, "patch_drop", None), nn.Module):
        return trunk, "patch_drop", int(trunk.num_prefix_tokens), False
    if isinstance(trunk, Eva) and hasattr(trunk, "patch_drop"):
        return trunk, "patch_drop", int(trunk.num_prefix_tokens), True
    return None


def installed_token_mask(visual: nn.Module) -> Optional[TokenMask]:
    site = token_mask_site(visual)
    mask = getattr(site[0], site[1]) if site is not None else None
    return mask if isinstance(mask, TokenMask) else None


def _show_pixels_to_token_mask(visual: nn.Module, args: tuple) -> None:
    """Forward pre-hook of an image tower: its TokenMask (if any) sees the pixels before the patch embedding.
    Looked up at call time, so a copied model or a replaced mask needs no new hook."""
    mask = installed_token_mask(visual)
    if mask is not None and args and torch.is_tensor(args[0]):
        mask.observe_pixels(args[0])


def install_token_mask(visual: nn.Module, mask: TokenMask) -> None:
    """Make `mask` the image tower's patch dropout (`token_mask_site`), with the pre-hook that shows it each batch's
    pixels. ValueError for a tower without such a hook."""
    site = token_mask_site(visual)
    if site is None:
        raise ValueError(f"token masking drops the patch tokens of a ViT image tower (open_clip's or timm's); this "
                         f"model's ({type(visual).__name__}) has no patch_dropout hook to mask them")
    owner, attribute, mask.prefix_tokens, mask.with_indices = site
    setattr(owner, attribute, mask)
    if not getattr(visual, "_token_mask_hook", False):
        visual.register_forward_pre_hook(_show_pixels_to_token_mask)
        visual._token_mask_hook = True


def place_compact_blocks(model: nn.Module, spec: Dict[str, Any]) -> nn.Module:
    """In place on a freshly built dense `model`: the text layers, block shapes and token mask of a compact spec
    (weights unset: `compress.load` fills them next)."""
    if spec.get("text_layers") is not None:
        keep_text_layers(model, spec["text_layers"], _refresh=False)
    for name, shape in spec.get("blocks", {}).items():
        parent_name, index = name.rsplit(".", 1)
        blocks = model.get_submodule(parent_name)
        blocks[int(index)] = CompactBlock(blocks[int(index)], shape["heads"], shape["head_dim"],
                                          shape["mlp_width"], shape.get("ranks"), shape.get("scale"))
    for name, rank in spec.get("linear_ranks", {}).items():
        parent_name, attribute = name.rsplit(".", 1)
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear or rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"linear_ranks: {name} is no nn.Linear of which rank {rank} is a factorisation")
        setattr(model.get_submodule(parent_name), attribute,
                make_linear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None))
    if spec.get("token_mask"):
        install_token_mask(model.visual, TokenMask(**spec["token_mask"]))
    return model


@register_model_kind(KIND)
def build_compact_clip(spec: Dict[str, Any]) -> nn.Module:
    return place_compact_blocks(create_open_clip(spec["model"], **spec.get("model_kwargs", {})), spec)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that keeps the spec (tools return new models; the input stays untouched)."""
    copied = copy.deepcopy(model)
    copied.model_spec = copy.deepcopy(getattr(model, "model_spec", None))
    return copied
