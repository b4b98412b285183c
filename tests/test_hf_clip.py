"""`--pretrained hf:DIR`: a small random transformers CLIPModel saved with save_pretrained gives, through our
loader, the image and text features transformers gives (1e-5); its architecture is registered (by name when a
config matches, by content hash otherwise) and travels in the spec, so tools, the trainer and a fresh process
accept it."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_trainer, subprocess_env

import compress
from compress.models.pretrained import create_clip
from compress.models.spec import SpecError
from foundation.errors import UserError
from utils.posttrain import load_input_model

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
EOT = 49407  # CLIP's end-of-text id, the largest of its vocabulary


def hf_folder(tmp_path_factory, name, act, vision_width, text_width, projection, intermediate_ratio):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=text_width, intermediate_size=intermediate_ratio * text_width,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16, hidden_act=act),
        vision_config=dict(hidden_size=vision_width, intermediate_size=intermediate_ratio * vision_width,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=projection)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """An architecture no config file describes: OpenAI's quick_gelu, MLP ratio 2."""
    return hf_folder(tmp_path_factory, "custom", "quick_gelu", 32, 48, 24, 2)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """clipc-vit-t2-32's architecture exactly (GELU, widths 64, head width 32, MLP ratio 4, embed 64)."""
    return hf_folder(tmp_path_factory, "known", "gelu", 64, 64, 64, 4)


def inputs():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    ids = torch.randint(1, EOT - 2, (3, 16), generator=generator)
    for row, end in enumerate((5, 15, 9)):  # end-of-text at different places, zero padding after it
        ids[row, end] = EOT
        ids[row, end + 1:] = 0
    return images, ids


def hf_features(model, images, ids):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=images)
        text = model.get_text_features(input_ids=ids)
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


@pytest.mark.parametrize("which", ["custom", "known"])
def test_same_features_as_transformers(which, request):
    hf, folder = request.getfixturevalue(which)
    images, ids = inputs()
    expected_image, expected_text = hf_features(hf, images, ids)
    for model in (load_input_model(None, f"hf:{folder}"), create_clip(None, f"hf:{folder}")):
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), expected_image, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.encode_text(ids), expected_text, atol=1e-5, rtol=0)


def test_a_known_architecture_gets_its_config_name_and_a_new_one_a_content_name(known, custom):
    assert load_input_model(None, f"hf:{known[1]}").model_spec == {"kind": "open_clip", "model": "clipc-vit-t2-32"}
    spec = load_input_model(None, f"hf:{custom[1]}").model_spec
    assert spec["model"].startswith("hf-clip-") and spec["model_cfg"]["quick_gelu"] is True
    assert spec["model_cfg"]["vision_cfg"] == {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                               "mlp_ratio": 2.0, "patch_size": 8}
    with pytest.raises(UserError, match=f"pass --model {spec['model']}"):
        create_clip("clipc-vit-t2-64", f"hf:{custom[1]}")
    with pytest.raises(UserError, match="no Hugging Face model folder"):
        create_clip(None, f"hf:{custom[1]}/nothing")


@pytest.mark.slow
def test_a_tool_output_loads_in_a_fresh_process(custom, tmp_path):
    from utils import lowrank as lowrank_cli

    lowrank_cli.main(["--pretrained", f"hf:{custom[1]}", "--out", str(tmp_path / "lr"), "--ratio", "0.5",
                      "--towers", "image,text"])
    checkpoint = tmp_path / "lr" / "checkpoints" / "epoch_0.pt"
    spec = torch.load(checkpoint, weights_only=True)["model_spec"]
    assert spec["kind"] == "compact_clip" and spec["model"].startswith("hf-clip-") and "model_cfg" in spec
    images, ids = inputs()
    torch.save({"images": images, "ids": ids}, tmp_path / "inputs.pt")
    script = ("import sys, torch, compress\n"
              "m = compress.load(sys.argv[1]); x = torch.load(sys.argv[2])\n"
              "with torch.no_grad(): torch.save({'i': m.encode_image(x['images']), 't': m.encode_text(x['ids'])}, "
              "sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], cwd=REPO, env=subprocess_env(), check=True, timeout=120)
    here = compress.load(str(checkpoint))
    there = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        torch.testing.assert_close(there["i"], here.encode_image(images))
        torch.testing.assert_close(there["t"], here.encode_text(ids))


def test_a_carried_config_is_validated(custom):
    model = load_input_model(None, f"hf:{custom[1]}")
    spec, state = model.model_spec, model.state_dict()
    with pytest.raises(SpecError, match="model_spec.model: 'ViT-B-32' is not 'hf-clip-"):
        compress.load({"model_spec": {**spec, "model": "ViT-B-32"}, "state_dict": state})
    tampered = {**spec, "model_cfg": {**spec["model_cfg"], "text_cfg": {**spec["model_cfg"]["text_cfg"],
                                                                         "hf_model_name": "org/model"}}}
    with pytest.raises(SpecError, match="model_spec.model_cfg.text_cfg.hf_model_name: unknown key"):
        compress.load({"model_spec": tampered, "state_dict": state})


@pytest.mark.slow
def test_the_trainer_takes_a_hugging_face_folder(custom, tiny_corpus, tmp_path):
    name = load_input_model(None, f"hf:{custom[1]}").model_spec["model"]
    common = ["--train-data", str(tiny_corpus / "train.tsv"), "--logs-root", str(tmp_path), "--batch-size", "32",
              "--workers", "0", "--warmup", "1", "--epochs", "1", "--stop-after-steps", "2",
              "--pretrained", f"hf:{custom[1]}"]
    refused = run_trainer([*common, "--name", "wrong", "--model", "clipc-vit-t2-64"], check=False, timeout=120)
    assert refused.returncode == 2 and f"pass --model {name}" in refused.stderr
    run_trainer([*common, "--name", "hf", "--model", name], timeout=240)
    checkpoints = sorted((tmp_path / "hf" / "checkpoints").glob("epoch_*.pt"))
    assert checkpoints and torch.load(checkpoints[-1], weights_only=True)["model_spec"]["model"] == name
