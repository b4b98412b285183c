"""Retraining-free pruning of attention heads and MLP neurons under a MAC budget (Kwon et al., NeurIPS 2022,
"A Fast Post-Training Pruning Framework for Transformers"), as casCLIP applied it to CLIP's image tower.

1. Fisher scores. Every head and every MLP hidden unit of the chosen blocks gets a mask variable m = 1. The
   contrastive loss's gradients g = ∂L/∂m on calibration batches give the empirical Fisher diagonal
   I_i = Σ_batches g_i²; pruning a set S costs about ½ Σ_{i∈S} I_i of loss.
2. Mask search under the constraint. A head of a block with L tokens, width W, head width d costs
   4·L·W·d + 2·L²·d MACs (q/k/v/out projections and the two attention products), a neuron 2·L·W (3·L·W in a
   gated MLP, EVA's SwiGLU, whose unit has a gate row too). The budget
   is `mac_constraint` × the MACs of all heads and neurons of the chosen blocks. For every number n of heads
   kept (the n most important), the remaining budget is filled with the most important neurons; the (n, k)
   pair with the largest kept Fisher mass wins.
3. Mask rearrangement. Within each layer the diagonal ignores interactions; with the per-batch gradients G,
   F = GᵀG approximates the layer's Fisher block, the loss of pruning S ≈ z_Sᵀ F z_S (z_S its indicator). For
   the same number of pruned units per layer, a greedy search picks the set minimising that; it replaces the
   diagonal choice when it scores better.
4. Physical pruning (q/k/v rows, out_proj columns; c_fc rows, c_proj columns), then mask tuning: for each
   layer in forward order, on the pruned model's own calibration activations, the kept units' outputs are
   rescaled by the least-squares solution that best reproduces the dense layer's output (ridge-damped normal
   equations; the scales are folded into out_proj / c_proj columns, so nothing is added to the model).

Kwon et al. use per-sample gradients; a contrastive loss has no per-sample loss, so gradients are per
calibration batch — more, smaller batches (`--calib-batches 32 --calib-batch-size 16`) give a better Fisher.
MACs are counted as for dense Linears: prune before factorising.

    python -m utils.fisher_prune --pretrained CKPT --out RUN_DIR --mac-constraint 0.6 --calib-data train.tsv
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from compress.models.compact_clip import (
    CompactBlock,
    clone,
    compact_blocks,
    dense_weight,
    keep_heads,
    keep_neurons,
    output_bias,
    refresh_spec,
    scale_inputs,
)
from compress.ops.calibration import Batch, contrastive_loss, per_batch_gradients


def head_macs(tokens: int, width: int, head_dim: int) -> int:
    """MACs of one attention head per sample: its slices of the q, k, v and output projections
    (4·T·W·d) plus its attention scores and weighted sum (2·T²·d)."""
    return 4 * tokens * width * head_dim + 2 * tokens * tokens * head_dim


def neuron_macs(tokens: int, width: int, gated: bool = False) -> int:
    """MACs of one MLP hidden neuron per sample: its row of the first Linear and column of the second (2·T·W), and
    in a gated MLP its row of the gate (3·T·W)."""
    return (3 if gated else 2) * tokens * width


def block_macs(block: CompactBlock, tokens: int) -> int:
    """MACs of a block's heads and neurons per sample (dense Linears; the quantity the constraint bounds)."""
    width = block.ln_1.normalized_shape[0]
    return (block.attn.num_heads * head_macs(tokens, width, block.attn.head_dim)
            + block.mlp.hidden * neuron_macs(tokens, width, block.mlp.c_gate is not None))


# --- 2. search under the MAC constraint --------------------------------------------------------------


