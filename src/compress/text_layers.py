"""Text-encoder layer dropping: keep a subset of the text transformer's blocks (no retraining).

The E6998 term project measured zero-shot accuracy and text latency against the number of text layers kept.
The spec records the *original* indices of the kept layers, so dropping twice composes correctly.

    python -m compress.text_layers --pretrained CKPT --out RUN_DIR --keep-first 6
    python -m compress.text_layers --pretrained CKPT --out RUN_DIR --drop 3,5
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import nn

from compress.compact_clip import clone, refresh_spec, tower_blocks


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


def drop_text_layers(model: nn.Module, drop: Optional[Sequence[int]] = None,
                     keep_first: Optional[int] = None) -> nn.Module:
    """A copy of `model` without text blocks `drop` (indices), or keeping only the first `keep_first`."""
    if (drop is None) == (keep_first is None):
        raise ValueError("give exactly one of --drop or --keep-first")
    model = clone(model)
    count = len(tower_blocks(model, "text"))
    if keep_first is not None:
        if not 1 <= keep_first <= count:
            raise ValueError(f"--keep-first must be in [1, {count}]")
        kept: List[int] = list(range(keep_first))
    else:
        bad = [i for i in drop if not 0 <= i < count]
        if bad:
            raise ValueError(f"--drop {bad} out of range: the text tower has {count} layers")
        kept = [i for i in range(count) if i not in set(drop)]
    return keep_text_layers(model, kept)


def main(argv=None) -> None:
    from compress._cli import base_parser, run_tool

    parser = base_parser("drop text-encoder layers", calibration=False)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--drop", default=None, help="comma list of text block indices to remove")
    group.add_argument("--keep-first", type=int, default=None, help="keep only the first N text blocks")

    def transform(model, args, _):
        drop = [int(i) for i in args.drop.split(",")] if args.drop else None
        return drop_text_layers(model, drop=drop, keep_first=args.keep_first)

    run_tool(parser, argv, transform, tool="text_layers")


if __name__ == "__main__":
    main()
