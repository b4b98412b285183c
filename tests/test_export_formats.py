"""Standard formats out: a safetensors model folder (`compress.save` / `compress.load(DIR)`) for every kind,
open_clip's local-dir layout for the models open_clip's config describes, torch.export programs that torch
alone runs, and the `python -m utils.export --format` command line. Each is read back the way a deployment
reads it and must give the features the model gives; a hostile folder is refused with one line.
Tiny clipc-vit-t2-32 models and small students (tests/test_export.py's KINDS), random weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import KINDS, pruned
from test_families import config_name, family_configs  # noqa: F401, F811  (a fixture: the families' tiny configs)
from torch import nn

import compress
from compress.models.compact_clip import clone, keep_neurons, refresh_spec, to_compact, tower_blocks
from compress.models.folder import SPEC, WEIGHTS, ModelFolderError
from compress.models.registry import MODEL_KINDS, build_model, open_clip_spec
from compress.models.spec import SCHEMAS, SpecError, literal, record
from compress.ops.export import check_export, compare_features, example_inputs, export_program
from compress.ops.open_clip_layout import LayoutError, check_open_clip_dir, write_open_clip_dir
from compress.ops.quantize import quantize
from foundation.checkpoint import save_checkpoint
from foundation.errors import UserError

torch.set_num_threads(1)
MODEL = "clipc-vit-t2-32"
TOLERANCE = 1e-4  # fp32 features of a graph against torch's (a reloaded model must match exactly)

FOLDER_KINDS = {**KINDS, "quantized (int8_dynamic, of a dense model)": lambda d: quantize(d, "int8_dynamic")}


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(open_clip_spec(MODEL)).eval()


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


# --- the safetensors model folder ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FOLDER_KINDS))
def test_model_folder_round_trip_of_every_kind(kind, dense, tmp_path, monkeypatch):
    model = FOLDER_KINDS[kind](dense)
    compress.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS, SPEC}
    assert json.loads((tmp_path / SPEC).read_text()) == json.loads(json.dumps(model.model_spec))

    def no_pickle(*args, **kwargs):
        raise AssertionError("a model folder is read without unpickling anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = compress.load(tmp_path)
    monkeypatch.undo()
    assert loaded.model_spec == json.loads(json.dumps(model.model_spec))
    assert not loaded.training
    expected = model.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), (kind, name)
    assert set(compare_features(model, loaded).values()) == {0.0}, kind


class _Tied(nn.Module):
    """Two names for one weight, as a model with tied embeddings has."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.decoder = nn.Linear(4, 3)
        self.decoder.weight = self.encoder.weight
        self.empty = nn.Parameter(torch.zeros(0, 4))  # a fully pruned layer: no bytes, shared with nothing


@pytest.fixture
def tied_kind(monkeypatch):
    monkeypatch.setitem(MODEL_KINDS, "tied_test", lambda spec: _Tied())
    monkeypatch.setitem(SCHEMAS, "tied_test", record({"kind": literal("tied_test")}))
    return {"kind": "tied_test"}


def test_tied_weights_are_stored_once_and_stay_tied(tied_kind, tmp_path):
    model = build_model(tied_kind)
    with torch.no_grad():
        model.encoder.weight.normal_()
    compress.save(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS)
    assert set(stored) == {"decoder.weight", "decoder.bias", "encoder.bias", "empty"}  # the tie, once
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "encoder.weight": "decoder.weight"}
    loaded = compress.load(tmp_path)
    assert loaded.encoder.weight is loaded.decoder.weight
    assert torch.equal(loaded.encoder.weight, model.encoder.weight)


