"""Low-rank factorisation of a CLIP's transformer Linears: plain SVD or Fisher-weighted SVD (FWSVD).

Each chosen out×in Linear W becomes two Linears, down (r×in, no bias) then up (out×r, W's bias), with
r = ⌊ρ·out·in/(out+in)⌋ so that the factors keep a fraction ρ of W's weights. The factors stay separate, never
multiplied back into one dense W: that is what makes the model really smaller and its forward fewer MACs.

- SVD: W ≈ U_r S_r V_rᵀ; up = U_r S_r, down = V_rᵀ (the best rank-r approximation in Frobenius norm).
- FWSVD (Hsu et al. 2022): not all output rows matter equally to the loss. With I = Σ_batches (∂L/∂W)² over
  calibration batches (L = CLIP's contrastive loss), row weights w = I.sum(1) and D = diag(√(w + ε)):
  D·W ≈ U_r S_r V_rᵀ, up = D⁻¹ U_r S_r, down = V_rᵀ — the rank-r fit that best preserves heavy rows.

Attention in/out projections are factorised per projection (q, k, v, out), which needs the blocks converted
to `CompactBlock`s (nn.MultiheadAttention packs q/k/v into one in_proj).

    python -m utils.lowrank --pretrained CKPT --out RUN_DIR --ratio 0.5 [--method fwsvd --calib-data X.tsv]
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from compress.models.compact_clip import (
    ATTENTION_LINEARS,
    MLP_LINEARS,
    FactorizedLinear,
    clone,
    compact_blocks,
    refresh_spec,
    transformer_towers,
)
from compress.ops.calibration import Batch, contrastive_loss, squared_gradients
from compress.ops.quantize import linears_by_tower

TARGET_GROUPS = {"attn": ATTENTION_LINEARS, "mlp": MLP_LINEARS}
ALL_TARGETS = ATTENTION_LINEARS + MLP_LINEARS


def rank_for_ratio(out_features: int, in_features: int, ratio: float, round_to: int = 1) -> int:
    """r = ⌊ρ·m·n/(m+n)⌋: two factors of rank r hold at most a fraction ρ of the m×n weights; rounded down to a
    multiple of `round_to` where r is at least that (still within ρ)."""
    rank = int(ratio * out_features * in_features // (out_features + in_features))
    return rank - rank % round_to if round_to > 1 and rank >= round_to else rank


def fisher_row_weights(squared_gradients: torch.Tensor) -> torch.Tensor:
    """FWSVD row weights of an out×in weight: its summed squared gradients, summed over each row."""
    return squared_gradients.sum(dim=1)


def svd_factors(weight: torch.Tensor, rank: int, row_weights: Optional[torch.Tensor] = None,
                eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up out×r, down r×in) with up @ down ≈ weight; row-weighted (FWSVD) when `row_weights` is given.

    eps is relative to the mean row weight, so rows that got no gradient keep a finite, small weight.
    """
    weight = weight.detach().float()  # float32 SVD: as accurate as the weights themselves, ~2x faster than double
    if row_weights is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    row_weights = row_weights.detach().float()
    scale = torch.sqrt(row_weights + eps * row_weights.mean().clamp_min(1e-30))
    u, s, vh = torch.linalg.svd(scale[:, None] * weight, full_matrices=False)
    return (u[:, :rank] * s[:rank]) / scale[:, None], vh[:rank]


def factorize_linear(linear: nn.Linear, rank: int, row_weights: Optional[torch.Tensor] = None) -> FactorizedLinear:
    """Two Linears (in→rank→out) replacing `linear`; exact when rank = min(in, out) and no row weights."""
    out_features, in_features = linear.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} must be in [1, {min(out_features, in_features)}] for a "
                         f"{out_features}x{in_features} Linear")
    up, down = svd_factors(linear.weight, rank, row_weights)
    factorized = FactorizedLinear(in_features, out_features, rank, bias=linear.bias is not None)
    with torch.no_grad():
        factorized.up.weight.copy_(up)
        factorized.down.weight.copy_(down)
        if linear.bias is not None:
            factorized.up.bias.copy_(linear.bias)
    return factorized.to(device=linear.weight.device, dtype=linear.weight.dtype)


