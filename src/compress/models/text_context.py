"""Text encoding over the batch's own length instead of the whole context.

A causal text tower (OpenAI CLIP's, open_clip's `CLIP`) pools one token per caption, its end-of-text token, and
under the causal mask no position sees the positions after it. So the columns after the batch's last pooled
token change nothing the features depend on: not the features, not the loss, and their gradients are exactly
zero either way. The same holds for open_clip's TextTransformer (a CustomTextCLIP's tower, as EVA's) when
it has a causal mask, no class token and no padding mask.

Running the tower only up to that column gives the same features (up to float rounding of the smaller matrix
products) for a fraction of the work when captions are short: CC3M captions end near token 20 of 77. open_clip's
text towers always use the whole causal mask (CLIP's also the whole positional table), so they cannot be handed
shorter rows; `trim_text_context` gives one model a text tower that can (the same steps, sliced), and leaves
every other model as it is.
"""
from __future__ import annotations

import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _text_tower(model: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """(the module holding the causal text tower's parts, "") or (None, why there is none to trim)."""
    import open_clip
    from open_clip.transformer import TextTransformer

    if type(model) is open_clip.CLIP:  # OpenAI-style: the tower's parts are the CLIP's own attributes
        return model, ""
    text = getattr(model, "text", None)
    if type(model) is not open_clip.CustomTextCLIP or type(text) is not TextTransformer:
        return None, f"{type(model).__name__} has no open_clip text transformer of its own (CLIP, CustomTextCLIP)"
    if text.cls_emb is not None:
        return None, "its text tower appends a class token and pools it"
    if text.use_pad_mask or text.output_tokens:
        return None, "its text tower masks padding or returns every token"
    return text, ""


def _pool(tower: nn.Module) -> Tuple[str, Optional[int]]:
    """(pool type, end-of-text id) under CLIP's names (text_pool_type, text_eos_id) or TextTransformer's."""
    if hasattr(tower, "text_pool_type"):
        return tower.text_pool_type, getattr(tower, "text_eos_id", None)
    return tower.pool_type, getattr(tower, "eos_id", None)


def text_context_unchanged_reason(model: nn.Module) -> Optional[str]:
    """Why trimming would change `model`'s text features (or could not be applied); None when it is exact."""
    tower, reason = _text_tower(model)
    if tower is None:
        return reason
    pool_type, eos = _pool(tower)
    if getattr(tower, "attn_mask", None) is None:
        return "its text tower has no causal mask: every token sees the padding"
    if pool_type not in ("argmax", "eos"):
        return f"it pools text by {pool_type!r}, not by the end-of-text token"
    if pool_type == "eos" and eos is None:
        return "it pools by 'eos' without an end-of-text id"
    if not getattr(tower.transformer, "batch_first", True):
        return "its text transformer is not batch-first"
    return None


def pooled_positions(text: torch.Tensor, pool_type: str, eos_token_id: Optional[int]) -> torch.Tensor:
    """The column each row is pooled from (open_clip's `text_global_pool`: the first maximum for 'argmax', the
    first end-of-text id for 'eos'); the same column in any prefix that contains it."""
    if pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == eos_token_id).int().argmax(dim=-1)


def _pooled_to_last_pooled(tower: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """The pooled, projected text features of open_clip's text transformer (`CLIP.encode_text` before its
    normalisation, `TextTransformer.forward` without a class token or padding mask; open_clip_torch 3.x), run on
    the columns up to the batch's last pooled token: the positional table and the causal mask are sliced to
    that length."""
    from open_clip.transformer import text_global_pool

    pool_type, eos = _pool(tower)
    length = int(pooled_positions(text, pool_type, eos).max()) + 1
    text = text[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, text, pool_type, eos_token_id=eos)
    if tower.text_projection is not None:
        x = tower.text_projection(x) if isinstance(tower.text_projection, nn.Linear) else x @ tower.text_projection
    return x


def _clip_encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    x = _pooled_to_last_pooled(self, text)
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_context(model: nn.Module) -> nn.Module:
    """`model`, whose text tower (and so `encode_text` and its forward) now runs only up to each batch's last
    pooled token, where that is exact (`text_context_unchanged_reason` is None); otherwise `model` unchanged:
    `CLIP.encode_text`, or a CustomTextCLIP's `TextTransformer.forward`, is replaced on this instance. The
    weights, state dict and checkpoint format do not change. Not for export: the length depends on the data."""
    if text_context_unchanged_reason(model) is None:
        tower, _ = _text_tower(model)
        if tower is model:
            model.encode_text = types.MethodType(_clip_encode_text, model)
        else:
            tower.forward = types.MethodType(_pooled_to_last_pooled, tower)
    return model