def search_under_constraint(head_scores: torch.Tensor, head_costs: torch.Tensor, neuron_scores: torch.Tensor,
                            neuron_costs: torch.Tensor, budget: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep masks (heads, neurons) maximising kept Fisher mass with total cost ≤ budget.

    Kwon et al.'s search: heads and neurons each ranked by score; for n kept heads, the most important
    neurons fill what the budget leaves.
    """
    head_order = torch.argsort(head_scores, descending=True)
    neuron_order = torch.argsort(neuron_scores, descending=True)
    zero = torch.zeros(1, dtype=torch.float64)
    head_cost_cum = torch.cat([zero, head_costs[head_order].double().cumsum(0)])
    head_score_cum = torch.cat([zero, head_scores[head_order].double().cumsum(0)])
    neuron_cost_cum = torch.cat([zero, neuron_costs[neuron_order].double().cumsum(0)])
    neuron_score_cum = torch.cat([zero, neuron_scores[neuron_order].double().cumsum(0)])
    best, best_pair = -1.0, (0, 0)
    for n in range(len(head_order) + 1):
        remaining = budget - head_cost_cum[n]
        if remaining < 0:
            break
        # number of neurons whose cumulative cost fits (cum[0] = 0 always fits)
        k = int(torch.searchsorted(neuron_cost_cum, remaining, right=True)) - 1
        score = float(head_score_cum[n] + neuron_score_cum[k])
        if score > best:
            best, best_pair = score, (n, k)
    keep_heads_mask = torch.zeros(len(head_scores), dtype=torch.bool)
    keep_heads_mask[head_order[:best_pair[0]]] = True
    keep_neurons_mask = torch.zeros(len(neuron_scores), dtype=torch.bool)
    keep_neurons_mask[neuron_order[:best_pair[1]]] = True
    return keep_heads_mask, keep_neurons_mask


# --- 3. mask rearrangement ---------------------------------------------------------------------------


def pruning_loss(fisher_block: torch.Tensor, pruned: torch.Tensor) -> float:
    """Fisher estimate of the loss increase from pruning the units marked in the boolean `pruned`: zᵀ F z."""
    z = pruned.double()
    return float(z @ fisher_block.double() @ z)


def rearrange(gradients: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Same number kept as `keep`, chosen by greedy minimisation of z_Sᵀ (GᵀG) z_S over the pruned set S."""
    count = len(keep)
    num_pruned = int((~keep).sum())
    if num_pruned in (0, count):
        return keep
    fisher = gradients.double().t() @ gradients.double()
    pruned = torch.zeros(count, dtype=torch.bool)
    coupling = torch.zeros(count, dtype=torch.float64)  # Σ_{i∈S} F_ij
    diagonal = fisher.diagonal()
    for _ in range(num_pruned):
        increase = diagonal + 2 * coupling
        increase[pruned] = float("inf")
        j = int(torch.argmin(increase))
        pruned[j] = True
        coupling += fisher[:, j]
    if pruning_loss(fisher, pruned) < pruning_loss(fisher, ~keep):
        return ~pruned
    return keep


# --- 4. least-squares rescaling ----------------------------------------------------------------------


class _StopForward(Exception):
    pass


def _solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> Optional[torch.Tensor]:
    ridge = damping * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), rhs)
    return solution if torch.isfinite(solution).all() else None


