"""Size and cost of any image–text model: parameters, MACs and measured latency per tower.

One helper for every model the project makes (dense, pruned, low-rank, students): it needs only
`encode_image(images)` and `encode_text(text_input)`.

- Parameters per tower are the parameters each forward actually *uses*, recorded with a TorchFunctionMode
  (every parameter reaches some torch function as an argument). That works without knowing the model's
  attribute layout: CLIP's text tower keeps `positional_embedding` and `text_projection` on the model
  itself, a student may hang a sentence-transformer on it. Parameters shared by both towers count in both;
  `params` counts every parameter of the model once (logit_scale included).
- MACs per sample = FLOPs / 2 from `torch.utils.flop_counter.FlopCounterMode` at batch 1 (matmuls, convs,
  attention; elementwise ops are not counted, as usual). Two blind spots of FlopCounterMode are covered, so
  dense and compressed models compare fairly: on CPU the fused attention kernel has no formula (one is
  registered, `make_flop_counter`), and in eval mode nn.MultiheadAttention takes a fused native fast path
  the counter does not see — which the parameter recorder, a TorchFunctionMode active during the same
  forward, switches off (the fast path is skipped whenever a torch function mode is active).
- Latency: `time_interleaved`, the one timer of the project (the monitor's profile and every benchmark): several
  callables (dense vs pruned, torch vs onnxruntime, image vs text tower) timed in interleaved rounds
  (A B A B …) after warm-up, so load from other processes hits them alike; wall and process CPU time of each
  call (CUDA-synchronised on GPU), medians in milliseconds. `profile_model` reports the median wall time per
  batch of `batch_size`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

PROFILE_CAPTION = "a photo of a small red circle on a plain background."


class _ParameterUseRecorder(TorchFunctionMode):
    """Records the ids of nn.Parameters passed to any torch function while active."""

    def __init__(self) -> None:
        super().__init__()
        self.used_ids: Set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, nn.Parameter):
                self.used_ids.add(id(value))
        return func(*args, **kwargs)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _linear_dynamic_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]


def make_flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts attention on CPU: the fused CPU attention kernel has no formula
    in torch's table, so QKᵀ and AV would silently be left out of every ViT's MACs."""
    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    # an int8 Linear's GEMM (compress.models.quantized) does the MACs of the float one it replaced
    custom[aten._int_mm] = _int_mm_flops
    custom[torch.ops.quantized.linear_dynamic] = _linear_dynamic_flops  # the same on CPU's quantized engine
    return FlopCounterMode(display=False, custom_mapping=custom)


