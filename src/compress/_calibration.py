"""Calibration data and gradients shared by the post-training tools (FWSVD, head sensitivity, Fisher pruning).

Calibration batches are a few image–caption batches from a TSV/CSV (the training format: `filepath`, `title`)
or from an eval data root's COCO captions, preprocessed exactly as at eval time for the model's spec. The loss whose gradients measure importance is
CLIP's symmetric contrastive loss on the batch (single process, no gather).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

Batch = Dict[str, Any]


class _CaptionedImages:
    """(image path, caption) pairs as the training data's samples: index, image, text, caption."""

    def __init__(self, pairs, transform: Callable):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Batch:
        from PIL import Image

        path, caption = self.pairs[index]
        with Image.open(path) as image:
            pixels = self.transform(image.convert("RGB"))
        return {"index": index, "image": pixels, "caption": caption, "skipped_reasons": []}


def _coco_root(path: Path) -> Optional[Path]:
    """The coco2017 folder of an eval data root (or the folder itself), when it has val2017 captions."""
    for candidate in (path, path / "coco2017"):
        if (candidate / "annotations" / "captions_val2017.json").is_file():
            return candidate
    return None


def calibration_batches(source: str, spec: Dict[str, Any], num_batches: int, batch_size: int, seed: int = 0,
                        sep: str = "\t", img_key: str = "filepath", caption_key: str = "title") -> List[Batch]:
    """`num_batches` batches of a seeded random subset of `source`, held in memory.

    source: a TSV/CSV in the training format, or an eval data root (or its coco2017 folder), whose val2017
    images are paired with their first caption (one caption per image: a contrastive batch must not hold
    the same image twice).
    """
    from torch.utils.data import DataLoader, Subset

    from compress.registry import get_preprocess, get_tokenizer
    from training.data import BatchCollator, CsvDataset
    from training.errors import UserError

    transform, tokenizer = get_preprocess(spec), get_tokenizer(spec)
    path = Path(source)
    if path.is_dir():
        coco = _coco_root(path)
        if coco is None:
            raise UserError(f"--calib-data {source}: a folder must be an eval data root with "
                            "coco2017/annotations/captions_val2017.json (or pass a TSV)")
        from eval.data import load_coco_captions

        retrieval = load_coco_captions(coco)
        first_caption = {}
        for caption, image_index in zip(retrieval.captions, retrieval.text_to_image):
            first_caption.setdefault(image_index, caption)
        pairs = [(retrieval.image_paths[i], first_caption[i]) for i in sorted(first_caption)]
        dataset = _CaptionedImages(pairs, transform)
    else:
        dataset = CsvDataset(source, transform, img_key=img_key, caption_key=caption_key, sep=sep)
    count = min(len(dataset), num_batches * batch_size)
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False, collate_fn=BatchCollator(tokenizer))
    return [{"image": b["image"], "text": b["text"]} for b in loader]


def contrastive_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on one batch (the loss the model was trained with)."""
    device = next(model.parameters()).device
    image = F.normalize(model.encode_image(batch["image"].to(device)), dim=-1)
    text_input = batch["text"].to(device) if torch.is_tensor(batch["text"]) else batch["text"]
    text = F.normalize(model.encode_text(text_input), dim=-1)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else torch.tensor(100.0, device=device)
    logits = scale * image @ text.t()
    labels = torch.arange(len(logits), device=device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def squared_gradients(model: nn.Module, tensors: List[torch.Tensor], batches: Iterable[Batch],
                      loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> List[torch.Tensor]:
    """Σ over batches of (∂loss/∂t)² for each tensor t (empirical Fisher diagonal, batch-level gradients).

    The tensors must require grad; the model's own parameters keep whatever requires_grad they had.
    """
    totals = [torch.zeros_like(t) for t in tensors]
    was_training = model.training
    model.eval()  # dropout and token masking as at inference
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), tensors, allow_unused=True)
        for total, grad in zip(totals, grads):
            if grad is not None:
                total += grad.detach() ** 2
    model.train(was_training)
    return totals


def per_batch_gradients(model: nn.Module, tensors: List[torch.Tensor], batches: Iterable[Batch],
                        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = contrastive_loss) -> List[torch.Tensor]:
    """Gradients of each batch's loss, stacked: one (num_batches, *t.shape) tensor per t (for Fisher blocks)."""
    stacks: List[List[torch.Tensor]] = [[] for _ in tensors]
    was_training = model.training
    model.eval()
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), tensors, allow_unused=True)
        for stack, grad, tensor in zip(stacks, grads, tensors):
            stack.append(torch.zeros_like(tensor) if grad is None else grad.detach())
    model.train(was_training)
    return [torch.stack(stack) for stack in stacks]