@pytest.mark.parametrize("case, metadata, expected", [
    ("a name the model does not tie", {"encoder.weight": "decoder.weight", "encoder.bias": "decoder.bias"},
     "share storage"),
    ("a tensor the file lacks", {"encoder.weight": "decoder.missing"}, "does not hold"),
    ("a name the file also stores", {"encoder.weight": "decoder.weight", "decoder.bias": "encoder.bias"},
     "also stores"),
])
def test_hostile_tie_metadata_is_refused(case, metadata, expected, tied_kind, tmp_path):
    compress.save(build_model(tied_kind), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    if case == "a name the model does not tie":
        del tensors["encoder.bias"]
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt", **metadata})
    with pytest.raises(UserError) as error:
        compress.load(tmp_path)
    assert expected in _one_line(error.value), case


def _hostile(tmp_path, dense, weights=None, spec=None):
    compress.save(dense, tmp_path)
    if weights is not None:
        save_file(weights(load_file(tmp_path / WEIGHTS)), tmp_path / WEIGHTS)
    if spec is not None:
        (tmp_path / SPEC).write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(UserError) as error:
        compress.load(tmp_path)
    return error.value


@pytest.mark.parametrize("case, weights, expected", [
    ("wrong shape", lambda t: {**t, "visual.proj": torch.zeros(64, 3)}, ("visual.proj", "[64, 3]")),
    ("extra tensor", lambda t: {**t, "visual.backdoor": torch.zeros(1)}, ("visual.backdoor", "not a tensor of")),
    ("missing tensor", lambda t: {k: v for k, v in t.items() if k != "logit_scale"}, ("logit_scale", "missing")),
    ("wrong dtype", lambda t: {**t, "visual.proj": t["visual.proj"].int()}, ("visual.proj", "torch.int32")),
])
def test_hostile_weights_are_refused_by_name(case, weights, expected, dense, tmp_path):
    message = _one_line(_hostile(tmp_path, dense, weights=weights))
    assert all(part in message for part in expected), (case, message)


@pytest.mark.parametrize("case, spec, expected", [
    ("a weights file", {"kind": "open_clip", "model": MODEL, "model_kwargs": {"pretrained": "/tmp/evil.pt"}},
     "model_spec.model_kwargs.pretrained: unknown key"),
    ("a local-dir model", {"kind": "open_clip", "model": "local-dir:/tmp/evil"}, "model_spec.model"),
    ("a hub model", {"kind": "open_clip", "model": "hf-hub:evil/model"}, "model_spec.model"),
    ("a text encoder folder", {"kind": "image_student", "backbone": {"type": "torchvision", "name": "resnet18",
                                                                      "image_size": 32}, "embed_dim": 8,
                               "text_encoder": {"type": "sentence_transformers", "name": "/tmp/evil"}},
     "model_spec.text_encoder.name"),
])
def test_a_spec_naming_a_file_is_refused(case, spec, expected, dense, tmp_path):
    error = _hostile(tmp_path, dense, spec=spec)
    assert isinstance(error, SpecError) and expected in _one_line(error), case


@pytest.mark.parametrize("case, text", [("not JSON", "{'kind': "), ("NaN", '{"kind": "open_clip", "x": NaN}'),
                                        ("a list", "[1, 2]")])
def test_a_malformed_spec_file_is_refused(case, text, dense, tmp_path):
    error = _hostile(tmp_path, dense, spec=text)
    assert isinstance(error, ModelFolderError) and SPEC in _one_line(error), case


def test_a_broken_weights_file_or_an_empty_folder_is_refused(dense, tmp_path):
    compress.save(dense, tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError) as error:
        compress.load(tmp_path)
    assert "cannot be read as safetensors" in _one_line(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError) as error:
        compress.load(empty)
    assert f"has no {SPEC}" in _one_line(error.value)


# --- open_clip's local-dir layout ---------------------------------------------------------------------


def uniform_mlp_cut(dense):
    """Every MLP of both towers cut to half its units: a compact_clip open_clip's config still describes."""
    model = to_compact(clone(dense))
    for tower in ("image", "text"):
        for block in tower_blocks(model, tower):
            keep_neurons(block, range(0, block.mlp.hidden, 2))
    return refresh_spec(model)


OPEN_CLIP_EXPRESSIBLE = {"open_clip": lambda d: d, "text layers dropped": KINDS["text layers dropped"],
                         "MLPs cut to one width": uniform_mlp_cut}


@pytest.mark.parametrize("kind", list(OPEN_CLIP_EXPRESSIBLE))
def test_open_clip_local_dir_loads_in_open_clip(kind, dense, tmp_path):
    import open_clip

    model = OPEN_CLIP_EXPRESSIBLE[kind](dense)
    config = write_open_clip_dir(model, tmp_path)
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    diffs = check_open_clip_dir(model, tmp_path)  # create_model_and_transforms / get_tokenizer("local-dir:...")
    assert set(diffs) == {"image", "text", "preprocess", "tokens"}
    assert max(diffs.values()) < TOLERANCE, (kind, diffs)
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters()), kind


