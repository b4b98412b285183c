"""Export any model the project writes as graphs: image and text encoders as separate graphs, batch dynamic,
with what a deployment must do to the inputs written beside them. Two formats, the same graphs:

    manifest = export_onnx(model, "deploy/")     # image_encoder.onnx, text_encoder.onnx, preprocessing.json
    manifest = export_program(model, "deploy/")  # image.pt2, text.pt2 (torch.export programs), preprocessing.json

ONNX goes through torch.onnx's exporter (dynamo=True) and runs in onnxruntime; a torch.export program
(`torch.export.load(path).module()`) runs with torch alone. `check_export` runs either against torch.
Both graphs output L2-normalised float32 features, so a caller compares them by a dot product.

- image graph: input `images`, float32 (batch, 3, S, S), already preprocessed as `preprocessing.json` says
  (the eval transform of the model's spec, read from the transform itself: resize, centre crop, RGB, [0, 1],
  normalise with the mean/std). A student that takes a smaller input resizes inside its graph, as in torch.
- text graph of a CLIP-style kind (open_clip, compact/pruned/masked, student_clip, quantized): input `tokens`,
  int64 (batch, context_length), open_clip's CLIP BPE tokenizer; its vocabulary file is copied beside the
  graph. The tower pools at the end-of-text token (the highest id): padding after it, with 0 as open_clip does
  or with the end-of-text id as Hugging Face's CLIPTokenizer does, gives the same features.
- text graph of an `image_student` (ProtoRKD): its text side is the frozen sentence-transformers model named in
  its spec (all-MiniLM-L6-v2 by default), exported as the same kind of graph with inputs `input_ids` and
  `attention_mask` (int64, batch and sequence dynamic) and its Hugging Face tokenizer files copied beside it.

Token masking (FLIP) chooses its kept patches at every forward, which a graph cannot replay as torch does:
- a per-image mask (what every spec `utils.token_mask` writes records) seeds its choice with a keyed hash of each
  image's pixel bytes; no graph operator computes that hash, so the image graph takes the choice as a second
  input, `token_index` (batch, kept tokens), computed by `token_index(model, images)`;
- a batch-wise mask (a spec without `per_image`: one seeded draw per batch) is replaced by the table of tokens
  it keeps for each row of a batch of up to `max_batch` images (the same choice, row by row); a larger batch is
  refused.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.compact_clip import TokenMask, clone
from compress.models.registry import get_preprocess, get_tokenizer, input_spec
from compress.models.reparameterize import reparameterized
from compress.ops.quantize import spec_image_size
from foundation.checkpoint import atomic_write_bytes
from foundation.errors import UserError
from foundation.files import write_failure

IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
MANIFEST = "preprocessing.json"
DEFAULT_OPSET = 18


class ImageGraph(nn.Module):
    """images → normalised image features (what `encode_image(images, normalize=True)` returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images).float(), dim=-1)


