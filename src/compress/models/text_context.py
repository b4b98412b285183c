"""Text encoding over the batch's own length instead of the whole context.

A causal text tower (OpenAI CLIP's, open_clip's `CLIP`) pools one token per caption, its end-of-text token, and
under the causal mask no position sees the positions after it. So the columns after the batch's last pooled
token change nothing the features depend on: not the features, not the loss, and their gradients are exactly
zero either way. Running the tower only up to that column gives the same features (up to float rounding of the
smaller matrix products) for a fraction of the work when captions are short: CC3M captions end near token 20 of
77. open_clip's `CLIP.encode_text` always adds the whole positional table and mask, so it cannot be handed
shorter rows; `trim_text_context` gives one model an `encode_text` that can (the same steps, sliced), and
leaves every other model as it is.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def text_context_unchanged_reason(model: nn.Module) -> Optional[str]:
    """Why trimming would change `model`'s text features (or could not be applied); None when it is exact."""
    import open_clip

    if type(model) is not open_clip.CLIP:
        return f"{type(model).__name__} is not open_clip's CLIP with its own text transformer"
    if getattr(model, "attn_mask", None) is None:
        return "its text tower has no causal mask: every token sees the padding"
    if model.text_pool_type not in ("argmax", "eos"):
        return f"it pools text by {model.text_pool_type!r}, not by the end-of-text token"
    if model.text_pool_type == "eos" and getattr(model, "text_eos_id", None) is None:
        return "it pools by 'eos' without an end-of-text id"
    if not getattr(model.transformer, "batch_first", True):
        return "its text transformer is not batch-first"
    return None


def pooled_positions(text: torch.Tensor, pool_type: str, eos_token_id: Optional[int]) -> torch.Tensor:
    """The column each row is pooled from (open_clip's `text_global_pool`: the first maximum for 'argmax', the
    first end-of-text id for 'eos'); the same column in any prefix that contains it."""
    if pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == eos_token_id).int().argmax(dim=-1)


def _encode_text_to_last_pooled(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` (open_clip_torch 3.x), run on the columns up to the batch's last pooled
    token: the positional table and the causal mask are sliced to that length."""
    from open_clip.transformer import text_global_pool

    eos = getattr(self, "text_eos_id", None)
    length = int(pooled_positions(text, self.text_pool_type, eos).max()) + 1
    text = text[:, :length]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:length].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=eos)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_context(model: nn.Module) -> nn.Module:
    """`model`, whose `encode_text` (and so its forward) now runs the text tower only up to each batch's last
    pooled token, where that is exact (`text_context_unchanged_reason` is None); otherwise `model` unchanged.
    The weights, state dict and checkpoint format do not change. Not for export: the length depends on the data."""
    if text_context_unchanged_reason(model) is None:
        model.encode_text = types.MethodType(_encode_text_to_last_pooled, model)
    return model


def full_text_context(model: nn.Module) -> nn.Module:
    """Undo `trim_text_context`: `model.encode_text` is its class's again."""
    model.__dict__.pop("encode_text", None)
    return model
