"""int8 quantisation: the stored format (int8 weights + scales, weights_only), the forward against the formula,
every kind, composition with the other tools, spec validation, and the monitor's size column. Tiny models."""
import csv

import pytest
import torch
from torch import nn

import compress
from compress.models import pruning
from compress.models.compact_clip import clone, to_compact
from compress.models.quantized import INT8_MAX, Int8Linear, quantize_weight
from compress.models.registry import build_model, open_clip_spec
from compress.models.spec import SpecError
from compress.models.students import student_clip_spec, student_image_spec
from compress.models.text_students import image_student_spec
from compress.ops.profile import model_size_bytes, params_and_macs
from compress.ops.quantize import quantize

torch.set_num_threads(1)
MODEL = "clipc-vit-t2-32"


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(open_clip_spec(MODEL)).eval()


@pytest.fixture(scope="module")
def inputs(dense):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 1000, (4, dense.context_length), generator=generator)
    text[:, -1] = 49407
    return torch.randn(4, 3, 32, 32, generator=generator), text


def test_weight_quantisation_by_hand():
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.02]])
    q, scale = quantize_weight(weight)
    torch.testing.assert_close(scale, torch.tensor([1.0 / 127, 2.0 / 127]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32], [127, 0, -1]]  # 0.5·127 = 63.5 → 64 (round half to even: 64)


