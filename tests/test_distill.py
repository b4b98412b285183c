"""Distillation: the five losses against hand-computed values, student towers, TinyCLIP weight inheritance,
and a real `python -m training.main --job distill` run whose checkpoint loads with compress.load."""
import json
import math

import pytest
import torch
from conftest import run_trainer

from compress.ops.distill_losses import affinity_loss, cosine_loss, crd_loss, fd_loss, icl_loss

# --- losses, by hand ------------------------------------------------------------------------------------

# two image/text pairs, unit vectors, so the 2×2 affinity matrices are easy to write down
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
TEACHER_IMAGE = torch.tensor([[0.8, 0.6], [0.0, 1.0]])


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _matmul_t(a, b, scale):
    return [[scale * sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def _transpose(m):
    return [list(col) for col in zip(*m)]


def test_cosine_loss_by_hand():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    # cos = 1 and 1/√2
    assert cosine_loss(student, teacher).item() == pytest.approx(((1 - 1) + (1 - 1 / math.sqrt(2))) / 2, abs=1e-6)


def test_fd_loss_normalises_before_mse():
    # [3, 4] → [0.6, 0.8]; against [1, 0]: squared errors 0.16 and 0.64, mean 0.4
    assert fd_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0, 0.0]])).item() == pytest.approx(0.4, abs=1e-6)


def test_icl_loss_by_hand():
    # logits_per_image = [[1, .6], [0, .8]], logits_per_text = its transpose, scale 1
    per_image = (math.log(math.exp(1) + math.exp(0.6)) - 1 + math.log(math.exp(0) + math.exp(0.8)) - 0.8) / 2
    per_text = (math.log(math.exp(1) + math.exp(0)) - 1 + math.log(math.exp(0.6) + math.exp(0.8)) - 0.8) / 2
    assert icl_loss(IMAGE, TEXT, 1.0).item() == pytest.approx((per_image + per_text) / 2, abs=1e-6)
    # the scale multiplies the logits: scale 2 gives the same as doubling the features' dot products
    doubled = (math.log(math.exp(2) + math.exp(1.2)) - 2 + math.log(1 + math.exp(1.6)) - 1.6) / 2
    doubled_t = (math.log(math.exp(2) + 1) - 2 + math.log(math.exp(1.2) + math.exp(1.6)) - 1.6) / 2
    assert icl_loss(IMAGE, TEXT, 2.0).item() == pytest.approx((doubled + doubled_t) / 2, abs=1e-6)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _cross_entropy(p, q):
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def _both_directions(student_scale, teacher_scale):
    s = _matmul_t(IMAGE.tolist(), TEXT.tolist(), student_scale)
    t = _matmul_t(TEACHER_IMAGE.tolist(), TEXT.tolist(), teacher_scale)
    return [(s, t), (_transpose(s), _transpose(t))]