@pytest.mark.parametrize("kind", ["masked_clip", "pruned_clip", "low-rank compact_clip", "token-masked",
                                  "student_clip (ViT, resized inside)", "quantized (int8, of a pruned model)"])
def test_open_clip_layout_refuses_what_its_config_cannot_say(kind, dense, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LayoutError) as error:
        write_open_clip_dir(KINDS[kind](dense), out)
    assert "open_clip's layout holds the open_clip kind" in _one_line(error.value)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["rn50", "eva", "siglip", "coca"])
def test_open_clip_layout_of_a_text_cut_model_of_every_tower_kind(family, family_configs, tmp_path):  # noqa: F811
    """A compact model of a family whose image tower is a ResNet, a timm EVA or a timm ViT (SigLIP's blocks are
    compact blocks too) or CoCa's: the text tower's MLPs cut to one width; the image tower as its config builds
    it goes back under its own (timm's) names, and open_clip loads the folder with the same features."""
    from compress.models.pretrained import create_clip

    model = to_compact(clone(create_clip(config_name(family), None)))
    for block in tower_blocks(model, "text"):
        keep_neurons(block, range(block.mlp.hidden // 2))
    model = refresh_spec(model)
    write_open_clip_dir(model, tmp_path)
    diffs = check_open_clip_dir(model, tmp_path)
    assert max(diffs.values()) < TOLERANCE, (family, diffs)


@pytest.mark.slow
def test_open_clip_layout_refuses_a_resized_timm_tower(family_configs, tmp_path):  # noqa: F811
    """open_clip's config names a timm architecture, which has one shape: a SigLIP image tower with fewer heads
    has no open_clip form."""
    from compress.models.compact_clip import keep_heads
    from compress.models.pretrained import create_clip

    model = to_compact(clone(create_clip(config_name("siglip"), None)))
    keep_heads(tower_blocks(model, "image")[0], [0])
    out = tmp_path / "out"
    with pytest.raises(LayoutError) as error:
        write_open_clip_dir(refresh_spec(model), out)
    assert "visual.trunk.blocks.0 has 1 heads" in _one_line(error.value)
    assert not out.exists()


# --- torch.export programs ------------------------------------------------------------------------------

# a program must run where neither this package nor the libraries its models come from are installed
WITHOUT_THE_PACKAGE = r"""
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"compress", "foundation", "open_clip", "transformers", "sentence_transformers",
                                  "torchvision", "timm"}:
            raise ModuleNotFoundError(name + " is not installed here")

sys.meta_path.insert(0, Absent())
import torch

program = torch.export.load(sys.argv[1]).module()
with torch.no_grad():
    torch.save(program(*torch.load(sys.argv[2])), sys.argv[3])
"""


def _run_without_the_package(program: Path, inputs, tmp_path: Path) -> torch.Tensor:
    torch.save(list(inputs), tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", WITHOUT_THE_PACKAGE, str(program), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_export_programs_reproduce_torch_features(kind, dense, tmp_path):
    model = KINDS[kind](dense)
    manifest = export_program(model, tmp_path, max_batch=8)
    assert manifest["format"] == "torch_export" and manifest["model_kind"] == model.model_spec["kind"]
    assert [manifest["graphs"][t]["file"] for t in ("image", "text")] == ["image.pt2", "text.pt2"]
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == manifest
    diffs = check_export(model, tmp_path, batch=3)  # torch.export.load(...).module(), traced at batch 2
    assert set(diffs) == {"image", "text"} and max(diffs.values()) < TOLERANCE, (kind, diffs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["open_clip", "image_student (MiniLM text)", "quantized (int8, of a pruned model)"])
def test_torch_export_programs_run_with_torch_alone(kind, dense, tmp_path):
    model = KINDS[kind](dense)
    export_program(model, tmp_path / "programs")
    inputs = example_inputs(model, batch=3)
    with torch.no_grad():
        image = model.encode_image(inputs["images"], normalize=True)
        text = model.encode_text(inputs.get("captions", inputs["text"][0]), normalize=True)
    got_image = _run_without_the_package(tmp_path / "programs" / "image.pt2", [inputs["images"]], tmp_path)
    got_text = _run_without_the_package(tmp_path / "programs" / "text.pt2", inputs["text"], tmp_path)
    torch.testing.assert_close(got_image, image, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got_text, text, atol=TOLERANCE, rtol=0)


# --- the command line ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_command_line_writes_every_format(dense, tmp_path, capsys):
    from utils import export as export_cli

    model = pruned(dense)
    checkpoint = tmp_path / "pruned.pt"
    save_checkpoint({"model_spec": model.model_spec, "state_dict": model.state_dict(), "epoch": 1}, checkpoint)
    expected = {"safetensors": ({WEIGHTS, SPEC}, "max |compress.load(DIR) - torch|"),
                "torch_export": ({"image.pt2", "text.pt2", "preprocessing.json"}, "max |torch.export.load - torch|"),
                "onnx": ({"image_encoder.onnx", "text_encoder.onnx", "preprocessing.json"},
                         "max |onnxruntime - torch|")}
    for fmt, (files, check_line) in expected.items():
        export_cli.main([str(checkpoint), "--format", fmt, "--out", str(tmp_path / fmt)])
        out = capsys.readouterr().out
        assert check_line in out, fmt
        diffs = [float(part.split()[-1]) for part in out.rsplit(": ", 1)[1].split(", ")]
        assert len(diffs) == 2 and max(diffs) < TOLERANCE, (fmt, out)
        assert {p.name for p in (tmp_path / fmt).iterdir()} >= files, fmt
    # a model folder is an input too: the dense model from its safetensors folder, into open_clip's layout
    compress.save(dense, tmp_path / "dense")
    export_cli.main([str(tmp_path / "dense"), "--format", "open_clip", "--out", str(tmp_path / "open_clip")])
    out = capsys.readouterr().out
    assert "max |open_clip local-dir - torch|" in out and "tokens 0.00e+00" in out
    # the pruned model has no open_clip form: one line, exit 2, nothing written
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(checkpoint), "--format", "open_clip", "--out", str(tmp_path / "refused")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "open_clip's layout holds the open_clip kind" in err
    assert not (tmp_path / "refused").exists()


def test_export_command_line_refuses_a_hostile_folder(dense, tmp_path, capsys):
    from utils import export as export_cli

    compress.save(dense, tmp_path / "hostile")
    tensors = load_file(tmp_path / "hostile" / WEIGHTS)
    save_file({**tensors, "visual.proj": torch.zeros(2, 2)}, tmp_path / "hostile" / WEIGHTS)
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path / "hostile"), "--format", "onnx", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "visual.proj" in err and "[2, 2]" in err


def test_a_full_disk_while_exporting_is_one_line_and_leaves_no_graph(dense, tmp_path, small_disk):
    """A graph that does not fit (the tiny model's program is megabytes, the disk 64 KiB) is exit 2 with one
    line naming the file and the OS's reason; no half-written graph is left for a deployment to pick up. In a
    child process: torch's own writer, given a path, aborted the process on a full disk."""
    from conftest import run_bounded

    checkpoint = tmp_path / "dense.pt"
    save_checkpoint({"model_spec": dense.model_spec, "state_dict": dense.state_dict(), "epoch": 1}, checkpoint)
    result = run_bounded(["-m", "utils.export", checkpoint, "--format", "torch_export", "--out", small_disk / "out",
                          "--towers", "image"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot write {small_disk / 'out' / 'image.pt2'}: No space left on device; the "
                      "previous image.pt2, if any, is untouched"], result.stderr[-3000:]
    assert [p.name for p in (small_disk / "out").iterdir()] == []