def _block_inputs(model: nn.Module, block: nn.Module, tower: str, batches: List[Batch]):
    """(x, {"attn_mask", "rope"}) entering `block` for each calibration batch (the forward stops at the block);
    EVA hands its blocks a rotary position embedding `rope`, other towers none."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0].detach(), {"attn_mask": kwargs.get("attn_mask"), "rope": kwargs.get("rope")}))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    if tower == "image":
                        model.encode_image(batch["image"].to(device))
                    else:
                        text = batch["text"].to(device) if torch.is_tensor(batch["text"]) else batch["text"]
                        model.encode_text(text)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def rescale_block(pruned: CompactBlock, dense: CompactBlock, inputs, damping: float = 1e-4) -> None:
    """Least-squares scales of the kept heads, then of the kept neurons, folded into out_proj / c_proj (the
    columns each head's or neuron's share of out_proj's or c_proj's input meets, after any inner norm)."""
    attn = pruned.attn
    if attn.num_heads > 0:
        out_weight = dense_weight(attn.out_proj).double()
        out_weight = out_weight.view(out_weight.shape[0], attn.num_heads, attn.head_dim)
        bias = output_bias(attn.out_proj)
        gram = torch.zeros(attn.num_heads, attn.num_heads, dtype=torch.float64)
        rhs = torch.zeros(attn.num_heads, dtype=torch.float64)
        for x, kwargs in inputs:
            hidden = pruned.ln_1(x)
            shares = attn.proj_input(attn.head_outputs(hidden, **kwargs)).view(*hidden.shape[:2], attn.num_heads,
                                                                                attn.head_dim)
            contributions = torch.einsum("blkd,wkd->blkw", shares.double(), out_weight)
            target = dense.attn(hidden, **kwargs).double() - bias.double()
            gram += torch.einsum("blkw,bljw->kj", contributions, contributions).cpu()
            rhs += torch.einsum("blkw,blw->k", contributions, target).cpu()
        scales = _solve(gram, rhs, damping)
        if scales is not None:
            scale_inputs(attn.out_proj, scales.repeat_interleave(attn.head_dim).to(out_weight.device))
    mlp = pruned.mlp
    if mlp.hidden > 0:
        proj_weight = dense_weight(mlp.c_proj).double()
        bias = output_bias(mlp.c_proj)
        gram = torch.zeros(mlp.hidden, mlp.hidden, dtype=torch.float64)
        rhs = torch.zeros(mlp.hidden, dtype=torch.float64)
        weight_gram = (proj_weight.t() @ proj_weight).cpu()
        for x, kwargs in inputs:
            after_attention = x + pruned.ls_1(pruned.attn(pruned.ln_1(x), **kwargs))
            hidden = pruned.ln_2(after_attention)
            activations = mlp.units(hidden).double().flatten(0, 1)
            target = (dense.mlp(hidden).double() - bias.double()).flatten(0, 1)
            gram += ((activations.t() @ activations).cpu() * weight_gram)
            rhs += (activations * (target @ proj_weight)).sum(0).cpu()
        scales = _solve(gram, rhs, damping)
        if scales is not None:
            scale_inputs(mlp.c_proj, scales.to(proj_weight.device))


# --- the whole procedure -----------------------------------------------------------------------------


def _tower_of(block_name: str) -> str:
    return "image" if block_name.startswith("visual.") else "text"


def _record_token_counts(model: nn.Module, blocks: Dict[str, CompactBlock], batch: Batch) -> Dict[str, int]:
    """Tokens each block sees (after any token masking), from one calibration forward."""
    counts: Dict[str, int] = {}
    handles = [block.register_forward_pre_hook(
        lambda _m, args, name=name: counts.__setitem__(name, args[0].shape[1])) for name, block in blocks.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            text = batch["text"].to(device) if torch.is_tensor(batch["text"]) else batch["text"]
            model.encode_image(batch["image"][:1].to(device))
            model.encode_text(text[:1])
    finally:
        for handle in handles:
            handle.remove()
    return counts


def fisher_prune(model: nn.Module, batches: List[Batch], mac_constraint: float,
                 towers: Sequence[str] = ("image",), layers: Optional[List[int]] = None,
                 rearrange_masks: bool = True, rescale: bool = True, damping: float = 1e-4,
                 loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> nn.Module:
    """A copy of `model` whose chosen blocks keep heads and neurons worth at most `mac_constraint` of their MACs."""
    if not 0.0 <= mac_constraint <= 1.0:
        raise ValueError(f"--mac-constraint must be in [0, 1]; got {mac_constraint}")
    if not batches:
        raise ValueError("Fisher pruning needs calibration batches (--calib-data)")
    model = clone(model)
    blocks = dict(compact_blocks(model, towers, layers))
    dense_blocks = {name: copy.deepcopy(block) for name, block in blocks.items()}
    tokens = _record_token_counts(model, blocks, batches[0])

    # 1. per-batch gradients of every head and neuron mask
    device = next(model.parameters()).device
    masks: List[torch.Tensor] = []
    for block in blocks.values():
        block.attn.head_mask = torch.ones(block.attn.num_heads, device=device, requires_grad=True)
        block.mlp.neuron_mask = torch.ones(block.mlp.hidden, device=device, requires_grad=True)
        masks += [block.attn.head_mask, block.mlp.neuron_mask]
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        gradients = [g.cpu() for g in per_batch_gradients(model, masks, batches, loss_fn)]
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for block in blocks.values():
            block.attn.head_mask = block.mlp.neuron_mask = None
    head_grads = dict(zip(blocks, gradients[0::2]))
    neuron_grads = dict(zip(blocks, gradients[1::2]))

    # 2. global search under the MAC budget
    head_scores, head_costs, neuron_scores, neuron_costs = [], [], [], []
    for name, block in blocks.items():
        width = block.ln_1.normalized_shape[0]
        head_scores.append((head_grads[name] ** 2).sum(0))
        head_cost = float(head_macs(tokens[name], width, block.attn.head_dim))
        head_costs.append(torch.full((block.attn.num_heads,), head_cost))
        neuron_scores.append((neuron_grads[name] ** 2).sum(0))
        neuron_cost = float(neuron_macs(tokens[name], width, block.mlp.c_gate is not None))
        neuron_costs.append(torch.full((block.mlp.hidden,), neuron_cost))
    full = sum(block_macs(block, tokens[name]) for name, block in blocks.items())
    keep_h, keep_n = search_under_constraint(torch.cat(head_scores), torch.cat(head_costs),
                                             torch.cat(neuron_scores), torch.cat(neuron_costs),
                                             mac_constraint * full)

    # 3. + 4. per layer: rearrange, prune physically
    h_start = n_start = 0
    for name, block in blocks.items():
        h_keep = keep_h[h_start:h_start + block.attn.num_heads]
        n_keep = keep_n[n_start:n_start + block.mlp.hidden]
        h_start += block.attn.num_heads
        n_start += block.mlp.hidden
        if rearrange_masks:
            h_keep = rearrange(head_grads[name], h_keep)
            n_keep = rearrange(neuron_grads[name], n_keep)
        keep_heads(block, torch.nonzero(h_keep).flatten().tolist())
        keep_neurons(block, torch.nonzero(n_keep).flatten().tolist())
        logging.info("%s: %d heads, %d neurons kept", name, block.attn.num_heads, block.mlp.hidden)
    kept = sum(block_macs(block, tokens[name]) for name, block in blocks.items())
    logging.info("head+MLP MACs per sample: %d -> %d (%.3f of dense, constraint %.3f)", full, kept, kept / full,
                 mac_constraint)

    if rescale:
        was_training = model.training
        model.eval()
        for name, block in blocks.items():  # forward order within each tower
            inputs = _block_inputs(model, block, _tower_of(name), batches)
            rescale_block(block, dense_blocks[name].eval(), inputs, damping)
        model.train(was_training)
    return refresh_spec(model)
