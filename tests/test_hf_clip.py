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


# --- hostile folders -----------------------------------------------------------------------------------

LOAD_EACH = """
import sys, traceback
from compress.models.hf_clip import load_hf_clip
from foundation.errors import UserError
for folder in sys.argv[1:]:
    try:
        load_hf_clip(f"hf:{folder}")
        print("loaded")
    except UserError as e:
        print("refused", str(e).replace(folder, "DIR"))
    except BaseException as e:
        print("FAILED", type(e).__name__, str(e)[:200].replace(chr(10), " "))
"""


def _hostile_folders(base, root):
    """name -> (folder, the part of the one-line refusal that says why)."""
    import json
    import os
    import shutil
    import struct

    config = json.loads((base / "config.json").read_text())
    cases = {}

    def folder(name, expected, config_text=None, weights=True):
        path = root / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config) if config_text is None else config_text)
        if weights:
            shutil.copy(base / "model.safetensors", path / "model.safetensors")
        cases[name] = (path, expected)
        return path

    def with_config(change):
        changed = json.loads(json.dumps(config))
        change(changed)
        return json.dumps(changed)

    folder("good", "loaded")
    pickled = folder("pickle", "only safetensors weights are read, and it has pytorch_model.bin", weights=False)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    folder("zero_heads", "text_config.num_attention_heads: 0 is outside [1,",
           with_config(lambda c: c["text_config"].update(num_attention_heads=0)))
    folder("string_size", "vision_config.image_size: expected an integer, got str",
           with_config(lambda c: c["vision_config"].update(image_size="32")))
    folder("width_out_of_bounds", "vision_cfg.width: 2097152 is outside",
           with_config(lambda c: c["vision_config"].update(hidden_size=1 << 21, intermediate_size=1 << 21)))
    # within every bound, 0.8 TB of weights: refused before anything is allocated, as the file has none of them
    folder("terabytes", "weights do not fit their config", with_config(lambda c: c["vision_config"].update(
        hidden_size=16384, intermediate_size=16384, num_attention_heads=128, num_hidden_layers=128)))
    folder("bad_json", "config.json is not valid JSON", "{'model_type': 'clip'")
    folder("nan_json", "config.json is not valid JSON (NaN is not a number JSON allows)",
           '{"model_type": "clip", "projection_dim": NaN}')
    non_utf8 = folder("non_utf8", "config.json is not valid JSON", weights=True)
    (non_utf8 / "config.json").write_bytes(b'{"model_type": "clip\xff\xfe"}')
    folder("list_config", "a JSON list, not an object", "[1, 2]")
    folder("tower_string", "vision_config is a str, not an object",
           with_config(lambda c: c.update(vision_config="big")))
    fifo = folder("fifo_config", "FIFO", weights=True)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    for name, weight_map, expected in [
        ("index_escape", {"a": "../model.safetensors"}, "is not a .safetensors file name inside the folder"),
        ("index_absolute", {"a": "/etc/passwd.safetensors"}, "is not a .safetensors file name inside the folder"),
        ("index_list", [1, 2], "weight_map maps tensor names to file names"),
    ]:
        path = folder(name, expected)
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bomb = folder("header_length", "a safetensors header of 1,152,921,504,606,846,976 bytes", weights=False)
    (bomb / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}).encode()
    big = folder("header_shape", "byte range [0, 4398046511104] is not inside the file's 0 bytes", weights=False)
    (big / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return cases


@pytest.mark.slow
def test_hostile_folders_are_one_line_refusals(custom, tmp_path):
    """Each crafted folder (its files made here) loads, or is refused with one line saying why, in a child under
    a memory limit and a timeout: never a traceback, a hang on a FIFO, or an attempt at terabytes."""
    from conftest import run_bounded

    cases = _hostile_folders(custom[1], tmp_path)
    result = run_bounded(["-c", LOAD_EACH, *[path for path, _ in cases.values()]], data_bytes=2 << 30, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = dict(zip(cases, result.stdout.splitlines()))
    for name, (_, expected) in cases.items():
        assert outcomes[name].startswith("loaded" if expected == "loaded" else "refused"), (name, outcomes[name])
        assert expected in outcomes[name], (name, outcomes[name])