def expand_targets(targets: Sequence[str]) -> List[str]:
    """"attn"/"mlp" groups or single Linear names (q_proj, k_proj, v_proj, out_proj, c_fc, c_gate, c_proj; c_gate
    is the gate of a gated MLP, EVA's SwiGLU)."""
    names: List[str] = []
    for target in targets:
        group = TARGET_GROUPS.get(target, (target,))
        for name in group:
            if name not in ALL_TARGETS:
                raise ValueError(f"unknown low-rank target {target!r}; choose from attn, mlp, {', '.join(ALL_TARGETS)}")
            if name not in names:
                names.append(name)
    return names


def _linear_owner(block: nn.Module, name: str) -> nn.Module:
    return block.attn if name in ATTENTION_LINEARS else block.mlp


def low_rank(model: nn.Module, ratio: float, towers: Sequence[str] = ("image",), layers: Optional[List[int]] = None,
             targets: Sequence[str] = ("attn", "mlp"), method: str = "svd", batches: Optional[List[Batch]] = None,
             loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss, round_to: int = 8) -> nn.Module:
    """A copy of `model` whose chosen Linears are factorised at kept-parameter ratio `ratio`.

    towers: "image" and/or "text"; layers: block indices in each tower (None = all); targets: see
    `expand_targets`; method "svd" or "fwsvd" (needs `batches`, calibration batches for `loss_fn`).
    Linears already factorised are left as they are. `round_to`: ranks are rounded down to a multiple of it
    (`rank_for_ratio`): CPU matrix products of an odd width run far below their peak (a 1600×3072 by 3072×307
    product at 61 GFLOP/s, by 3072×304 at 90, on one core), so the default 8 keeps the factorised tower at its
    MAC ratio; 1 keeps the exact ⌊ρ·m·n/(m+n)⌋.
    """
    if round_to < 1:
        raise ValueError(f"--round-to must be at least 1; got {round_to}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1); got {ratio}")
    if method not in ("svd", "fwsvd"):
        raise ValueError(f"--method must be svd or fwsvd; got {method!r}")
    if method == "fwsvd" and not batches:
        raise ValueError("FWSVD needs calibration batches (--calib-data)")
    names = expand_targets(targets)
    model = clone(model)
    # (module path of the owner, attribute) -> Linear
    chosen: Dict[Tuple[str, str], nn.Linear] = {}
    if "image" in towers and "image" not in transformer_towers(model):
        # an image tower of another kind (ConvNeXt, FastViT, a timm ViT): every Linear its forward calls
        logging.warning("the image tower of this model (%s) is no open_clip transformer: every nn.Linear its forward "
                        "calls is factorised (--layers and --targets apply to transformer blocks)",
                        type(model.visual).__name__)
        found = linears_by_tower(model)["image"]
        towers = [tower for tower in towers if tower != "image"]
        if not found and not towers:
            raise ValueError(f"the image tower of this model ({type(model.visual).__name__}) calls no nn.Linear to "
                             "factorise")
        for path in found:
            owner, name = path.rsplit(".", 1)
            chosen[(owner, name)] = model.get_submodule(path)
    for block_name, block in compact_blocks(model, towers, layers) if towers else ():
        for name in names:
            layer = getattr(_linear_owner(block, name), name, None)  # c_gate: a gated MLP's only
            if isinstance(layer, nn.Linear) and min(layer.weight.shape) > 0:
                chosen[(f"{block_name}.{'attn' if name in ATTENTION_LINEARS else 'mlp'}", name)] = layer

    row_weights: Dict[Tuple[str, str], torch.Tensor] = {}
    if method == "fwsvd":
        weights = [layer.weight for layer in chosen.values()]
        saved = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        try:
            fisher = squared_gradients(model, weights, batches, loss_fn)
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
        row_weights = {key: fisher_row_weights(f) for key, f in zip(chosen, fisher)}

    modules = dict(model.named_modules())
    for (owner, name), layer in chosen.items():
        out_features, in_features = layer.weight.shape
        rank = rank_for_ratio(out_features, in_features, ratio, round_to)
        if rank < 1:
            logging.warning("%s.%s: ratio %.3f leaves rank 0; kept dense", owner, name, ratio)
            continue
        setattr(modules[owner], name, factorize_linear(layer, rank, row_weights.get((owner, name))))
    return refresh_spec(model)
