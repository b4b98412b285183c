"""Accelerator settings of a run: precision, TF32, and which faiss the process loaded.

Kept out of the step loop so that the trainer, the in-loop eval and the jobs' feature passes agree on one
mapping from `--precision` to what runs (docs/performance.md).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of `--precision` on `device`, None when the run does not autocast. `amp` is fp16 on
    CUDA (with a grad scaler) and bf16 elsewhere: CPU autocast has no fp16 kernels for most ops."""
    if precision == "amp":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if precision == "amp_bf16":
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device):
    """A context running its block under the run's autocast (nothing for fp32 and pure bf16)."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def configure_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 matmuls and cuDNN convolutions on CUDA (Ampere and newer: ~10 mantissa bits for fp32 GEMMs, several
    times their fp32 speed; what open_clip_train and timm enable). PyTorch leaves matmul TF32 off by default.
    `--no-tf32` keeps full fp32, e.g. to compare against a reference bit for bit."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cudnn.benchmark = True  # fixed image size: pick the fastest conv algorithm once
    logging.info("TF32 matmul and cuDNN: %s", "on" if enabled else "off (--no-tf32)")


PURE_BF16_WARNING = (
    "--precision bf16 trains the bf16 weights themselves, without fp32 master weights: an AdamW update smaller "
    "than ~1/256 of a weight rounds away, so small learning rates (late in a cosine schedule) stop training. "
    "--precision amp_bf16 (bf16 autocast, fp32 weights and optimizer) runs as fast on GPUs and is what the "
    "docs recommend")


def warn_about_precision(precision: str) -> None:
    if precision == "bf16":
        logging.warning("%s", PURE_BF16_WARNING)


def faiss_summary() -> str:
    """Which faiss this process loads and how many GPUs it sees: the faiss-cpu and faiss-gpu wheels both
    install the `faiss` package, so the one that ends up imported is worth a line in every run's log."""
    try:
        import faiss
    except ImportError as error:
        return f"faiss: not importable ({error}); ProtoRKD clustering and cascade search need it"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    build = "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU build"
    line = f"faiss {getattr(faiss, '__version__', '?')} ({build}) from {faiss.__file__}, sees {gpus} GPU(s)"
    installed = faiss_distributions()
    if len(installed) > 1:
        line += (f"; WARNING: {' and '.join(installed)} are all installed and share this package: keep one "
                 "(pip uninstall both, then install one: docs/install.md)")
    return line


def faiss_distributions() -> list:
    """The installed distributions that provide the `faiss` package (faiss-cpu, faiss-gpu, faiss-gpu-cu12...)."""
    from importlib import metadata

    names = {dist.metadata["Name"] for dist in metadata.distributions()
             if (dist.metadata["Name"] or "").lower().startswith("faiss")}
    return sorted(names)


def log_accelerator_setup(args, device: torch.device) -> None:
    """The start-of-run lines about precision, TF32 and faiss (training.main, after logging is set up)."""
    configure_tf32(not getattr(args, "no_tf32", False), device)
    warn_about_precision(args.precision)
    logging.info("%s", faiss_summary())
