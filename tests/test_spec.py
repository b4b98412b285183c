"""compress.models.spec's schema language: the one translation of renamed spec keys (an older student_clip
checkpoint loads into the same model as one written now), and the cascade recipes checked in the same
language (their refusals are its one-line SpecErrors, every config under scripts/experiments/ passes)."""
import copy
from pathlib import Path

import pytest
import tomllib
import torch

import compress
from compress.models.registry import build_model
from compress.models.spec import SpecError, validate_spec
from compress.models.students import student_clip_spec, student_image_spec
from utils.cascade import build_parser, read_experiment
from utils.cascade.recipes import normalize_recipe, plain_level, recipe_kind

REPO = Path(__file__).resolve().parents[1]
MODEL = "clipc-vit-t2-32"


@pytest.fixture(scope="module")
def student():
    """A torchvision student CLIP as written now, and the same spec with the tower's older key names."""
    spec = student_clip_spec(student_image_spec("resnet18", MODEL, image_size=32), MODEL)
    tower = spec["image_tower"]
    old = copy.deepcopy(spec)
    old["image_tower"] = {"type": "torchvision", "arch": tower["name"], "input_size": tower["image_size"],
                          "freeze_backbone": tower["freeze_backbone"]}
    torch.manual_seed(0)
    return spec, old, build_model(spec).eval()


def test_an_old_student_clip_spec_loads_into_the_same_model_as_the_new_one(student):
    spec, old, model = student
    assert {"name", "image_size"} <= set(spec["image_tower"]) and not {"arch", "input_size"} & set(spec["image_tower"])
    state = {k: v.clone() for k, v in model.state_dict().items()}

    loaded = compress.load({"model_spec": old, "state_dict": state})
    assert loaded.model_spec == spec  # the renamed spec is the one the model carries (and any file it writes)
    images = torch.randn(2, 3, 48, 48)  # resized inside to the tower's 32 px
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=0, atol=0)
    assert loaded.visual.image_size == model.visual.image_size == 32

    # a wrapper kind checks its base with the same schema, so a quantized old student is renamed too
    quantized = {"kind": "quantized", "base": old, "scheme": "int8_dynamic", "linears": ["visual.net.fc"]}
    assert validate_spec(quantized)["base"] == spec


def test_a_renamed_key_is_refused_beside_its_new_name_and_a_hostile_name_under_either(student):
    spec, old, _ = student
    both = copy.deepcopy(spec)
    both["image_tower"]["arch"] = "resnet18"
    with pytest.raises(SpecError, match=r"^model_spec\.image_tower\.arch: given besides 'name'"):
        validate_spec(both)
    for tower in (spec["image_tower"], old["image_tower"]):
        key = "name" if "name" in tower else "arch"
        hostile = {**spec, "image_tower": {**tower, key: "os.system"}}
        with pytest.raises(SpecError) as error:
            compress.load({"model_spec": hostile, "state_dict": {}})
        message = str(error.value)
        assert message.startswith("model_spec.image_tower.name: 'os.system' is not a torchvision classification")
        assert "\n" not in message


def test_a_bad_recipe_is_refused_by_the_shared_language_in_one_line_naming_the_key_path():
    with pytest.raises(SpecError) as error:
        normalize_recipe("fisher", {"mac_constraint": 0.5, "towers": ["image", "vision"]})
    message = str(error.value)
    assert message.startswith("fisher.towers = ['image', 'vision']: towers whose blocks are pruned"), message
    assert "fisher.towers[1]: 'vision' is not one of ['image', 'text']" in message and "\n" not in message
    with pytest.raises(SpecError, match=r"^token_mask\.drop = 1\.0: .*1\.0 is outside \[0\.0, 1\.0\)"):
        normalize_recipe("token_mask", {"drop": 1.0})
    with pytest.raises(SpecError, match=r"^distill\.epochs = True: epochs of the distill run \(expected an integer"):
        normalize_recipe("distill", {"student": "resnet18", "epochs": True})
    with pytest.raises(SpecError, match=r"^distill\.student: missing \(the student"):
        normalize_recipe("distill", {"epochs": 2})


@pytest.mark.parametrize("config", sorted((REPO / "scripts" / "experiments").glob("*.toml")), ids=lambda p: p.stem)
def test_every_experiment_config_names_valid_levels(config):
    experiment = read_experiment(str(config), build_parser().parse_args(["--config", str(config)]))
    assert experiment.levels == tomllib.loads(config.read_text())["levels"]
    for entry in experiment.levels:
        kind = recipe_kind(entry)
        if kind is None:
            assert plain_level(entry).name()
        else:
            params = normalize_recipe(kind, entry[kind])
            assert set(entry[kind]) <= set(params) and all(params[k] == v for k, v in entry[kind].items())
