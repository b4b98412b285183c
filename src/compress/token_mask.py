"""FLIP-style token masking at inference: the image tower sees only a fraction 1 − p of its patch tokens.

open_clip adds the positional embedding to every token *before* its `patch_dropout` hook, so dropping tokens
there keeps each kept patch with its own positional embedding, and the class token (never dropped) with its
own — the off-by-one of casCLIP's implementation cannot happen. Unlike open_clip's PatchDropout (training
only, unseeded), `TokenMask` acts in eval mode and draws its choice from its own seeded generator on every
forward, so a given batch always keeps the same tokens. p = 0 is the identity.

    python -m compress.token_mask --model clipc-vit-t2-64 --pretrained CKPT --out RUN_DIR --drop 0.5
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from compress.compact_clip import clone, refresh_spec


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


def mask_tokens(model: nn.Module, drop: float, seed: int = 0) -> nn.Module:
    """A copy of `model` whose image tower keeps a fraction 1 − drop of the patch tokens at inference."""
    model = clone(model)
    model.visual.patch_dropout = TokenMask(drop, seed)
    return refresh_spec(model)


def main(argv=None) -> None:
    from compress._cli import base_parser, run_tool

    parser = base_parser("FLIP token masking at inference (no retraining)", calibration=False)
    parser.add_argument("--drop", type=float, required=True, help="fraction p of patch tokens dropped (0 ≤ p < 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token choice")
    run_tool(parser, argv, lambda model, args, calib: mask_tokens(model, args.drop, args.seed),
             tool="token_mask")


if __name__ == "__main__":
    main()
