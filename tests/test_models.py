"""One builder of a CLIP from a name and weights (compress.models.pretrained.create_clip), shared by the trainer,
eval and the tools; the image preprocessing of its open_clip config (mean, std, interpolation, resize mode,
size) reaches both the transform the trainer feeds its images through and the one eval scores with, while an
OpenAI-style config keeps exactly OpenAI's transform."""
import json
from types import SimpleNamespace

import open_clip
import pytest
import torch
from conftest import SRC
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms as T

import compress
import eval as clip_eval
from compress.models import pretrained
from compress.models.registry import open_clip_preprocess
from compress.models.spec import SpecError, validate_spec
from compress.ops.quantize import spec_image_size
from eval.models import open_clip_train_spec
from training.jobs.clip import ClipJob

torch.set_num_threads(1)
SQUASH_MODEL = "clipc-test-squash-32"
SQUASH_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
OPENAI_MODEL = "clipc-vit-t2-32"


@pytest.fixture(scope="module")
def squash_config(tmp_path_factory):
    """clipc-vit-t2-32 with one layer per tower (an architecture of its own, so no Hugging Face folder is
    matched to it), registered under its own name with its own `preprocess_cfg`."""
    config = json.loads((SRC / "foundation" / "configs" / f"{OPENAI_MODEL}.json").read_text())
    config["vision_cfg"]["layers"] = config["text_cfg"]["layers"] = 1
    path = tmp_path_factory.mktemp("configs") / f"{SQUASH_MODEL}.json"
    path.write_text(json.dumps({**config, "preprocess_cfg": SQUASH_CFG}))
    open_clip.add_model_config(path)
    return SQUASH_MODEL


def train_model_and_transform(model_name, weights=None):
    """The model `--job clip --model NAME --pretrained WEIGHTS` trains, and the transform of its images."""
    args = SimpleNamespace(model=model_name, pretrained=weights, grad_checkpointing=False, local_loss=False,
                           gather_with_grad=False, distill_model=None, distill_pretrained=None)
    job = ClipJob(args, SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")))
    model = job.build_model()
    transform, _ = job.data_transforms(model)
    return model, transform


def normalize_of(transform):
    (normalize,) = [t for t in transform.transforms if isinstance(t, T.Normalize)]
    return list(normalize.mean), list(normalize.std)


def stripes(width=96, height=32):
    """Red, green and blue vertical thirds: a squash keeps red left and blue right, a centre crop only green."""
    image = Image.new("RGB", (width, height))
    for third, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (third * width // 3, 0, (third + 1) * width // 3, height))
    return image


def assert_squashes_with_its_own_stats(transform, size=32):
    assert normalize_of(transform) == (SQUASH_CFG["mean"], SQUASH_CFG["std"])
    resize = transform.transforms[0]
    assert isinstance(resize, T.Resize) and tuple(resize.size) == (size, size)
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    assert not any(isinstance(t, T.CenterCrop) for t in transform.transforms)
    pixels = transform(stripes())
    assert pixels.shape == (3, size, size)
    # (x - 0.5) / 0.5: a full channel is 1, an empty one -1
    torch.testing.assert_close(pixels[:, size // 2, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(pixels[:, size // 2, -1], torch.tensor([-1.0, -1.0, 1.0]))


def test_the_config_preprocessing_reaches_training_and_eval(squash_config, tmp_path):
    model, train_transform = train_model_and_transform(squash_config)
    assert_squashes_with_its_own_stats(train_transform)
    # the config's preprocess_cfg is no architecture argument: the model is the config's architecture
    assert len(model.visual.transformer.resblocks) == len(model.transformer.resblocks) == 1
    assert open_clip.get_model_preprocess_cfg(model)["resize_mode"] == "squash"

    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    trained, _ = train_model_and_transform(squash_config, str(weights))
    checkpoint = {"epoch": 1, "model_spec": trained.model_spec, "state_dict": trained.state_dict()}
    assert_squashes_with_its_own_stats(compress.get_preprocess(trained.model_spec))
    assert_squashes_with_its_own_stats(clip_eval.load_encoder(checkpoint).preprocess)
    assert_squashes_with_its_own_stats(clip_eval.load_encoder(squash_config, pretrained=str(weights)).preprocess)


def test_an_openai_style_config_keeps_openais_transform(tmp_path):
    today = image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    model, train_transform = train_model_and_transform(OPENAI_MODEL)
    assert model.model_spec == {"kind": "open_clip", "model": OPENAI_MODEL}
    checkpoint = {"epoch": 1, "model_spec": model.model_spec, "state_dict": model.state_dict()}
    image = stripes()
    for transform in (train_transform, compress.get_preprocess(model.model_spec),
                      clip_eval.load_encoder(checkpoint).preprocess):
        assert normalize_of(transform) == (list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD))
        assert [type(t) for t in transform.transforms] == [type(t) for t in today.transforms]
        assert transform.transforms[0].interpolation == T.InterpolationMode.BICUBIC
        assert torch.equal(transform(image), today(image))


def test_a_stock_siglip_architecture_gets_its_published_preprocessing():
    """open_clip keeps SigLIP's preprocessing with its weights tags; a local copy of the weights gets it too."""
    siglip = open_clip_preprocess("ViT-B-16-SigLIP")
    assert (siglip["mean"], siglip["std"], siglip["resize_mode"]) == ([0.5] * 3, [0.5] * 3, "squash")
    transform = compress.get_preprocess({"kind": "open_clip", "model": "ViT-B-16-SigLIP"})
    assert normalize_of(transform) == ([0.5] * 3, [0.5] * 3)
    assert not any(isinstance(t, T.CenterCrop) for t in transform.transforms)
    openai = open_clip_preprocess("ViT-B-32")
    assert (openai["mean"], openai["std"], openai["resize_mode"]) == (
        list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD), "shortest")


def test_a_spec_records_preprocessing_strictly():
    spec = {"kind": "open_clip", "model": OPENAI_MODEL,
            "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                           "resize_mode": "squash", "fill_color": 0}}
    assert validate_spec(spec) == spec
    assert_squashes_with_its_own_stats(compress.get_preprocess(spec))
    assert spec_image_size(spec) == 32  # what export and quantize feed it, with no centre crop to read
    for key, bad in [("resize_mode", "stretch"), ("interpolation", "nearest"), ("fill_color", 256),
                     ("fill_color", "0"), ("mean", [0.5, 0.5])]:
        with pytest.raises(SpecError, match=f"model_spec.preprocess.{key}"):
            validate_spec({**spec, "preprocess": {**spec["preprocess"], key: bad}})
    # an open_clip_train run's transform flags land in the spec over the architecture's preprocessing
    params = {"model": OPENAI_MODEL, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
              "image_interpolation": "bilinear", "image_resize_mode": "squash"}
    assert open_clip_train_spec(params)["preprocess"] == spec["preprocess"]


def test_training_eval_and_the_tools_share_one_builder():
    import eval.models
    import training.jobs.clip
    import training.jobs.distill
    import training.jobs.prune
    import utils.posttrain

    for module in (training.jobs.clip, training.jobs.distill, training.jobs.prune, eval.models, utils.posttrain):
        assert module.create_clip is pretrained.create_clip, module.__name__
    assert not (SRC / "training" / "models.py").exists()


def test_bad_sources_are_one_line_user_errors():
    with pytest.raises(pretrained.ModelSourceError, match="neither an open_clip model config"):
        pretrained.create_clip("no-such-model")
    with pytest.raises(ValueError, match="neither a file nor a tag"):
        pretrained.create_clip(OPENAI_MODEL, "missing-weights")
