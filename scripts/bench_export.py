"""Benchmark: onnxruntime against torch eager for every model kind, image and text graphs, side by side in one run.

    PYTHONPATH=src python scripts/bench_export.py [--model clipc-vit-t2-64] [--batch-size 32] [--repeats 5] \
        [--threads 1]

Each kind is built the way the project makes it (random weights: latency does not depend on their values) from
one `--model` CLIP: dense open_clip, masked_clip (UPop mid-search), pruned_clip (UPop surgery of the image
tower at p = 0.5), low-rank compact_clip (ratio 0.5), token-masked (FLIP p = 0.5), text layers dropped,
student_clip (MobileNetV3), image_student (its text side the bundled MiniLM) and quantized (int8 of the pruned
model). Each is exported with `compress.ops.export.export_onnx`; then torch and onnxruntime (same thread count)
embed the same batch in alternating repeats. Prints the median ms per batch of each and the ratio, and the
largest feature difference (for the int8_dynamic model: its activation rounding, which the weight-only graph
does not do).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import compress
from compress.models import pruning
from compress.models.compact_clip import clone, to_compact
from compress.models.registry import build_model, open_clip_spec
from compress.models.students import student_clip_spec, student_image_spec
from compress.models.text_students import image_student_spec
from compress.ops.export import example_inputs, export_onnx, onnx_session, run_graph
from compress.ops.lowrank import low_rank
from compress.ops.profile import time_interleaved
from compress.ops.quantize import quantize
from compress.ops.text_layers import drop_text_layers
from compress.ops.token_mask import mask_tokens


def kinds(model_name: str):
    dense = build_model(open_clip_spec(model_name)).eval()

    def masked():
        model = to_compact(clone(dense))
        masks = pruning.init_masks(model)
        pruning.attach_masks(model, masks)
        model.model_spec = pruning.masked_spec(open_clip_spec(model_name), masks)
        return compress.load({"model_spec": model.model_spec, "state_dict": model.state_dict()})

    def pruned():
        # the image tower only, as bench_prune.py: weight magnitudes pooled over both towers of a random model
        # would cut the image tower (smaller random weights) down to one unit per layer
        model = to_compact(clone(dense))
        masks = pruning.init_masks(model, towers=("image",))
        final = pruning.allocate_masks(pruning.magnitude_prune_scores(model, masks), pruning.mask_costs(model, masks),
                                       target=0.5, p=0.5)
        return pruning.prune_clip(model, final)

    size = dense.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    yield "open_clip", lambda: dense
    yield "masked_clip", masked
    yield "pruned_clip p=0.5", pruned
    yield "compact_clip low-rank 0.5", lambda: low_rank(dense, 0.5, towers=("image", "text"))
    yield "token-masked p=0.5", lambda: mask_tokens(dense, 0.5)
    yield "text layers: first 1", lambda: drop_text_layers(dense, keep_first=1)
    yield "student_clip mobilenet_v3_small", lambda: build_model(student_clip_spec(
        student_image_spec("mobilenet_v3_small", model_name, image_size=size), model_name)).eval()
    yield "image_student + MiniLM", lambda: build_model(image_student_spec(
        model_name, {"type": "sentence_transformers", "name": "all-MiniLM-L6-v2"}, 384)).eval()
    yield "quantized int8 (pruned p=0.5)", lambda: quantize(pruned(), "int8_dynamic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipc-vit-t2-64")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--only", default="", help="comma list of kind-name prefixes to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats} alternating "
          "repeats; ms per batch")
    print(f"{'kind':34s} {'graph':5s} {'torch ms':>9s} {'ort ms':>9s} {'torch/ort':>9s} {'max |diff|':>10s}")
    chosen = [p for p in args.only.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in kinds(args.model):
            if chosen and not any(name.startswith(p) for p in chosen):
                continue
            model = make().eval()
            out = Path(tmp) / name.replace(" ", "_").replace("/", "_")
            export_onnx(model, out)
            inputs = example_inputs(model, args.batch_size)
            graphs = {"image": (lambda: model.encode_image(inputs["images"], normalize=True),
                                [inputs["images"]] + ([inputs["token_index"]] if "token_index" in inputs else []))}
            if "captions" in inputs:
                graphs["text"] = (lambda: model.encode_text(inputs["captions"], normalize=True), list(inputs["text"]))
            elif "text" in inputs:
                graphs["text"] = (lambda: model.encode_text(inputs["text"][0], normalize=True), list(inputs["text"]))
            for graph, (torch_forward, feeds) in graphs.items():
                session = onnx_session(out / f"{graph}_encoder.onnx", threads=args.threads)
                with torch.no_grad():
                    reference, exported = torch_forward(), run_graph(session, *feeds)  # also the warm-up
                latency = time_interleaved({"torch": torch_forward, "ort": lambda: run_graph(session, *feeds)},
                                           args.repeats, warmup=0)
                torch_ms, ort_ms = (latency[k].median_wall_ms for k in ("torch", "ort"))
                diff = float((exported - reference.float()).abs().max())
                print(f"{name:34s} {graph:5s} {torch_ms:9.2f} {ort_ms:9.2f} {torch_ms / ort_ms:8.2f}x {diff:10.1e}")


if __name__ == "__main__":
    main()