def test_dynamic_forward_is_per_token_int8_times_int8():
    """The CUDA formula (per_token_forward), checked on CPU where torch._int_mm runs it too."""
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    layer = Int8Linear.from_linear(linear, "int8_dynamic")
    flat = x.reshape(-1, 5)
    row_scale = flat.abs().amax(1, keepdim=True) / INT8_MAX
    q_x = torch.round(flat / row_scale).clamp(-INT8_MAX, INT8_MAX)
    expected = (q_x @ layer.weight_int8.float().t()) * row_scale * layer.weight_scale + linear.bias
    with torch.no_grad():
        torch.testing.assert_close(layer.per_token_forward(flat), expected, atol=1e-5, rtol=1e-5)
        weight_only = Int8Linear.from_linear(linear, "int8_weight_only")
        torch.testing.assert_close(weight_only(x), x @ weight_only.dequantized_weight().t() + linear.bias)
        # both stay close to the float layer
        assert (layer(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


@pytest.mark.skipif(torch.backends.quantized.engine == "none", reason="no quantized CPU engine in this build")
def test_cpu_dynamic_forward_is_torch_ao_dynamic_linear_on_the_same_int8_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    layer = Int8Linear.from_linear(linear, "int8_dynamic")
    reference = torch.ao.nn.quantized.dynamic.Linear(64, 48, dtype=torch.qint8)
    weight = torch._make_per_channel_quantized_tensor(layer.weight_int8, layer.weight_scale.double(),
                                                      torch.zeros(48, dtype=torch.long), 0)
    reference.set_weight_bias(weight, linear.bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=1e-6)
        assert (layer(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()
        # the packed weights follow the stored ones: a copy, and a shell that loads the state dict, agree
        shell = Int8Linear(64, 48)
        shell(x)  # packs the shell's zero weights first
        shell.load_state_dict(layer.state_dict())
        torch.testing.assert_close(shell(x), layer(x), atol=0, rtol=0)
        torch.testing.assert_close(clone(layer)(x), layer(x), atol=0, rtol=0)
        assert not any(isinstance(value, torch.ScriptObject) for value in layer.state_dict().values())


def test_quantized_checkpoint_is_int8_weights_only_and_reloads_exactly(dense, inputs, tmp_path):
    images, text = inputs
    model = quantize(dense, "int8_dynamic")
    spec = model.model_spec
    assert spec["kind"] == "quantized" and spec["base"]["kind"] == "compact_clip"
    # every attention and MLP Linear of both towers (2 layers each: q, k, v, out, c_fc, c_proj)
    assert len(spec["linears"]) == 2 * 2 * 6 and "transformer.resblocks.1.mlp.c_proj" in spec["linears"]
    state = model.state_dict()
    assert state["visual.transformer.resblocks.0.attn.q_proj.weight_int8"].dtype == torch.int8
    assert state["visual.transformer.resblocks.0.attn.q_proj.weight_scale"].shape == (64,)
    path = tmp_path / "q.pt"
    torch.save({"model_spec": spec, "state_dict": state, "epoch": 0, "step": 0}, path)
    reloaded = compress.load(str(path))  # foundation.checkpoint reads with weights_only=True
    assert torch.load(path, weights_only=True)["model_spec"] == spec
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(reloaded.encode_text(text), model.encode_text(text), rtol=0, atol=0)
        for a, b in ((model.encode_image(images, normalize=True), dense.encode_image(images, normalize=True)),
                     (model.encode_text(text, normalize=True), dense.encode_text(text, normalize=True))):
            assert (a * b).sum(-1).min() > 0.99
    # the same parameter count and MACs, a quarter of the bytes in the quantised Linears
    float_compact = to_compact(clone(dense))
    assert params_and_macs(model) == params_and_macs(float_compact)
    quantised_weights = sum(layer.weight_int8.numel() for layer in model.modules() if isinstance(layer, Int8Linear))
    assert model_size_bytes(float_compact) - model_size_bytes(model) == 3 * quantised_weights - 4 * sum(
        layer.weight_scale.numel() for layer in model.modules() if isinstance(layer, Int8Linear))


def test_towers_choose_what_is_quantised(dense):
    image_only = quantize(dense, "int8_weight_only", towers=("image",))
    assert image_only.model_spec["linears"] and all(n.startswith("visual.") for n in image_only.model_spec["linears"])
    assert "reparameterized" not in image_only.model_spec  # a ViT has no branches to fuse
    with pytest.raises(ValueError, match="already quantized"):
        quantize(image_only)


STUDENTS = {
    "student_clip": lambda: build_model(student_clip_spec(student_image_spec("mobilenet_v3_small", MODEL,
                                                                             image_size=32), MODEL)),
    "image_student": lambda: build_model(image_student_spec(
        MODEL, {"type": "sentence_transformers", "name": "all-MiniLM-L6-v2"}, 384, add_projection_head=True,
        projection_hidden_dim=32, projection_n_layers=1)),
}


@pytest.mark.parametrize("kind", list(STUDENTS))
def test_students_quantise_and_reload(kind):
    torch.manual_seed(0)
    model = STUDENTS[kind]().eval()
    quantized = quantize(model, "int8_dynamic")
    assert quantized.model_spec["base"]["kind"] == kind
    again = compress.load({"model_spec": quantized.model_spec, "state_dict": quantized.state_dict()})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), quantized.encode_image(images))
        assert (quantized.encode_image(images, normalize=True) * model.encode_image(images, normalize=True)).sum(
            -1).min() > 0.98
    if kind == "image_student":  # its frozen text teacher is no part of its weights: untouched, still float
        assert all(name.startswith(("visual.", "head.")) for name in quantized.model_spec["linears"])
        torch.testing.assert_close(again.encode_text(["a red circle"]), model.encode_text(["a red circle"]))


# a module-scoped fixture of tests/test_families.py: the families' tiny configs (MobileCLIP's timm FastViT MCi)
from test_families import config_name, family_configs  # noqa: E402,F401


def test_mobileclip_is_reparameterised_before_int8_and_rebuilds_fused(family_configs, tmp_path):  # noqa: F811
    """int8 of a MobileCLIP quantises its fused inference form (fewer modules, the float model's function); the spec
    says so, and the checkpoint rebuilds into the same fused structure with the same features."""
    import copy

    from compress.models.pretrained import create_clip
    from compress.models.registry import get_tokenizer, preprocess_config
    from compress.ops.export import reparameterized

    torch.manual_seed(0)
    model = create_clip(config_name("mobileclip")).eval()
    with torch.no_grad():  # BatchNorm statistics of a trained tower, so fusing them into the convolutions matters
        for module in model.visual.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    fused = reparameterized(copy.deepcopy(model))
    size = preprocess_config(model.model_spec)["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.encode_image(images)
        torch.testing.assert_close(fused.encode_image(images), reference, rtol=1e-4, atol=1e-4)

    quantized = quantize(model, "int8_dynamic")
    spec = quantized.model_spec
    assert spec["reparameterized"] is True and spec["base"]["model"] == model.model_spec["model"]
    structure = [(name, type(module).__name__) for name, module in quantized.visual.named_modules()]
    assert len(structure) == sum(1 for _ in fused.visual.modules()) < sum(1 for _ in model.visual.modules())
    assert any(isinstance(module, Int8Linear) for module in quantized.visual.modules())
    compress.save(quantized, tmp_path / "int8")
    loaded = compress.load(str(tmp_path / "int8"))
    assert [(name, type(module).__name__) for name, module in loaded.visual.named_modules()] == structure
    tokens = get_tokenizer(model.model_spec)(["one red circle", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), quantized.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), quantized.encode_text(tokens), rtol=0, atol=0)
        assert torch.nn.functional.cosine_similarity(quantized.encode_image(images), reference).min() > 0.95
    assert "reparameterized" not in quantize(model, towers=("text",)).model_spec  # the image tower left as it was


def test_quantized_specs_are_validated(dense):
    spec = quantize(dense, "int8_weight_only", towers=("image",)).model_spec
    state = quantize(dense, "int8_weight_only", towers=("image",)).state_dict()
    for bad, message in [
        ({**spec, "pretrained": "x.pt"}, "model_spec.pretrained: unknown key"),
        ({**spec, "scheme": "int4"}, "model_spec.scheme"),
        ({**spec, "linears": ["visual.transformer.resblocks.0.ln_1"]}, "no nn.Linear"),
        ({**spec, "linears": ["../../etc"]}, "model_spec.linears[0]"),
        ({**spec, "base": spec}, "model_spec.base.kind"),
        ({**spec, "base": {**spec["base"], "model_kwargs": {"pretrained_image_path": "x"}}},
         "model_spec.base.model_kwargs.pretrained_image_path: unknown key"),
    ]:
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            compress.load({"model_spec": bad, "state_dict": state})


def test_prune_then_quantize_command_line_and_monitor(dense, tiny_corpus, tmp_path, capsys):
    from utils import evaluate_checkpoints as monitor
    from utils import lowrank as lowrank_cli
    from utils import quantize as quantize_cli

    model = to_compact(clone(dense))
    masks = pruning.init_masks(model)
    for mask in masks.values():
        mask[1::2] = 0.0
    pruned = pruning.prune_clip(model, masks)
    source = tmp_path / "pruned.pt"
    torch.save({"model_spec": pruned.model_spec, "state_dict": pruned.state_dict(), "epoch": 0, "step": 0}, source)
    (tmp_path / "pruned_run" / "checkpoints").mkdir(parents=True)
    source.rename(tmp_path / "pruned_run" / "checkpoints" / "epoch_0.pt")
    source = tmp_path / "pruned_run" / "checkpoints" / "epoch_0.pt"
    quantize_cli.main(["--pretrained", str(source), "--out", str(tmp_path / "q")])
    written = tmp_path / "q" / "checkpoints" / "epoch_0.pt"
    spec = torch.load(written, weights_only=True)["model_spec"]
    assert spec["kind"] == "quantized" and spec["base"]["kind"] == "compact_clip"
    assert spec["base"]["blocks"]["visual.transformer.resblocks.0"]["mlp_width"] == 128  # the pruned shapes
    assert "job: quantize" in (tmp_path / "q" / "params.txt").read_text()

    with pytest.raises(SystemExit) as exit_info:  # quantisation is the last step of a chain
        lowrank_cli.main(["--pretrained", str(written), "--out", str(tmp_path / "x"), "--ratio", "0.5"])
    assert exit_info.value.code == 2 and "got kind 'quantized'" in capsys.readouterr().err

    rows = {}
    for run in ("pruned_run", "q"):
        assert monitor.main(["--logs-dir", str(tmp_path / run), "--once", "--eval-data-dir",
                             str(tiny_corpus / "eval"), "--benchmarks", "zeroshot", "--workers", "0",
                             "--profile-batch-size", "4"]) == 0
        with open(tmp_path / run / "evaluation_metrics_all.csv") as handle:
            rows[run] = next(csv.DictReader(handle))
    assert rows["q"]["params"] == rows["pruned_run"]["params"]
    assert rows["q"]["macs_image"] == rows["pruned_run"]["macs_image"]
    assert int(rows["q"]["size_bytes"]) < int(rows["pruned_run"]["size_bytes"])
    assert int(rows["q"]["checkpoint_bytes"]) == written.stat().st_size
    assert any(k.startswith("zeroshot/") and k.endswith("/acc1") for k in rows["q"])