def test_crd_loss_by_hand():
    expected = 0.0
    for s, t in _both_directions(2.0, 3.0):
        expected += 0.5 * sum(_kl(_softmax(tr), _softmax(sr)) for sr, tr in zip(s, t)) / len(s)
    value = crd_loss(IMAGE, TEXT, TEACHER_IMAGE, TEXT, 2.0, 3.0).item()
    assert value == pytest.approx(expected, abs=1e-6)
    assert crd_loss(IMAGE, TEXT, IMAGE, TEXT, 2.0, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_affinity_loss_by_hand_and_its_relation_to_crd():
    expected, teacher_entropy = 0.0, 0.0
    for s, t in _both_directions(2.0, 3.0):
        expected += 0.5 * sum(_cross_entropy(_softmax(tr), _softmax(sr)) for sr, tr in zip(s, t)) / len(s)
        teacher_entropy += 0.5 * sum(_cross_entropy(_softmax(tr), _softmax(tr)) for tr in t) / len(t)
    value = affinity_loss(IMAGE, TEXT, TEACHER_IMAGE, TEXT, 2.0, 3.0).item()
    assert value == pytest.approx(expected, abs=1e-6)
    # soft cross-entropy = KL + the teacher's entropy
    assert value == pytest.approx(crd_loss(IMAGE, TEXT, TEACHER_IMAGE, TEXT, 2.0, 3.0).item() + teacher_entropy,
                                  abs=1e-6)


# --- students -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50"])
def test_torchvision_students_project_to_the_teacher_embedding(arch):
    from compress.models.registry import build_model
    from compress.models.students import student_clip_spec, student_image_spec

    spec = student_clip_spec(student_image_spec(arch, "clipc-vit-t2-32", image_size=32), "clipc-vit-t2-32")
    model = build_model(spec).eval()
    features = model.encode_image(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 64)  # clipc-vit-t2-32's embed_dim
    head = model.visual.net.get_submodule(model.visual.head_name)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 64


def test_freeze_backbone_trains_only_the_head_and_keeps_batchnorm_statistics():
    from compress.models.registry import build_model
    from compress.models.students import student_clip_spec, student_image_spec

    spec = student_clip_spec(student_image_spec("resnet18", "clipc-vit-t2-32", image_size=32, freeze_backbone=True),
                             "clipc-vit-t2-32")
    model = build_model(spec).train()
    trainable = [n for n, p in model.visual.named_parameters() if p.requires_grad]
    assert trainable == ["net.fc.weight", "net.fc.bias"]
    before = model.visual.net.bn1.running_mean.clone()
    model.encode_image(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, model.visual.net.bn1.running_mean)


def test_student_pretrained_fills_the_backbone(tmp_path):
    import torchvision

    from compress.models.registry import build_model
    from compress.models.students import load_torchvision_weights, student_clip_spec, student_image_spec

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(student_clip_spec(student_image_spec("resnet18", "clipc-vit-t2-32"), "clipc-vit-t2-32"))
    load_torchvision_weights(model.visual, str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.visual.net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.visual.net.fc.out_features == 64


def _teacher_visual():
    import open_clip

    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    return open_clip.create_model("clipc-vit-t2-64").eval()


def test_inheriting_the_whole_teacher_reproduces_it():
    from compress.models.registry import build_model
    from compress.models.students import inherit_vit_from_teacher, student_clip_spec, student_image_spec

    teacher = _teacher_visual()
    student = build_model(student_clip_spec(student_image_spec("teacher", "clipc-vit-t2-64"), "clipc-vit-t2-64")).eval()
    inherit_vit_from_teacher(student.visual.net, teacher.visual, [0, 1])
    images = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(student.encode_image(images), teacher.encode_image(images), rtol=0, atol=0)


def test_inheritance_keeps_chosen_layers_leading_heads_and_dims():
    from compress.models.registry import build_model
    from compress.models.students import inherit_vit_from_teacher, student_clip_spec, student_image_spec

    teacher = _teacher_visual()  # width 128, head width 64 (2 heads), 2 layers, 64 px / patch 8
    spec = student_image_spec("teacher", "clipc-vit-t2-64", image_size=32, width=64, layers=1)
    student = build_model(student_clip_spec(spec, "clipc-vit-t2-64"))
    inherit_vit_from_teacher(student.visual.net, teacher.visual, [1])
    t_block, s_block = teacher.visual.transformer.resblocks[1], student.visual.net.transformer.resblocks[0]
    t_qkv = t_block.attn.in_proj_weight
    expected_qkv = torch.cat([t_qkv[0:64, :64], t_qkv[128:192, :64], t_qkv[256:320, :64]])  # leading head of q, k, v
    assert torch.equal(s_block.attn.in_proj_weight, expected_qkv)
    assert torch.equal(s_block.attn.out_proj.weight, t_block.attn.out_proj.weight[:64, :64])
    assert torch.equal(s_block.mlp.c_fc.weight, t_block.mlp.c_fc.weight[:256, :64])
    assert torch.equal(s_block.mlp.c_proj.weight, t_block.mlp.c_proj.weight[:64, :256])
    assert torch.equal(student.visual.net.proj, teacher.visual.proj[:64])
    # 8×8 patch grid resized to 4×4; the class token's embedding kept
    assert student.visual.net.positional_embedding.shape == (17, 64)
    assert torch.equal(student.visual.net.positional_embedding[0], teacher.visual.positional_embedding[0, :64])
    assert student.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 128)


# --- the job, for real ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A random-init clipc-vit-t2-32 saved as one of our checkpoints (what --job clip writes)."""
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clipc-vit-t2-32")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model_spec": open_clip_spec("clipc-vit-t2-32"), "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_distill_job_checkpoint_loads_and_encodes_in_the_teacher_space(tiny_corpus, teacher_checkpoint, tmp_path):
    import compress
    from eval.models import load_encoder

    run_trainer(["--job", "distill", "--teacher-model", "clipc-vit-t2-32",
                 "--teacher-pretrained", str(teacher_checkpoint),
                 "--student", "mobilenet_v3_small", "--distill-loss", "cosine,fd,icl,crd,affinity",
                 "--train-data", str(tiny_corpus / "train.tsv"), "--batch-size", "16", "--workers", "0",
                 "--epochs", "1", "--stop-after-steps", "3", "--log-every-n-steps", "1", "--report-to", "none",
                 "--logs", str(tmp_path), "--name", "distill"])
    checkpoint = tmp_path / "distill" / "checkpoints" / "epoch_latest.pt"
    student = compress.load(str(checkpoint))
    assert student.model_spec["kind"] == "student_clip"
    teacher = compress.load(str(teacher_checkpoint))
    tokens = compress.get_tokenizer(student.model_spec)(["two large red circles", "a blue square"])
    # the frozen teacher text tower went into the student unchanged
    assert torch.equal(student.encode_text(tokens), teacher.encode_text(tokens))
    encoder = load_encoder(str(checkpoint))
    images = torch.randn(2, 3, 32, 32)
    features = encoder.encode_image(images)
    assert features.shape == (2, 64) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    # every step logged each of the five weighted losses
    logged = [json.loads(line) for line in (tmp_path / "distill" / "results.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [1, 2, 3]
    for name in ("cosine", "fd", "icl", "crd", "affinity"):
        assert all(math.isfinite(entry[f"train/{name}_loss"]) for entry in logged)


def test_distill_job_builds_an_inherited_vit_student(teacher_checkpoint):
    """The flags wire through: --student teacher + shrink + --inherit-from-teacher (no training loop needed)."""
    from training.distributed import DistInfo
    from training.jobs.distill import DistillJob
    from training.params import parse_args

    args = parse_args(["--job", "distill", "--train-data", "synthetic", "--teacher-model", "clipc-vit-t2-32",
                       "--teacher-pretrained", str(teacher_checkpoint), "--student", "teacher", "--student-layers", "1",
                       "--student-width", "32", "--inherit-from-teacher", "--inherit-layers", "1",
                       "--freeze-backbone", "--distill-loss", "fd"])
    job = DistillJob(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    model = job.build_model()
    teacher_block = job.teacher.visual.transformer.resblocks[1]
    assert torch.equal(model.visual.net.transformer.resblocks[0].mlp.c_fc.weight,
                       teacher_block.mlp.c_fc.weight[:128, :32])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["visual.net.proj"]


def test_student_text_tower_trains_through_the_caption_losses(teacher_checkpoint):
    """--student-text: the student gets its own text tower; ICL (both directions) and CRD reach it."""
    from compress.models.registry import get_tokenizer
    from training.distributed import DistInfo
    from training.jobs.distill import DistillJob
    from training.params import parse_args

    args = parse_args(["--job", "distill", "--train-data", "synthetic", "--teacher-model", "clipc-vit-t2-32",
                       "--teacher-pretrained", str(teacher_checkpoint), "--student", "resnet18",
                       "--student-text", "clipc-vit-t2-32", "--distill-loss", "icl,crd"])
    job = DistillJob(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    model = job.build_model()
    assert all(p.requires_grad for p in model.text.parameters()) and model.logit_scale.requires_grad
    captions = ["one red circle", "two blue squares", "a green star", "three yellow triangles"]
    batch = {"image": torch.randn(4, 3, 32, 32), "text": get_tokenizer(model.model_spec)(captions), "caption": captions}
    losses = job.loss(model.train(), batch)
    losses["loss"].backward()
    assert set(losses) >= {"loss", "icl_loss", "crd_loss"}
    assert model.text.token_embedding.weight.grad.abs().sum() > 0
    assert model.visual.net.fc.weight.grad.abs().sum() > 0


# --- SigLIP's sigmoid loss ------------------------------------------------------------------------------

# a module-scoped fixture of tests/test_families.py: the families' tiny configs, SigLIP's stand-in tokenizer
from test_families import config_name, family_configs  # noqa: E402,F401


@pytest.fixture(scope="module")
def siglip_teacher(family_configs, tmp_path_factory):  # noqa: F811
    """A tiny random-init SigLIP CLIP (timm ViT with an attention-pool head, a logit bias, an HF tokenizer) saved
    as one of our checkpoints."""
    from compress.models.pretrained import create_clip

    torch.manual_seed(0)
    model = create_clip(config_name("siglip"))
    path = tmp_path_factory.mktemp("siglip") / "siglip.pt"
    torch.save({"model_spec": model.model_spec, "state_dict": model.state_dict()}, path)
    return path


def _distill_job(*flags):
    from training.distributed import DistInfo
    from training.jobs.distill import DistillJob
    from training.params import parse_args

    args = parse_args(["--job", "distill", "--train-data", "synthetic", "--student", "mobilenet_v3_small", *flags])
    return DistillJob(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.mark.slow
def test_a_siglip_teacher_distils_with_open_clips_sigmoid_loss_and_the_student_keeps_its_bias(siglip_teacher,
                                                                                             tmp_path):
    """Without --siglip, a SigLIP teacher selects the sigmoid loss: icl is open_clip's SigLipLoss of the student's
    image features against the teacher's caption features at the student's temperature and bias (which start at the
    teacher's), affinity and crd compare the two models' sigmoid pair logits; two steps train the bias, and the
    student's checkpoint rebuilds with it."""
    from open_clip.loss import SigLipLoss

    import compress
    from compress.models.registry import get_tokenizer, preprocess_config

    job = _distill_job("--teacher-model", config_name("siglip"), "--teacher-pretrained", str(siglip_teacher),
                       "--distill-loss", "icl,affinity,crd")
    student = job.build_model()
    teacher = compress.load(str(siglip_teacher))
    assert job.siglip and isinstance(job.clip_loss, SigLipLoss)
    assert student.model_spec["init_logit_bias"] == teacher.logit_bias.item() == student.logit_bias.item()
    assert student.logit_scale.item() == teacher.logit_scale.item() and student.logit_bias.requires_grad
    captions = ["one red circle", "two blue squares", "a green star", "three yellow triangles"]
    tokens = get_tokenizer(student.model_spec)(captions)
    size = preprocess_config(teacher.model_spec)["image_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = {"image": images, "text": tokens, "caption": captions}
    with torch.no_grad():
        teacher_image, teacher_text = teacher.encode_image(images, True), teacher.encode_text(tokens, True)
        teacher_logits = teacher.logit_scale.exp() * teacher_image @ teacher_text.T + teacher.logit_bias
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    biases = [student.logit_bias.item()]
    student.eval()  # BatchNorm on running statistics, no dropout: the loss's features are the ones recomputed here
    for _ in range(2):
        losses = job.loss(student, batch)
        image, scale, bias = student.encode_image(images, normalize=True), student.logit_scale.exp(), student.logit_bias
        torch.testing.assert_close(losses["icl_loss"], SigLipLoss()(image, teacher_text, scale, bias))
        logits = scale * image @ teacher_text.T + bias
        p, q = torch.sigmoid(teacher_logits), torch.sigmoid(logits)
        affinity = -(p * q.log() + (1 - p) * (1 - q).log()).sum() / len(images)
        crd = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum() / len(images)
        torch.testing.assert_close(losses["affinity_loss"], affinity)
        torch.testing.assert_close(losses["crd_loss"], crd)
        optimizer.zero_grad()
        losses["loss"].backward()
        assert student.logit_bias.grad.abs() > 0
        optimizer.step()
        biases.append(student.logit_bias.item())
    assert biases[0] != biases[1] != biases[2]  # the bias learns

    compress.save(student, tmp_path / "student")
    loaded = compress.load(str(tmp_path / "student"))
    assert loaded.logit_bias.item() == biases[-1] and loaded.model_spec["init_logit_bias"] == biases[0]
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), student.encode_image(images), atol=1e-6)


def test_siglip_flag_gives_a_softmax_teachers_student_a_bias_and_needs_a_caption_loss(teacher_checkpoint,
                                                                                       siglip_teacher):
    """--siglip from a teacher without a bias: the student starts at open_clip_train's bias −10 and temperature 10;
    --siglip with image-only losses is refused in one line, while a SigLIP teacher's student still carries the
    teacher's bias (frozen: no caption loss trains it)."""
    from foundation.errors import UserError
    from training.jobs import SIGLIP_INIT_LOGIT_BIAS

    job = _distill_job("--siglip", "--teacher-model", "clipc-vit-t2-32", "--teacher-pretrained",
                       str(teacher_checkpoint), "--distill-loss", "icl")
    student = job.build_model()
    assert job.siglip and student.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS
    assert student.logit_scale.exp().item() == pytest.approx(10.0)
    with pytest.raises(UserError, match=r"^--siglip: the sigmoid loss is a caption loss and --distill-loss cosine "
                                        r"compares image features only"):
        _distill_job("--siglip", "--teacher-model", "clipc-vit-t2-32", "--teacher-pretrained",
                     str(teacher_checkpoint), "--distill-loss", "cosine").build_model()
    with pytest.raises(UserError, match="--distill-loss affinity under the sigmoid loss .* the teacher "
                                        "clipc-vit-t2-32 has none; use icl"):
        _distill_job("--siglip", "--teacher-model", "clipc-vit-t2-32", "--teacher-pretrained",
                     str(teacher_checkpoint), "--distill-loss", "affinity").build_model()
    image_only = _distill_job("--teacher-model", config_name("siglip"), "--teacher-pretrained", str(siglip_teacher),
                              "--distill-loss", "cosine").build_model()
    assert image_only.logit_bias is not None and not image_only.logit_bias.requires_grad
