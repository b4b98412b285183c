"""ONNX export of every model kind: onnxruntime reproduces torch's normalised features (fp32, 1e-4) on a batch
size other than the one traced, the manifest describes the inputs, and the command line writes the folder.
Tiny clipc-vit-t2-32 models and small students, random weights."""
import json

import pytest
import torch

import compress
from compress.models import pruning
from compress.models.compact_clip import clone, to_compact
from compress.models.registry import build_model, open_clip_spec
from compress.models.students import student_clip_spec, student_image_spec
from compress.models.text_students import image_student_spec
from compress.ops.export import check_export, describe_image_preprocessing, export_onnx
from compress.ops.lowrank import low_rank
from compress.ops.quantize import quantize
from compress.ops.text_layers import drop_text_layers
from compress.ops.token_mask import mask_tokens

pytest.importorskip("onnxruntime")
torch.set_num_threads(1)
MODEL = "clipc-vit-t2-32"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(open_clip_spec(MODEL)).eval()


def _masks(model, seed):
    generator = torch.Generator().manual_seed(seed)
    masks = pruning.init_masks(model)
    for mask in masks.values():
        mask.copy_((torch.rand(mask.shape, generator=generator) < 0.6).float() * 0.5 + 0.5 * torch.rand(
            mask.shape, generator=generator))
        mask[0] = 1.0
    return masks


def masked(dense):
    model = to_compact(clone(dense))
    masks = _masks(model, 1)
    pruning.attach_masks(model, masks)
    model.model_spec = pruning.masked_spec(open_clip_spec(MODEL), masks)
    return compress.load({"model_spec": model.model_spec, "state_dict": model.state_dict()})


def pruned(dense):
    model = to_compact(clone(dense))
    masks = {k: (m > 0.7).float() for k, m in _masks(model, 2).items()}
    for mask in masks.values():
        mask[0] = 1.0
    return pruning.prune_clip(model, masks)


def student(dense):
    torch.manual_seed(3)
    image = student_image_spec("mobilenet_v3_small", MODEL, image_size=32)
    return build_model(student_clip_spec(image, MODEL)).eval()


def vit_student(dense):
    torch.manual_seed(4)
    image = student_image_spec("teacher", MODEL, image_size=16, width=32, layers=1)  # resizes 32 → 16 inside
    return build_model(student_clip_spec(image, MODEL)).eval()


def image_student(dense):
    torch.manual_seed(5)
    spec = image_student_spec(MODEL, {"type": "sentence_transformers", "name": "all-MiniLM-L6-v2"}, 384,
                              add_projection_head=True, projection_hidden_dim=32, projection_n_layers=1)
    return build_model(spec).eval()


