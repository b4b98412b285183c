"""The CSV/TSV token cache: every caption tokenized once, by all ranks together, into an int32 memmap the
loader workers read by row (training.row_cache builds and stores it). Its key is the tokenizer's identity
and the table, not how rows are read or sampled."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List

import torch

from training.data.csv_dataset import CsvDataset
from training.data.samples import BadSample, check_caption


def tokenizer_identity(tokenizer: Callable) -> Dict[str, Any]:
    """What determines a tokenizer's output, for the cache key: its class, context length, and a hash of
    what it makes of probe texts that exercise case, accents, HTML entities, digits, emoji and
    truncation (a different vocabulary or cleaning changes the hash)."""
    probe = ["A photo of a Cat.", "Ünïcödé &amp; <b>tags</b> 1234 'quotes' — 😀", "many words " * 60]
    tokens = tokenizer(probe)
    return {"tokenizer": type(tokenizer).__name__, "context_length": int(tokens.shape[1]),
            "probe_sha1": hashlib.sha1(tokens.numpy().tobytes()).hexdigest()}


def attach_token_cache(dataset: "CsvDataset", tokenizer: Callable, data_path: str, cache_dir: str,
                       device: torch.device, local_rank: int, show_progress: bool) -> None:
    """Tokenize every caption once (ranks share the work) into an int32 memmap the workers read by row.

    A frozen tokenizer gives the same ids every epoch; tokenizing in the workers every time cost a
    fifth of the loader's throughput (open_clip's tokenizer runs ftfy and BPE in Python)."""
    from training.row_cache import cache_key, load_or_build_row_cache

    identity = tokenizer_identity(tokenizer)

    def tokenize_valid(captions: List[str]) -> torch.Tensor:
        # rows whose caption is bad are skipped by load_row before their tokens are read
        return tokenizer([c if _is_valid_caption(c) else "" for c in captions])

    # the reader is part of the key: before table_records, a TSV whose first row had an extra field was
    # read with every column shifted, and a cache built from that must not be served for the right rows
    key = cache_key({**identity, "reader": "table_records"}, data_path, len(dataset))
    tokens = load_or_build_row_cache(tokenize_valid, dataset.captions, identity["context_length"], cache_dir, key,
                                     batch_size=1024, device=device, show_progress=show_progress,
                                     local_rank=local_rank, kind="tokens", dtype=torch.int32)
    dataset.use_token_cache(tokens.filename)


def _is_valid_caption(caption: Any) -> bool:
    try:
        check_caption(caption, lambda: "caption", allow_empty=True)
        return True
    except BadSample:
        return False