def _measure(forward: Callable[[], Any], model: nn.Module) -> Dict[str, int]:
    """(parameters used, MACs) of one forward."""
    recorder = _ParameterUseRecorder()
    flop_counter = make_flop_counter()
    # parameters stop requiring grad while counted: the counter's module tracker hooks the gradient of every
    # module input that requires it, and a view of a parameter taken under no_grad (timm's attention-pool
    # latent, expanded to the batch) requires grad without having a gradient function, which it refuses
    requiring = [p for p in _unique_parameters(model) if p.requires_grad]
    # the recorder must be active around the counted forward: it is what keeps nn.MultiheadAttention off
    # its uncounted fast path (module docstring)
    try:
        for param in requiring:
            param.requires_grad_(False)
        with torch.no_grad(), flop_counter, recorder:
            forward()
    finally:
        for param in requiring:
            param.requires_grad_(True)
    used = sum(p.numel() for p in _unique_parameters(model) if id(p) in recorder.used_ids)
    return {"params": used, "macs": flop_counter.get_total_flops() // 2}


def tower_costs(model: nn.Module, images: torch.Tensor, text_input: Any) -> Dict[str, int]:
    """`params` (every parameter once), and per tower the parameters used and MACs of one sample:
    `params_image`, `params_text`, `macs_image`, `macs_text` (the first sample of `images`, `text_input`)."""
    image_cost = _measure(lambda: model.encode_image(images[:1]), model)
    text_cost = _measure(lambda: model.encode_text(text_input[:1]), model)
    return {"params": sum(p.numel() for p in _unique_parameters(model)),
            "params_image": image_cost["params"], "params_text": text_cost["params"],
            "macs_image": image_cost["macs"], "macs_text": text_cost["macs"]}


Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Latency:
    """One callable's times over the repeats of `time_interleaved`, in milliseconds, in the order measured."""

    wall_ms: Tuple[float, ...]  # time.perf_counter
    cpu_ms: Tuple[float, ...]  # time.process_time: CPU time of every thread of this process, not of others

    @property
    def median_wall_ms(self) -> float:
        """Median wall-clock time of one call."""
        return statistics.median(self.wall_ms)

    @property
    def median_cpu_ms(self) -> float:
        """Steadier than the wall time on a shared machine: other processes' load does not count."""
        return statistics.median(self.cpu_ms)


def time_interleaved(calls: Mapping[Key, Callable[[], Any]], repeats: int, warmup: int = 1,
                     device: torch.device | str | None = None) -> Dict[Key, Latency]:
    """Times each of `calls` `repeats` times, interleaved: `warmup` untimed rounds, then `repeats` rounds that
    each call every callable once, in the mapping's order (A B A B …), so machine load and clock changes hit
    all of them alike. Under no_grad; with a CUDA `device` each clock reading follows a synchronise, so a
    call's time covers its kernels. What a call returns is dropped at once (no result is held across calls)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cuda = device is not None and torch.device(device).type == "cuda"

    def synchronise() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    wall: Dict[Key, List[float]] = {key: [] for key in calls}
    cpu: Dict[Key, List[float]] = {key: [] for key in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for call in calls.values():
                call()
        synchronise()
        for _ in range(repeats):
            for key, call in calls.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                call()
                synchronise()
                end_wall, end_cpu = time.perf_counter(), time.process_time()
                wall[key].append((end_wall - start_wall) * 1000.0)
                cpu[key].append((end_cpu - start_cpu) * 1000.0)
    return {key: Latency(tuple(wall[key]), tuple(cpu[key])) for key in calls}


def _unique_parameters(model: nn.Module) -> List[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def default_text_input(
    model: nn.Module, batch_size: int, context_length: Optional[int] = None
) -> torch.Tensor | List[str]:
    """A batch of captions as the model's `encode_text` takes them, from its `model_spec` when it has one."""
    spec = getattr(model, "model_spec", None)
    if spec is not None:
        from compress.models.registry import get_tokenizer

        tokens = get_tokenizer(spec)([PROFILE_CAPTION] * batch_size)
        if not torch.is_tensor(tokens) or context_length is None:
            return tokens
    if context_length is None:
        context_length = getattr(model, "context_length", None)
    if context_length is None:
        raise ValueError("cannot tell what encode_text takes: pass text_input= or context_length=")
    # Random token ids of the full context: the cost of a text transformer does not depend on the ids.
    return torch.randint(1, 1000, (batch_size, context_length))


def profile_model(
    model: nn.Module,
    image_size: int | Sequence[int],
    context_length: Optional[int] = None,
    text_input: Any = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 2,
) -> Dict[str, float]:
    """`params`, `params_image`, `params_text`, `macs_image`, `macs_text` (per sample), `latency_image_ms`,
    `latency_text_ms` (per batch of `batch_size`), and `latency_batch_size`.

    text_input: a batch (>= batch_size) as `encode_text` takes it (token tensor, or list of strings for a
    sentence-transformer text side); default from the model's `model_spec` tokenizer, else random tokens of
    `context_length`.
    """
    device = torch.device(device)
    was_training = model.training  # restored after; the model is left on `device`
    model.eval().to(device)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    images = torch.randn(batch_size, 3, height, width, device=device)
    if text_input is None:
        text_input = default_text_input(model, batch_size, context_length)
    if torch.is_tensor(text_input):
        text_input = text_input.to(device)
    if len(text_input) < batch_size:
        raise ValueError(f"text_input holds {len(text_input)} captions; need batch_size={batch_size}")

    try:
        costs = tower_costs(model, images, text_input)
        latency = time_interleaved({"image": lambda: model.encode_image(images),
                                    "text": lambda: model.encode_text(text_input[:batch_size])},
                                   repeats, warmup, device)
    finally:
        model.train(was_training)
    return {
        **costs,
        "latency_image_ms": latency["image"].median_wall_ms,
        "latency_text_ms": latency["text"].median_wall_ms,
        "latency_batch_size": batch_size,
    }


def profile_encoder(encoder, batch_size: int = 32, repeats: int = 5, warmup: int = 2) -> Dict[str, float]:
    """`profile_model` for an `eval.Encoder`: image size from its transform, captions through its tokenizer."""
    return profile_model(
        encoder.model,
        image_size=encoder.image_size,
        text_input=encoder.text_input([PROFILE_CAPTION] * batch_size),
        batch_size=batch_size,
        device=encoder.device,
        repeats=repeats,
        warmup=warmup,
    )


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: every parameter and buffer once, at its own dtype (int8
    weights count one byte each). What a checkpoint holds besides (optimizer state) is not the model's."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def params_and_macs(model: nn.Module) -> Dict[str, int]:
    """`params`, `macs_image` and `macs_text` (per sample) of a CLIP-like model at its own image size and
    context length, without timing anything (`tower_costs` on one blank image and caption)."""
    param = next(model.parameters())
    image_size = model.visual.image_size
    image_size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    images = torch.zeros(1, 3, *image_size, device=param.device, dtype=param.dtype)
    context_length = getattr(model, "context_length", None) or model.text.context_length
    tokens = torch.ones(1, context_length, dtype=torch.long, device=param.device)
    was_training = model.training
    model.eval()
    try:
        costs = tower_costs(model, images, tokens)
    finally:
        model.train(was_training)
    return {key: costs[key] for key in ("params", "macs_image", "macs_text")}
