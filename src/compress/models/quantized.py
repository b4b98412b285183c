"""The `quantized` model kind: any other kind whose chosen Linears hold int8 weights.

A quantized checkpoint wraps the spec of the model it was made from, and names the Linears it replaced:

    {"kind": "quantized",
     "base": {...the spec of the float model: open_clip, compact_clip, student_clip, image_student, ...},
     "scheme": "int8_dynamic" | "int8_weight_only",
     "linears": ["visual.transformer.resblocks.0.attn.q_proj", ...],     # module paths in the base model
     "reparameterized": true}              # optional: the base model's image tower in its fused inference form

Each listed Linear becomes an `Int8Linear` whose state-dict entries are plain tensors (so the checkpoint
stays `weights_only`-loadable): `weight_int8` (out×in, int8), `weight_scale` (out, float32: one symmetric
scale per output channel, w ≈ weight_int8 · weight_scale) and `bias` (float). `compress.load` builds the
base model, fuses a re-parameterised image tower (MobileCLIP's FastViT/MCi: compress.models.reparameterize) when
the spec says `reparameterized`, puts Int8Linear shells at the listed paths and fills them; everything else
(norms, embeddings, projections that are bare Parameters, a student's frozen text encoder) stays in float.

Schemes (what the forward computes; the stored weights are the same):
- `int8_dynamic`: activations are quantised at run time and multiplied with the int8 weights in an int8 GEMM.
  On CPU that is the quantized engine's (fbgemm / x86, qnnpack on ARM) `quantized::linear_dynamic` on weights
  it has prepacked, exactly what torch.ao's dynamic quantisation runs (activations per tensor, asymmetric
  uint8 with torch.ao's reduced range): one fused call, where quantising per token by hand and `torch._int_mm`
  took more CPU time than torch.ao's reference on the same model. The packed weights are built from
  `weight_int8` and `weight_scale` on the first CPU call (and again whenever those change: a loaded state dict,
  a move between devices) and are never stored. On CUDA the activations are quantised per token (symmetric,
  absmax/127) and multiplied by `torch._int_mm` (cuBLASLt, int32 accumulation), which needs more than 16 rows
  and both widths multiples of 8; a Linear outside those shapes falls back to the weight-only formula, as
  does a CPU build without a quantized engine. A graph being captured (torch.export, torch.compile) takes the
  per-token `_int_mm` formula on CPU too: packed weights are an opaque engine object a trace cannot hold.
- `int8_weight_only`: the weights are dequantised into the activations' dtype and applied by a float GEMM:
  a 4× smaller file and weight memory at float accuracy of the activations, no faster compute.

Exporting (torch.onnx) always uses the weight-only formula: the graph holds the int8 weights and their
scales, and onnxruntime folds the dequantisation into a float constant when it loads the graph.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.registry import MODEL_KINDS, WRAPPER_KINDS, register_model_kind
from compress.models.reparameterize import reparameterized

KIND = "quantized"
SCHEMES = ("int8_dynamic", "int8_weight_only")
INT8_MAX = 127  # symmetric range [-127, 127]: -128 is never used, so negation stays exact
# a quantized engine (fbgemm / x86 / qnnpack) runs int8_dynamic on CPU; without one the weight-only formula does
_CPU_ENGINE = torch.backends.quantized.engine != "none"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-output-channel float32 scale) with weight ≈ q · scale[:, None] (symmetric, absmax)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    quantized = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale


class Int8Linear(nn.Module):
    """A Linear with int8 weights and one float scale per output channel (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scheme: str = "int8_dynamic"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {list(SCHEMES)}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        # an int8 Parameter without gradient (not a buffer): parameter counts and the profiler's
        # parameter-use recorder see the weights, and `.to(dtype)` leaves integer tensors alone
        self.weight_int8 = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme)
        quantized, scale = quantize_weight(linear.weight)
        with torch.no_grad():
            layer.weight_int8.copy_(quantized)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_int8.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def _int_mm_fits(self, rows: int, device: torch.device) -> bool:
        if device.type == "cpu":
            return _CPU_ENGINE
        # cuBLASLt's int8 GEMM shape rules (torch._int_mm refuses anything else on CUDA)
        return device.type == "cuda" and rows > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def __getstate__(self):
        # the engine's packed weights are no picklable tensor: copies and pickles rebuild them on first use
        return {key: value for key, value in self.__dict__.items() if key != "_packed"}

    def packed_params(self):
        """The engine's prepacked weights (per-output-channel int8 + bias), built from the stored tensors and
        rebuilt when they change (in-place loads bump their version; moves give them new storage)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_int8, self.weight_scale, self.bias)
                    if t is not None)
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            weight = torch._make_per_channel_quantized_tensor(
                self.weight_int8.detach(), self.weight_scale.detach().double(),
                torch.zeros(self.out_features, dtype=torch.long), 0)
            bias = None if self.bias is None else self.bias.detach().float()
            cached = (key, torch.ops.quantized.linear_prepack(weight, bias))
            self.__dict__["_packed"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and x.device.type == "cpu" and self.scheme == "int8_dynamic" and _CPU_ENGINE
                and x.numel() and self.out_features and self.in_features
                and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()):
            # the engine's kernel on the activations as they come, as torch.ao's dynamic Linear calls it (any
            # leading dimensions; reduce_range as below): the general path's reshapes and checks cost ~4 % of a
            # ViT-B-32 forward
            return torch.ops.quantized.linear_dynamic(x, self.packed_params(), True)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        flat = x.reshape(-1, self.in_features)
        dynamic = (self.scheme == "int8_dynamic" and not torch.onnx.is_in_onnx_export() and flat.shape[0] > 0
                   and self.out_features > 0 and self.in_features > 0 and self._int_mm_fits(flat.shape[0], x.device))
        if not dynamic:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # torch.ao's dynamic Linear passes reduce_range=True for qint8 weights: 7-bit activations keep
            # fbgemm's u8·s8 pair sums from saturating int16 on CPUs without VNNI
            out = torch.ops.quantized.linear_dynamic(flat.float().contiguous(), self.packed_params(), True)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return self.per_token_forward(flat).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def per_token_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """The CUDA formula on (rows, in_features) activations: per-token symmetric int8 activations times
        the int8 weights by `torch._int_mm`, rescaled, plus the bias (float32)."""
        activations = flat.float()
        row_scale = (activations.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        quantized = torch.round(activations / row_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        accumulated = torch._int_mm(quantized, self.weight_int8.t())
        out = accumulated.to(torch.float32).mul_(row_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantizable_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """Module path → Linear of every plain nn.Linear that a forward calls as a module.

    nn.MultiheadAttention's `out_proj` is a Linear subclass whose weight the attention reads directly: it is
    left out (a CompactBlock's separate q/k/v/out Linears are what can be quantised), and so is a Linear
    `text_projection` (SigLIP's), which open_clip applies only when it is an nn.Linear."""
    found = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.weight.numel() > 0 and name.rsplit(".", 1)[-1] != "text_projection":
            found[name] = module
    return found


def replace_linears(model: nn.Module, paths: Iterable[str], scheme: str, convert: bool) -> nn.Module:
    """In place: the Linears at `paths` become Int8Linears (quantised from the Linear when `convert`, else
    empty shells that a state dict fills next)."""
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child, None)
        if type(linear) is not nn.Linear:
            raise ValueError(f"quantized spec names {path!r}, which is no nn.Linear of the base model")
        layer = (Int8Linear.from_linear(linear, scheme) if convert
                 else Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, scheme))
        setattr(parent, child, layer)
    return model


def quantized_spec(base_spec: Dict[str, Any], scheme: str, linears: List[str],
                   reparameterized: bool = False) -> Dict[str, Any]:
    """`reparameterized`: the Linears were quantised in the base model's fused inference form."""
    spec = {"kind": KIND, "base": base_spec, "scheme": scheme, "linears": list(linears)}
    if reparameterized:
        spec["reparameterized"] = True
    return spec


def base_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The float model's spec inside a quantized spec (the spec itself for any other kind)."""
    return spec["base"] if spec.get("kind") == KIND else spec


@register_model_kind(KIND)
def build_quantized(spec: Dict[str, Any]) -> nn.Module:
    # the base spec was validated with the whole spec (compress.models.spec); its own builder makes the model
    base = spec["base"]
    model = MODEL_KINDS[base["kind"]](base)
    model.model_spec = base
    if spec.get("reparameterized"):
        reparameterized(model.eval())
    try:
        return replace_linears(model, spec["linears"], spec["scheme"], convert=False)
    except (ValueError, AttributeError) as error:
        from compress.models.spec import SpecError

        raise SpecError(f"model_spec.linears: {error}") from None


WRAPPER_KINDS.add(KIND)