class TextGraph(nn.Module):
    """token ids → normalised text features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class SentenceTextGraph(nn.Module):
    """(input_ids, attention_mask) → normalised sentence embedding of a sentence-transformers model."""

    def __init__(self, sentence_transformer: nn.Module):
        super().__init__()
        self.sentence_transformer = sentence_transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"input_ids": input_ids, "attention_mask": attention_mask,
                    "token_type_ids": torch.zeros_like(input_ids)}
        return F.normalize(self.sentence_transformer(features)["sentence_embedding"].float(), dim=-1)


class FixedTokenMask(nn.Module):
    """The tokens a batch-wise TokenMask keeps for rows 0..max_batch-1 of a batch, as a table: a gather ONNX
    can run (row b of any batch keeps what it kept in torch)."""

    def __init__(self, mask: nn.Module, num_tokens: int, max_batch: int):
        super().__init__()
        self.register_buffer("kept", kept_tokens(mask, num_tokens, max_batch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # expanding the sliced table to the batch size is what refuses a batch past max_batch in the graph:
        # a plain slice would silently return fewer rows
        index = self.kept[: x.shape[0]].expand(x.shape[0], -1)
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class IndexedTokenMask(nn.Module):
    """A per-image TokenMask's choice, given as a graph input (`token_index`): the choice is drawn from a
    keyed hash of each image's pixel bytes, which no ONNX operator computes."""

    def __init__(self):
        super().__init__()
        self.index: Optional[torch.Tensor] = None  # set by ImageGraph for each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, self.index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class IndexedImageGraph(ImageGraph):
    """(images, token_index) → normalised image features, for a model whose token mask is per image."""

    def __init__(self, model: nn.Module, mask: IndexedTokenMask):
        super().__init__(model)
        self.mask = mask

    def forward(self, images: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        self.mask.index = token_index
        return super().forward(images)


def kept_tokens(mask: nn.Module, num_tokens: int, batch: int, images: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(batch, kept) indices of the tokens (0 = class token) `mask` keeps: the mask's own forward on token
    positions says which token each output row holds, so this follows whatever rule the mask applies.
    A per-image mask first sees `images` (its rule keys on their pixels)."""
    if images is not None:
        mask.observe_pixels(images)
    positions = torch.arange(num_tokens, dtype=torch.float32).view(1, num_tokens, 1).expand(batch, -1, -1)
    with torch.no_grad():
        return mask(positions.contiguous())[..., 0].round().long()


def _token_masks(model: nn.Module):
    """(parent module, attribute, mask, tokens its tower sees) of every TokenMask that drops tokens."""
    for name, module in list(model.named_modules()):
        if isinstance(module, TokenMask) and module.drop > 0:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            grid = getattr(parent, "grid_size", None)
            if grid is None:
                raise ValueError(f"cannot tell how many tokens {name} sees (no grid_size on its tower)")
            yield parent, child, module, 1 + int(grid[0]) * int(grid[1])  # the class token, then the patches


def per_image_token_mask(model: nn.Module) -> Optional[Tuple[TokenMask, int]]:
    """(mask, tokens) of the model's per-image TokenMask, if it has one."""
    for _, _, mask, tokens in _token_masks(model):
        if getattr(mask, "per_image", False):
            return mask, tokens
    return None


def token_index(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The `token_index` input of a per-image token-masked image graph for `images` (preprocessed)."""
    found = per_image_token_mask(model)
    if found is None:
        raise ValueError("this model has no per-image token mask")
    mask, tokens = found
    return kept_tokens(mask, tokens, images.shape[0], images)


def fix_token_masks(model: nn.Module, max_batch: int) -> Optional[IndexedTokenMask]:
    """In place: each batch-wise TokenMask becomes its FixedTokenMask table, a per-image one an
    IndexedTokenMask (returned: its graph takes the choice as an input)."""
    indexed = None
    for parent, child, mask, tokens in _token_masks(model):
        if getattr(mask, "per_image", False):
            indexed = IndexedTokenMask()
            setattr(parent, child, indexed)
        else:
            setattr(parent, child, FixedTokenMask(mask, tokens, max_batch))
    return indexed


# --- what the inputs must be ----------------------------------------------------------------------


def describe_image_preprocessing(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The eval transform of `spec`, step by step, read from the transform object itself."""
    from torchvision import transforms as T

    steps: List[Dict[str, Any]] = []
    mean = std = None
    for transform in getattr(get_preprocess(spec), "transforms", []):
        if isinstance(transform, T.Resize):
            size = transform.size
            steps.append({"op": "resize", "size": size, "interpolation": transform.interpolation.value,
                          "antialias": bool(transform.antialias),
                          "rule": "shorter side to size, aspect kept" if isinstance(size, int) or len(size) == 1
                          else "to (height, width)"})
        elif isinstance(transform, T.CenterCrop):
            steps.append({"op": "center_crop", "size": list(transform.size)})
        elif isinstance(transform, T.Normalize):
            mean, std = [float(v) for v in transform.mean], [float(v) for v in transform.std]
            steps.append({"op": "normalize", "mean": mean, "std": std})
        elif type(transform).__name__ in ("MaybeConvertMode", "_convert_to_rgb") or "convert" in repr(transform):
            steps.append({"op": "convert_rgb"})
        elif type(transform).__name__ in ("MaybeToTensor", "ToTensor"):
            steps.append({"op": "to_tensor", "note": "HWC uint8 → CHW float32 in [0, 1]"})
        else:
            steps.append({"op": type(transform).__name__})
    size = spec_image_size(spec)
    return {"input": "images", "dtype": "float32", "shape": ["batch", 3, size, size], "image_size": size,
            "mean": mean, "std": std, "steps": steps}


def describe_hf_tokenizer(tokenizer: Any, spec: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """An open_clip HFTokenizer (SigLIP's): its Hugging Face files saved in `out_dir`/tokenizer and how open_clip
    calls it."""
    tokenizer.save_pretrained(out_dir / "tokenizer")
    inner = input_spec(spec)
    return {
        "input": "tokens", "dtype": "int64", "shape": ["batch", int(tokenizer.context_length)],
        "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "name": inner.get("tokenizer_model", inner.get("model")),
        "description": f"Hugging Face tokenizer in tokenizer/ (AutoTokenizer.from_pretrained('tokenizer')), text "
                       f"cleaned with open_clip's {tokenizer.clean_fn.__name__}, padded to max_length "
                       f"{int(tokenizer.context_length)} and truncated, input_ids only",
        "context_length": int(tokenizer.context_length), "tokenizer_dir": "tokenizer",
        "pad_token_id": tokenizer.tokenizer.pad_token_id,
    }


def describe_clip_tokenizer(spec: Dict[str, Any], out_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The tokenizer of a model whose encode_text takes token ids: CLIP's BPE, or a Hugging Face tokenizer
    (whose files are saved in `out_dir`)."""
    tokenizer = get_tokenizer(spec)
    inner = input_spec(spec)
    if not hasattr(tokenizer, "sot_token_id"):
        if out_dir is None or not hasattr(tokenizer, "save_pretrained"):
            raise ValueError(f"cannot describe the {type(tokenizer).__name__} tokenizer of this model")
        return describe_hf_tokenizer(tokenizer, spec, out_dir)
    return {
        "input": "tokens", "dtype": "int64", "shape": ["batch", int(tokenizer.context_length)],
        "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "name": inner.get("tokenizer_model", inner.get("model")),
        "description": "CLIP byte-level BPE (open_clip.SimpleTokenizer; the same ids as Hugging Face's "
                       "CLIPTokenizer of openai/clip-vit-base-patch32): text cleaned with ftfy, whitespace "
                       "collapsed, lower-cased; [start-of-text] + BPE ids + [end-of-text], truncated to the "
                       "context length (end-of-text kept last) and zero-padded",
        "context_length": int(tokenizer.context_length),
        "vocab_size": len(getattr(tokenizer, "encoder", {})) or None,
        "sot_token_id": int(tokenizer.sot_token_id), "eot_token_id": int(tokenizer.eot_token_id),
        "pad_token_id": 0, "vocab_file": "bpe_simple_vocab_16e6.txt.gz",
    }


# --- the export ---------------------------------------------------------------------------------------

# the graph files of each format, by tower
GRAPH_FILES = {"onnx": {"image": IMAGE_GRAPH, "text": TEXT_GRAPH},
               "torch_export": {"image": "image.pt2", "text": "text.pt2"}}


@contextlib.contextmanager
def _capturing():
    """What every capture runs under: no autograd, the exporters' warnings silenced, and nn.MultiheadAttention's
    fused inference fast path off (one fused kernel that ONNX has no operator for; the unfused path computes
    the same attention, and a torch.export program holding it runs on any device)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _write_onnx(module: nn.Module, inputs: tuple, path: Path, input_names: Sequence[str],
                dynamic: Tuple[Dict[int, Any], ...], opset: int) -> None:
    """One graph through torch.onnx's exporter (dynamo=True: a torch.export capture translated to ONNX and
    optimised by onnxscript). Every model kind goes through it: scaled_dot_product_attention, a student's
    antialiased resize, int8 weights (Int8Linear's weight-only formula while torch.onnx exports) and the
    sentence-transformers text side."""
    torch.onnx.export(module, inputs, str(path), input_names=list(input_names), output_names=["features"],
                      dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)


def _write_program(module: nn.Module, inputs: tuple, path: Path, input_names: Sequence[str],
                   dynamic: Tuple[Dict[int, Any], ...], opset: int) -> None:
    """One graph as a torch.export program: ATen operators only, so `torch.export.load(path).module()` runs it
    with torch alone (this package, open_clip and transformers need not be installed). `opset` is ONNX's."""
    # serialised in memory, then written atomically: torch's zip writer, given a file that fills up, throws again
    # from its destructor and aborts the process (exit 134) after the error has been reported
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, inputs, dynamic_shapes=dynamic), buffer)
    atomic_write_bytes(path, buffer.getvalue())


WRITERS = {"onnx": _write_onnx, "torch_export": _write_program}


def _whole_or_nothing(write: Callable[..., None]) -> Callable[..., None]:
    """A graph writer whose failed write (a full disk) leaves no file behind, the graph's nor its external data
    (`<file>.data`), and is one line (UserError); other failures of the export itself pass through."""
    def written(module: nn.Module, inputs: tuple, path: Path, *rest: Any) -> None:
        try:
            write(module, inputs, path, *rest)
        except UserError:  # atomic_write's own one line
            raise
        except (OSError, RuntimeError) as error:
            if not _disk_error(error):
                raise
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
            raise UserError(f"cannot write {path}: {write_failure(error)}") from None
    return written


def _disk_error(error: BaseException) -> bool:
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_text_encoder_module(model: nn.Module):
    """(sentence-transformers module, its folder) of an image_student's frozen text encoder."""
    encoder = getattr(model, "text_encoder", None)
    module = getattr(encoder, "module", None)
    if module is None or encoder.spec.get("type") != "sentence_transformers":
        return None, None
    from compress.models.text_students import resolve_sentence_transformer

    return module, Path(resolve_sentence_transformer(encoder.spec["name"]))


def example_inputs(model: nn.Module, batch: int = 2) -> Dict[str, Any]:
    """Inputs each graph of `model` takes, for tracing and checking (random images, tokenized captions)."""
    from compress.ops.profile import PROFILE_CAPTION

    spec = model.model_spec
    size = spec_image_size(spec)
    generator = torch.Generator().manual_seed(0)
    out: Dict[str, Any] = {"images": torch.randn(batch, 3, size, size, generator=generator)}
    if per_image_token_mask(model) is not None:
        out["token_index"] = token_index(model, out["images"])
    captions = [PROFILE_CAPTION, "a blue square", "two green triangles on white", "a photo"][:batch]
    captions += [PROFILE_CAPTION] * (batch - len(captions))
    st, _ = load_text_encoder_module(model)
    if st is not None:
        tokens = st.tokenizer(captions, padding=True, truncation=True, max_length=st.max_seq_length,
                              return_tensors="pt")
        out["text"] = (tokens["input_ids"], tokens["attention_mask"])
        out["captions"] = captions
    elif input_spec(spec).get("text_input") not in ("strings", "none"):
        out["text"] = (get_tokenizer(spec)(captions),)
    return out


def export_onnx(model: nn.Module, out_dir: str | Path, opset: int = DEFAULT_OPSET, max_batch: int = 256,
                towers: Sequence[str] = ("image", "text")) -> Dict[str, Any]:
    """Write the ONNX graphs of `model` and `preprocessing.json` into `out_dir`; return the manifest."""
    return export_graphs(model, out_dir, "onnx", opset=opset, max_batch=max_batch, towers=towers)


def export_program(model: nn.Module, out_dir: str | Path, max_batch: int = 256,
                   towers: Sequence[str] = ("image", "text")) -> Dict[str, Any]:
    """Write the torch.export programs of `model` (image.pt2, text.pt2) and `preprocessing.json` into `out_dir`;
    return the manifest."""
    return export_graphs(model, out_dir, "torch_export", max_batch=max_batch, towers=towers)


def export_graphs(model: nn.Module, out_dir: str | Path, fmt: str, opset: int = DEFAULT_OPSET,
                  max_batch: int = 256, towers: Sequence[str] = ("image", "text")) -> Dict[str, Any]:
    """The graphs of `model` in format `fmt` ("onnx" or "torch_export": the same modules, inputs and batch
    axes either way) and the manifest describing their inputs, `preprocessing.json`; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    original = model
    inputs = example_inputs(original)
    model = reparameterized(clone(model).float().eval())
    indexed = fix_token_masks(model, max_batch)
    spec = model.model_spec
    files, write = GRAPH_FILES[fmt], _whole_or_nothing(WRITERS[fmt])
    manifest: Dict[str, Any] = {"format": fmt, "model_kind": spec["kind"],
                                "features": "L2-normalised float32, output 'features' of each graph", "graphs": {}}
    if fmt == "onnx":
        manifest["opset"] = opset
    else:
        manifest["load"] = "torch.export.load(path).module(), torch alone; saved by torch " + torch.__version__
    # a table of kept tokens (a batch-wise token mask) holds max_batch rows: the batch axis stops there
    batch = torch.export.Dim("batch", min=1, max=max_batch if _has_fixed_mask(model) else None)
    with _capturing():
        if "image" in towers:
            description = {"file": files["image"], **describe_image_preprocessing(spec)}
            if indexed is None:
                write(ImageGraph(model), (inputs["images"],), out_dir / files["image"], ["images"], ({0: batch},),
                      opset)
            else:
                write(IndexedImageGraph(model, indexed), (inputs["images"], inputs["token_index"]),
                      out_dir / files["image"], ["images", "token_index"], ({0: batch}, {0: batch}), opset)
                description["token_index"] = {
                    "dtype": "int64", "shape": ["batch", int(inputs["token_index"].shape[1])],
                    "meaning": "the tokens each image keeps, 0 = the class token, in order (FLIP per image)",
                    "how": "compress.ops.export.token_index(model, images): the token mask's choice is seeded by "
                           "a keyed BLAKE2 hash of each image's float32 pixel bytes, which no graph operator "
                           "computes"}
            if _has_fixed_mask(model):
                description["max_batch"] = max_batch
            manifest["graphs"]["image"] = description
        if "text" in towers:
            manifest["graphs"]["text"] = _export_text(model, inputs, out_dir, files["text"], write, opset)
    atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def _has_fixed_mask(model: nn.Module) -> bool:
    return any(isinstance(m, FixedTokenMask) for m in model.modules())


def _export_text(model: nn.Module, inputs: Dict[str, Any], out_dir: Path, file: str, write: Callable,
                 opset: int) -> Optional[Dict[str, Any]]:
    spec = input_spec(model.model_spec)
    st, folder = load_text_encoder_module(model)
    if st is not None:
        # the sequence axis runs up to what the tokenizer truncates to (the encoder's position table bounds it)
        axes = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", max=int(st.max_seq_length))}
        write(SentenceTextGraph(st), inputs["text"], out_dir / file, ["input_ids", "attention_mask"], (axes, axes),
              opset)
        tokenizer_dir = out_dir / "tokenizer"
        tokenizer_dir.mkdir(exist_ok=True)
        copied = []
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tokenizer_dir / name)
                copied.append(name)
        return {"file": file, "inputs": ["input_ids", "attention_mask"], "dtype": "int64",
                "shape": ["batch", "sequence"], "encoder": spec["text_encoder"].get("name"),
                "tokenizer": "Hugging Face tokenizer in tokenizer/ (AutoTokenizer.from_pretrained('tokenizer'))",
                "tokenizer_files": copied, "max_length": int(st.max_seq_length),
                "padding": "pad to the longest caption of the batch, attention_mask 0 on padding",
                "pooling": "inside the graph (the sentence-transformers pipeline)"}
    if spec.get("text_input") == "none":  # an image-only student (distilled from an image teacher)
        return {"file": None, "note": "this model has no text side"}
    if spec.get("text_input") == "strings":
        logging.warning("this model's text encoder is no sentence-transformers model: no text graph written; "
                        "its spec names it: %s", spec.get("text_encoder"))
        return {"file": None, "encoder": spec.get("text_encoder"),
                "note": "not exported: use the text encoder the spec names"}
    write(TextGraph(model), inputs["text"], out_dir / file, ["tokens"], ({0: torch.export.Dim("batch", min=1)},),
          opset)
    description = describe_clip_tokenizer(model.model_spec, out_dir)
    if "vocab_file" in description:
        import open_clip.tokenizer

        shutil.copyfile(open_clip.tokenizer.default_bpe(), out_dir / description["vocab_file"])
    return {"file": file, **description}


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session (`threads` 0: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_graph(session, *arrays) -> torch.Tensor:
    """The graph's features for these inputs (tensors, fed in the graph's input order)."""
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: a.numpy() for n, a in zip(names, arrays)})[0])


def torch_features(model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """What the exported graphs must reproduce: the model's normalised features in float32."""
    with torch.no_grad():
        out = {"image": F.normalize(model.encode_image(inputs["images"]).float(), dim=-1)}
        if "captions" in inputs:
            out["text"] = F.normalize(model.encode_text(inputs["captions"]).float(), dim=-1)
        elif "text" in inputs:
            out["text"] = F.normalize(model.encode_text(inputs["text"][0]).float(), dim=-1)
    return out


def compare_features(model: nn.Module, other: nn.Module, batch: int = 3) -> Dict[str, float]:
    """Max |other − model| of the normalised features on the same inputs, per tower: a model written in some
    format and read back, against the model it was written from."""
    inputs = example_inputs(model, batch)
    reference, got = torch_features(model.float().eval(), inputs), torch_features(other.float().eval(), inputs)
    return {tower: float((got[tower] - reference[tower]).abs().max()) for tower in reference}


def graph_runner(path: str | Path, fmt: str) -> Callable[..., torch.Tensor]:
    """A callable running one exported graph of format `fmt` on tensors (fed in the graph's input order), as a
    deployment would: onnxruntime for ONNX, `torch.export.load(...).module()` for a torch.export program."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda *tensors: run_graph(session, *tensors)
    program = torch.export.load(str(path)).module()

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(*tensors)

    return run


def check_export(model: nn.Module, out_dir: str | Path, batch: int = 3) -> Dict[str, float]:
    """Max |exported − torch| of the normalised features of each graph `out_dir`'s manifest lists (ONNX in
    onnxruntime, or torch.export programs), on a batch of `batch` (another size than the one traced, so the
    dynamic batch is exercised)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    inputs = example_inputs(model, batch)
    reference = torch_features(model.float().eval(), inputs)
    feeds = {"image": [inputs["images"]] + ([inputs["token_index"]] if "token_index" in inputs else []),
             "text": list(inputs.get("text", ()))}
    diffs = {}
    for tower, graph in manifest["graphs"].items():
        if graph.get("file") and tower in reference:
            run = graph_runner(out_dir / graph["file"], manifest["format"])
            diffs[tower] = float((run(*feeds[tower]) - reference[tower]).abs().max())
    return diffs