KINDS = {
    "open_clip": lambda d: d,
    "masked_clip": masked,
    "pruned_clip": pruned,
    "low-rank compact_clip": lambda d: low_rank(d, 0.5, towers=("image", "text")),
    "token-masked": lambda d: mask_tokens(d, 0.5, seed=1),
    "text layers dropped": lambda d: drop_text_layers(d, keep_first=1),
    "student_clip (torchvision)": student,
    "student_clip (ViT, resized inside)": vit_student,
    "image_student (MiniLM text)": image_student,
    "quantized (int8, of a pruned model)": lambda d: quantize(pruned(d), "int8_weight_only"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_onnxruntime_reproduces_torch_features(kind, dense, tmp_path):
    model = KINDS[kind](dense)
    manifest = export_onnx(model, tmp_path, max_batch=8)
    diffs = check_export(model, tmp_path, batch=3)  # traced at batch 2: the batch axis is dynamic
    assert set(diffs) == {"image", "text"}, kind
    assert max(diffs.values()) < TOLERANCE, (kind, diffs)
    assert manifest["model_kind"] == model.model_spec["kind"]
    assert (tmp_path / manifest["graphs"]["image"]["file"]).is_file()
    assert (tmp_path / manifest["graphs"]["text"]["file"]).is_file()
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == manifest


def test_per_image_token_mask_takes_its_choice_as_an_input(dense, tmp_path):
    from compress.ops.export import onnx_session, run_graph, token_index

    model = mask_tokens(dense, 0.5, seed=2)
    manifest = export_onnx(model, tmp_path, towers=("image",))
    assert manifest["graphs"]["image"]["token_index"]["shape"] == ["batch", 1 + 8]  # class token + 8 of 16
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    session = onnx_session(tmp_path / "image_encoder.onnx")
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
    torch.testing.assert_close(run_graph(session, images, token_index(model, images)), expected, atol=TOLERANCE,
                               rtol=0)
    # an image alone gets the feature it got in the batch, in onnxruntime as in torch
    torch.testing.assert_close(run_graph(session, images[3:4], token_index(model, images[3:4])), expected[3:4],
                               atol=TOLERANCE, rtol=0)


def test_batchwise_token_mask_keeps_the_same_patches_per_row_and_refuses_a_larger_batch(dense, tmp_path):
    from compress.ops.export import example_inputs, onnx_session, run_graph

    spec = {**mask_tokens(dense, 0.5, seed=2).model_spec, "token_mask": {"drop": 0.5, "seed": 2}}  # an older spec
    model = compress.load({"model_spec": spec, "state_dict": dense.state_dict()})
    manifest = export_onnx(model, tmp_path, max_batch=4, towers=("image",))
    assert manifest["graphs"]["image"]["max_batch"] == 4 and "token_index" not in manifest["graphs"]["image"]
    images = example_inputs(model, 4)["images"]
    session = onnx_session(tmp_path / "image_encoder.onnx")
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
    torch.testing.assert_close(run_graph(session, images), expected, atol=TOLERANCE, rtol=0)
    with pytest.raises(Exception):
        run_graph(session, torch.cat([images, images[:1]]))


def test_manifest_describes_the_inputs(dense, tmp_path):
    manifest = export_onnx(dense, tmp_path)
    image, text = manifest["graphs"]["image"], manifest["graphs"]["text"]
    assert image["image_size"] == 32 and image["shape"] == ["batch", 3, 32, 32]
    assert [step["op"] for step in image["steps"]] == ["resize", "center_crop", "convert_rgb", "to_tensor",
                                                       "normalize"]
    assert image["steps"][0]["interpolation"] == "bicubic" and image["mean"][0] == pytest.approx(0.48145466)
    assert text["context_length"] == 16 and text["eot_token_id"] == 49407 and text["sot_token_id"] == 49406
    assert (tmp_path / text["vocab_file"]).is_file()
    assert describe_image_preprocessing(dense.model_spec)["std"][2] == pytest.approx(0.27577711)


@pytest.mark.slow
def test_minilm_text_graph_takes_its_own_tokenizer(dense, tmp_path):
    from transformers import AutoTokenizer

    from compress.ops.export import onnx_session, run_graph

    model = image_student(dense)
    manifest = export_onnx(model, tmp_path)
    text = manifest["graphs"]["text"]
    assert text["inputs"] == ["input_ids", "attention_mask"] and "tokenizer.json" in text["tokenizer_files"]
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))  # what the manifest says to do
    captions = ["a red circle", "three small blue squares on a plain background", "x"]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    features = run_graph(onnx_session(tmp_path / "text_encoder.onnx"), tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(features, model.encode_text(captions, normalize=True), atol=TOLERANCE, rtol=0)


def test_export_command_line(dense, tmp_path, capsys):
    from utils import export as export_cli

    checkpoint = tmp_path / "dense.pt"
    torch.save({"model_spec": dense.model_spec, "state_dict": dense.state_dict(), "epoch": 1, "step": 2}, checkpoint)
    export_cli.main([str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    out = capsys.readouterr().out
    assert "max |onnxruntime - torch|" in out
    assert {p.name for p in (tmp_path / "onnx").iterdir()} >= {"image_encoder.onnx", "text_encoder.onnx",
                                                                "preprocessing.json"}
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
