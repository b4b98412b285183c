"""Today's CLIP families through the operations, each at tiny size with random weights: an OpenAI-style ViT, its
QuickGELU twin, a ModifiedResNet (RN50's), ConvNeXt, MobileCLIP (timm's FastViT MCi), EVA, SigLIP (timm ViT with
an attention-pool head) and CoCa. Each family is an open_clip config of the real family's structure, shrunk (the
timm towers are timm's own architectures with smaller sizes, registered under names of their own); docs/families.md
is the family × operation table these tests back."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_evaluate_checkpoints import eval_root  # noqa: F401  (a fixture: the shapes and coco2017 eval root)

import compress

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

# timm architectures of the families, shrunk: (name registered here, timm architecture, its size arguments)
TINY_TIMM = {
    "clipc_tiny_convnext": ("convnext_atto", {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}),
    "clipc_tiny_mci": ("fastvit_mci0", {"layers": (1, 1, 1, 1), "embed_dims": (8, 16, 32, 64)}),
    # EVA02-B-16's own timm architecture: separate q/k/v, rotary attention with an inner norm, SwiGLU with one
    "clipc_tiny_eva02": ("eva02_base_patch16_clip_224", {"img_size": 32, "patch_size": 16, "embed_dim": 32,
                                                         "depth": 2, "num_heads": 2}),
    "clipc_tiny_siglip": ("vit_base_patch16_siglip_224", {"img_size": 32, "embed_dim": 32, "depth": 2,
                                                          "num_heads": 2}),
}

# the families' open_clip configs, shrunk (same keys as open_clip's RN50, convnext_tiny, MobileCLIP-S1, EVA02-B-16,
# ViT-B-16-SigLIP and coca_ViT-B-32 configs)
FAMILIES = {
    "vit": "clipc-vit-t2-32",
    "vit-quickgelu": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
                      "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16}},
    "rn50": {"embed_dim": 32, "text_cfg": TEXT,
             "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}},
    "convnext": {"embed_dim": 32, "text_cfg": TEXT,
                 "vision_cfg": {"timm_model_name": "clipc_tiny_convnext", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear", "image_size": 32}},
    "mobileclip": {"embed_dim": 32, "custom_text": True, "text_cfg": {**TEXT, "no_causal_mask": True},
                   "preprocess_cfg": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear"},
                   "vision_cfg": {"timm_model_name": "clipc_tiny_mci", "timm_model_pretrained": False,
                                  "timm_pool": "avg", "timm_proj": None, "image_size": 64}},
    "eva": {"embed_dim": 32, "custom_text": True, "text_cfg": TEXT,
            "vision_cfg": {"timm_model_name": "clipc_tiny_eva02", "timm_model_pretrained": False,
                           "timm_pool": "token", "timm_proj": None, "image_size": 32}},
    "coca": {"embed_dim": 32, "custom_text": True, "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {**TEXT, "attn_pooler_heads": 2},
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True}},
}
SIGLIP_TEXT = {**TEXT, "vocab_size": 64, "tokenizer_kwargs": {"clean": "canonicalize"}, "no_causal_mask": True,
               "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
SIGLIP_VISION = {"image_size": 32, "timm_model_name": "clipc_tiny_siglip", "timm_model_pretrained": False,
                 "timm_pool": "map", "timm_proj": "none"}
# SigLIP's published preprocessing (open_clip keeps it per weights tag; a config may carry it, as these do)
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                     "resize_mode": "squash"}
FAMILIES.update({
    "siglip": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True, "vision_cfg": SIGLIP_VISION,
               "preprocess_cfg": SIGLIP_PREPROCESS,
               "text_cfg": {**SIGLIP_TEXT, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}},
    "siglip2": {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True, "vision_cfg": SIGLIP_VISION,
                "preprocess_cfg": SIGLIP_PREPROCESS,
                "text_cfg": {**SIGLIP_TEXT, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
                             "act_kwargs": {"approximate": "tanh"}}},
})
CONV_FAMILIES = {"rn50", "convnext", "mobileclip"}
# families whose image tower is open_clip's VisionTransformer (the others' is a ResNet or a timm network)
OPEN_CLIP_VIT_FAMILIES = {"vit", "vit-quickgelu", "coca"}
# families whose image tower is a timm ViT whose blocks become compact blocks (SigLIP's, EVA's), and all those whose
# image tower the block operations (UPop, heads, Fisher, low-rank per block, token masking) reshape
TIMM_VIT_FAMILIES = {"siglip", "siglip2", "eva"}
TRANSFORMER_IMAGE_FAMILIES = OPEN_CLIP_VIT_FAMILIES | TIMM_VIT_FAMILIES
# families whose image tower's patch tokens token masking drops
TOKEN_MASK_FAMILIES = TRANSFORMER_IMAGE_FAMILIES


def save_stand_in_tokenizer(hub_cache, repo_id: str) -> None:
    """A word-level `tokenizers` tokenizer (24 words, pad 0, eos 1) in a Hugging Face hub cache under `repo_id`,
    standing in offline for SigLIP's sentencepiece tokenizer that open_clip asks the hub for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "one", "two", "three", "red", "blue", "green", "yellow", "circle",
             "circles", "square", "squares", "star", "triangles", "photo", "of", "small", "on", "plain",
             "background", "large"]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    revision = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    tokenizer.save_pretrained(repo / "snapshots" / revision)
    # transformers reads the repo's model config before its tokenizer's: an empty one names no model type
    (repo / "snapshots" / revision / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def config_name(family: str) -> str:
    return FAMILIES[family] if isinstance(FAMILIES[family], str) else f"clipc-test-{family}"


@pytest.fixture(scope="module")
def family_configs(tmp_path_factory):
    """The tiny timm architectures registered with timm and the families' configs with open_clip."""
    import open_clip
    import timm
    from timm.models import is_model, register_model

    from foundation.model_configs import register_model_configs

    for name, (base, sizes) in TINY_TIMM.items():
        if not is_model(name):
            def make(pretrained=False, _base=base, _sizes=sizes, **kwargs):
                return timm.create_model(_base, pretrained=False, **{**_sizes, **kwargs})
            make.__name__ = name
            register_model(make)
    hf_home = tmp_path_factory.mktemp("hf_home")
    for config in FAMILIES.values():
        repo_id = config["text_cfg"].get("hf_tokenizer_name") if isinstance(config, dict) else None
        if repo_id:
            save_stand_in_tokenizer(hf_home / "hub", repo_id)
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HOME", str(hf_home))
    patch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # read by huggingface_hub when it is imported, which an earlier test may have done
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path_factory.mktemp("configs")
    for family, config in FAMILIES.items():
        if isinstance(config, dict):
            (folder / f"{config_name(family)}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    register_model_configs()
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def teachers(family_configs, tmp_path_factory):
    """Each family's random-init CLIP saved as a checkpoint of ours (what --job clip writes): family -> path."""
    from compress.models.pretrained import create_clip

    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = create_clip(config_name(family))
        paths[family] = folder / f"{family}.pt"
        torch.save({"model_spec": model.model_spec, "state_dict": model.state_dict()}, paths[family])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_a_distill_teacher_with_its_own_text_tower(family, teachers):
    """--job distill builds a student of each family's teacher without --student-text: the student's text tower is
    the teacher's (same features), and a step's losses reach the student's image tower."""
    import compress
    from compress.models.registry import get_tokenizer, preprocess_config
    from training.distributed import DistInfo
    from training.jobs.distill import DistillJob
    from training.params import parse_args

    args = parse_args(["--job", "distill", "--train-data", "synthetic", "--teacher-model", config_name(family),
                       "--teacher-pretrained", str(teachers[family]), "--student", "mobilenet_v3_small",
                       "--distill-loss", "cosine,icl"])
    job = DistillJob(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    student = job.build_model()
    teacher = compress.load(str(teachers[family]))
    captions = ["one red circle", "two blue squares", "a green star", "three yellow triangles"]
    tokens = get_tokenizer(student.model_spec)(captions)
    assert torch.allclose(student.eval().encode_text(tokens, normalize=True),
                          teacher.encode_text(tokens, normalize=True), atol=1e-5)
    size = preprocess_config(teacher.model_spec)["image_size"]
    batch = {"image": torch.randn(4, 3, size, size), "text": tokens, "caption": captions}
    losses = job.loss(student.train(), batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.visual.parameters())


def test_an_open_clip_config_named_like_a_torchvision_network_is_a_clip_teacher():
    """open_clip's convnext_tiny is a CLIP (a --job distill teacher), torchvision's resnet50 an image teacher."""
    from compress.models.image_teachers import is_image_teacher_arch

    assert not is_image_teacher_arch("convnext_tiny")
    assert is_image_teacher_arch("resnet50") and is_image_teacher_arch("vgg11")


def _run_with(tmp_path, family, checkpoint):
    """LOGS/run whose checkpoints/epoch_1.pt is `checkpoint` (a --job clip run of the family's config)."""
    from test_evaluate_checkpoints import age

    run = tmp_path / family
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"job: clip\nmodel: {config_name(family)}\nname: {family}\n")
    torch.save(checkpoint, run / "checkpoints" / "epoch_1.pt")
    age(run / "checkpoints" / "epoch_1.pt")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_monitor_scores_and_profiles_every_family(family, teachers, eval_root, tmp_path):  # noqa: F811
    """A checkpoint of each family is scored (zero-shot, retrieval) and profiled, timm's attention-pool head
    (SigLIP) included."""
    from test_evaluate_checkpoints import csv_rows, monitor_args

    from utils import evaluate_checkpoints as monitor_cli

    checkpoint = {**torch.load(teachers[family], weights_only=True), "epoch": 1, "step": 1}
    run = _run_with(tmp_path, family, checkpoint)
    assert monitor_cli.main(monitor_args(run, eval_root, "--once", "--benchmarks", "zeroshot,retrieval")) == 0
    [row] = csv_rows(run)
    assert row["zeroshot/shapes/acc1"] != "" and row["retrieval/coco2017/mean_recall"] != ""
    assert float(row["macs_image"]) > 0 and float(row["macs_text"]) > 0 and float(row["params_image"]) > 0


def test_the_monitor_fails_when_it_scored_none_of_what_it_was_asked(eval_root, tmp_path, capsys):  # noqa: F811
    from test_evaluate_checkpoints import monitor_args

    from utils import evaluate_checkpoints as monitor_cli

    run = _run_with(tmp_path, "vit", {"model_spec": {"kind": "no such kind"}, "state_dict": {}})
    assert monitor_cli.main(monitor_args(run, eval_root, "--once", "--benchmarks", "zeroshot")) == 1
    assert "none of the 1 checkpoints to score could be scored" in capsys.readouterr().err


@pytest.fixture(scope="module")
def family_models(teachers):
    """Each family's model as compress.load rebuilds it from its checkpoint: family -> model."""
    import compress

    return {family: compress.load(str(path)) for family, path in teachers.items()}


def _inputs(model):
    from compress.models.registry import get_tokenizer, preprocess_config

    size = preprocess_config(model.model_spec)["image_size"]
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size), get_tokenizer(model.model_spec)(["one red circle", "a blue square"])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_of_every_family_round_trips_and_text_only_leaves_the_image_tower(family, family_models, tmp_path):
    """int8 of both towers reaches every nn.Linear the towers call (a conv tower's too) and reloads; `--towers
    text` changes no image feature."""
    import compress
    from compress.models.quantized import Int8Linear
    from compress.ops.quantize import linears_by_tower, quantize

    model = family_models[family]
    images, tokens = _inputs(model)
    with torch.no_grad():
        reference = model.encode_image(images), model.encode_text(tokens)
    both = quantize(model, towers=("image", "text"))
    assert both.model_spec["linears"] and linears_by_tower(both) == {"image": [], "text": []}  # none left in float
    assert any(isinstance(m, Int8Linear) for m in both.visual.modules()) or family == "rn50"
    compress.save(both, tmp_path / "int8")
    loaded = compress.load(str(tmp_path / "int8"))
    with torch.no_grad():
        image, text = loaded.encode_image(images), loaded.encode_text(tokens)
    cos = torch.nn.functional.cosine_similarity
    assert cos(image, reference[0]).min() > 0.95 and cos(text, reference[1]).min() > 0.95

    if family == "rn50":  # its attention pool's Linears are read as weights, never called
        with pytest.raises(ValueError, match="call no quantisable nn.Linear"):
            quantize(model, towers=("image",))
    text_only = quantize(model, towers=("text",))
    assert not any(isinstance(m, Int8Linear) for m in text_only.visual.modules())
    with torch.no_grad():
        assert torch.equal(text_only.encode_image(images), reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_of_every_family_matches_and_writes_its_preprocessing(family, family_models, tmp_path):
    """Both graphs reproduce the model's features in onnxruntime; preprocessing.json holds the family's own mean,
    std and resize (SigLIP 0.5/0.5 squashed, MobileCLIP 0/1 bilinear), its tokenizer's files beside a text graph
    whose tokenizer is no CLIP BPE (SigLIP's); MobileCLIP's graph is its re-parameterised inference form."""
    from compress.models.registry import preprocess_config
    from compress.ops.export import check_export, export_onnx, reparameterized

    model = family_models[family]
    manifest = export_onnx(model, tmp_path)
    diffs = check_export(model, tmp_path)
    assert set(diffs) == {"image", "text"} and max(diffs.values()) < 1e-4, diffs
    image = json.loads((tmp_path / "preprocessing.json").read_text())["graphs"]["image"]
    expected = preprocess_config(model.model_spec)
    assert image["mean"] == pytest.approx(expected["mean"]) and image["std"] == pytest.approx(expected["std"])
    resize = next(step for step in image["steps"] if step["op"] == "resize")
    if family.startswith("siglip"):
        assert image["mean"] == [0.5] * 3 and resize["rule"] == "to (height, width)"
        assert (tmp_path / manifest["graphs"]["text"]["tokenizer_dir"] / "tokenizer.json").is_file()
    if family == "mobileclip":
        assert image["mean"] == [0.0] * 3 and resize["interpolation"] == "bilinear"
        fused = reparameterized(copy.deepcopy(model))
        assert sum(1 for _ in fused.visual.modules()) < sum(1 for _ in model.visual.modules())


@pytest.fixture(scope="module")
def calibration(family_models):
    """Three calibration batches of 4 (random images at each family's size, its tokenizer's captions)."""
    captions = ["one red circle", "two blue squares", "a green star", "three yellow triangles"]
    out = {}
    for family, model in family_models.items():
        images, _ = _inputs(model)
        tokens = compress.get_tokenizer(model.model_spec)(captions)
        generator = torch.Generator().manual_seed(2)
        out[family] = [{"image": torch.randn(4, *images.shape[1:], generator=generator), "text": tokens}
                       for _ in range(3)]
    return out


def _image_costs(model):
    """(parameters, MACs) of the image tower for one image (compress.ops.profile)."""
    from compress.ops.profile import tower_costs

    images, tokens = _inputs(model)
    costs = tower_costs(model.eval(), images, tokens)
    return costs["params_image"], costs["macs_image"]


def _assert_dense_equivalent(model, dense):
    """`model`'s image tower is made of compact blocks and computes what `dense`'s does (< 1e-5)."""
    from compress.models.compact_clip import CompactBlock, tower_blocks

    assert all(isinstance(block, CompactBlock) for block in tower_blocks(model, "image"))
    images, _ = _inputs(dense)
    with torch.no_grad():
        difference = (model.eval().encode_image(images) - dense.eval().encode_image(images)).abs().max()
    assert difference < 1e-5, float(difference)


def _round_trip(model):
    """`model` rebuilt from its spec and weights (what compress.load makes of its checkpoint) gives its features."""
    images, tokens = _inputs(model)
    loaded = compress.load({"model_spec": model.model_spec, "state_dict": model.state_dict()})
    with torch.no_grad():
        for got, expected in ((loaded.encode_image(images), model.eval().encode_image(images)),
                              (loaded.encode_text(tokens), model.encode_text(tokens))):
            assert torch.allclose(got, expected, atol=1e-5)
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_operations_apply_to_every_transformer_tower_and_say_which_they_leave(family, family_models,
                                                                                    calibration, caplog):
    """Low-rank, head pruning, Fisher pruning and text-layer dropping on both towers: a transformer tower (open_clip's,
    or a timm ViT's as in SigLIP and EVA, whose blocks first become compact blocks computing what they did: EVA's
    with its rotary attention, inner norms and SwiGLU, whose gate is factorised too) is reshaped (CoCa's text tower
    with its cls token included), any other tower is left as it is with one warning line, and each result reloads
    from its spec. Token masking drops tokens of a ViT image tower (fewer MACs, other features), and refuses an
    image tower it cannot mask."""
    from compress.models.compact_clip import clone, to_compact
    from compress.ops.fisher_prune import fisher_prune
    from compress.ops.heads import prune_heads_by_sensitivity
    from compress.ops.lowrank import low_rank
    from compress.ops.text_layers import drop_text_layers
    from compress.ops.token_mask import mask_tokens

    model, batches = family_models[family], calibration[family]
    both = ("image", "text")
    image_reshaped = family in TRANSFORMER_IMAGE_FAMILIES
    if image_reshaped:
        _assert_dense_equivalent(to_compact(clone(model)), model)
    results = {
        "lowrank": low_rank(model, 0.5, towers=both),
        "heads": prune_heads_by_sensitivity(model, 1, batches, towers=both),
        "fisher": fisher_prune(model, batches, 0.6, towers=both),
        "text_layers": drop_text_layers(model, keep_first=1),
    }
    left = [r.getMessage() for r in caplog.records if "is no open_clip transformer" in r.getMessage()]
    assert len(left) == (0 if image_reshaped else 3), left
    for name, result in results.items():
        blocks = result.model_spec.get("blocks", {})
        assert any(".resblocks." in block and not block.startswith("visual.") for block in blocks) or \
            name == "text_layers", name
        assert any(block.startswith("visual.") for block in blocks) == (image_reshaped and name != "text_layers")
        _round_trip(result)
    assert results["text_layers"].model_spec["text_layers"] == [0]
    if family == "eva":  # the gate is a Linear of the MLP like the others; heads go whole
        blocks = results["lowrank"].model_spec["blocks"]
        assert all("c_gate" in blocks[f"visual.trunk.blocks.{i}"]["ranks"] for i in range(2))
        assert sum(shape["heads"] for shape in results["heads"].model_spec["blocks"].values()) == 7  # of 4 + 4
    images, _ = _inputs(model)
    dense_params, dense_macs = _image_costs(model)
    if family in TOKEN_MASK_FAMILIES:
        masked = mask_tokens(model, 0.5)
        with torch.no_grad():
            assert not torch.allclose(masked.encode_image(images), model.encode_image(images))
        assert masked.model_spec["token_mask"] == {"drop": 0.5, "seed": 0, "per_image": True}
        assert _image_costs(masked)[1] < dense_macs
        _round_trip(masked)
    else:
        with pytest.raises(ValueError, match="no patch_dropout hook"):
            mask_tokens(model, 0.5)
    if image_reshaped:
        params, macs = _image_costs(results["lowrank"])
        assert params < dense_params and macs < dense_macs
    else:
        if family == "rn50":  # its attention pool's Linears are read as weights, never called
            with pytest.raises(ValueError, match="calls no nn.Linear to factorise"):
                low_rank(model, 0.5, towers=("image",))
        else:  # every Linear the tower calls (ConvNeXt's and FastViT's MLPs, a timm ViT's blocks) is factorised
            factorised = low_rank(model, 0.5, towers=("image",))
            assert factorised.model_spec["linear_ranks"] and not factorised.model_spec["blocks"]
            _round_trip(factorised)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_upop_searches_and_cuts_every_transformer_tower_of_every_family(family, teachers, family_models, caplog,
                                                                        tmp_path):
    """--job prune's search (masks, a KD loss step reaching them) and surgery on each family: the transformer towers
    (a timm ViT's included, which before any cut computes what the dense tower does) are pruned to fewer parameters
    and MACs, any other image tower is named in one warning line at start and kept whole; the surgically pruned
    model reloads from its spec."""
    import types

    from compress.models import pruning
    from training.distributed import DistInfo
    from training.jobs.prune import PruneJob
    from training.params import parse_args

    args = parse_args(["--job", "prune", "--train-data", "synthetic", "--model", config_name(family),
                       "--pretrained", str(teachers[family]), "--batch-size", "4", "--epochs", "2",
                       "--search-epochs", "1", "--p", "0.5", "--KD", "--logs", str(tmp_path), "--name", family,
                       "--report-to", "none"])
    job = PruneJob(args, DistInfo())
    model = job.build_model()
    ctx = types.SimpleNamespace(unwrapped_model=model, data=types.SimpleNamespace(num_batches=4), step=0,
                                scaler=None, log_scalars=lambda scalars: None)
    job.on_train_start(ctx)
    left = [r.getMessage() for r in caplog.records if "is no open_clip transformer" in r.getMessage()]
    image_pruned = family in TRANSFORMER_IMAGE_FAMILIES
    assert len(left) == (0 if image_pruned else 1) and all("UPop prunes the text tower only" in m for m in left)
    assert any(key.startswith("image.") for key in job.masks) == image_pruned
    rotary = [r.getMessage() for r in caplog.records if "rotates pairs of head dimensions" in r.getMessage()]
    assert len(rotary) == (family == "eva")
    if family == "eva":  # rotary attention: searched by whole heads, whatever --prune-heads says
        assert {key.rsplit(".", 1)[1] for key in job.masks if key.startswith("image.")} == {"head", "mlp"}
    if image_pruned:  # all-ones masks: the dense function
        _assert_dense_equivalent(model, family_models[family])
        model.train()
    images, tokens = _inputs(family_models[family])
    job.loss(model, {"image": torch.cat([images] * 2), "text": torch.cat([tokens] * 2)})["loss"].backward()
    assert all(mask.grad is not None for mask in job.masks.values())
    # UPop's masks mid-search: cut entries 0, the rest a fraction (folded into the kept weights by the surgery)
    masks = {key: (torch.arange(len(mask)) % 2 == 0).float() * 0.75 for key, mask in job.masks.items()}
    pruned = pruning.prune_clip(model, masks)
    assert pruned.model_spec["kind"] == "pruned_clip"
    with torch.no_grad():  # the pruned model is the masked one (through EVA's inner norms too)
        masked = pruning.attach_masks(pruning.clear_masks(model), masks).eval()
        assert torch.allclose(pruned.eval().encode_image(images), masked.encode_image(images), atol=1e-5)
        assert torch.allclose(pruned.encode_text(tokens), masked.encode_text(tokens), atol=1e-5)
    if image_pruned:
        assert any(name.startswith("visual.") for name in pruned.model_spec["blocks"])
        dense_params, dense_macs = _image_costs(family_models[family])
        params, macs = _image_costs(pruned)
        assert params < dense_params and macs < dense_macs
    _round_trip(pruned)
