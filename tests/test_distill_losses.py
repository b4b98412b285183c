"""compress.ops.distill_losses, the one home of the distillation losses: the constant relations between the
feature losses (‖ŝ − t̂‖² = 2 − 2 cos), the soft-target contrastive loss against CLIP's and the affinity loss,
and each job's loss path (distill, prune --KD, protorkd) giving what the functions here give."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.ops import distill_losses as dl
from training.distributed import DistInfo
from training.params import parse_args

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
WIDTH = 7


def _pair(seed: int, rows: int = 5, width: int = WIDTH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)


# --- the feature losses: one quantity, three constants --------------------------------------------------


def test_squared_distance_of_unit_rows_is_two_minus_twice_the_cosine():
    student, teacher = _pair(0)
    unit_s, unit_t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    cos = F.cosine_similarity(student, teacher, dim=-1)
    torch.testing.assert_close((unit_s - unit_t).pow(2).sum(-1), 2 - 2 * cos)
    torch.testing.assert_close(dl.unit_feature_mse(unit_s, unit_t), (2 - 2 * cos).mean() / WIDTH)


def test_simreg_fd_and_cosine_differ_by_their_constants():
    student, teacher = _pair(1)
    fd = dl.fd_loss(student, teacher)
    torch.testing.assert_close(dl.simreg_loss(student, teacher), WIDTH * fd)
    torch.testing.assert_close(dl.cosine_loss(student, teacher), WIDTH / 2 * fd)
    # each against its own textbook definition
    unit_s, unit_t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    torch.testing.assert_close(fd, F.mse_loss(unit_s, unit_t))
    torch.testing.assert_close(dl.simreg_loss(student, teacher), (unit_s - unit_t).pow(2).sum(-1).mean())
    torch.testing.assert_close(dl.cosine_loss(student, teacher),
                               (1 - F.cosine_similarity(student, teacher, dim=-1)).mean())


def test_the_constants_carry_over_to_the_gradients():
    student, teacher = _pair(2)
    grads = {}
    for name in ("simreg_loss", "fd_loss", "cosine_loss"):
        leaf = student.clone().requires_grad_(True)
        getattr(dl, name)(leaf, teacher).backward()
        grads[name] = leaf.grad
    torch.testing.assert_close(grads["simreg_loss"], WIDTH * grads["fd_loss"])
    torch.testing.assert_close(grads["cosine_loss"], WIDTH / 2 * grads["fd_loss"])


def test_a_student_equal_to_its_teacher_costs_exactly_zero():
    student, _ = _pair(3)
    for loss in (dl.simreg_loss, dl.fd_loss, dl.cosine_loss):
        assert loss(student, student.clone()).item() == 0.0


def test_feature_kd_loss_is_fd_of_both_towers_on_normalised_features():
    image, teacher_image = _pair(4)
    text, teacher_text = _pair(5)
    unit = [F.normalize(x, dim=-1) for x in (image, text, teacher_image, teacher_text)]
    expected = (dl.fd_loss(image, teacher_image) + dl.fd_loss(text, teacher_text)) / 2
    torch.testing.assert_close(dl.feature_kd_loss(*unit), expected)


# --- the affinity losses -----------------------------------------------------------------------------------


def _features(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(4, 6, generator=g), dim=-1) for _ in range(4)]


def test_soft_target_contrastive_is_clip_at_w0_affinity_at_w1_and_linear_between():
    image, text, teacher_image, teacher_text = _features(6)
    student_logits = dl.affinity_logits(image, text, 10.0)
    teacher_logits = dl.affinity_logits(teacher_image, teacher_text, 20.0)
    labels = torch.arange(4)
    clip = (F.cross_entropy(student_logits[0], labels) + F.cross_entropy(student_logits[1], labels)) / 2
    affinity = dl.affinity_loss(image, text, teacher_image, teacher_text, 10.0, 20.0)
    for w, expected in ((0.0, clip), (1.0, affinity), (0.3, 0.7 * clip + 0.3 * affinity)):
        torch.testing.assert_close(dl.soft_target_contrastive_loss(student_logits, teacher_logits, labels, w),
                                   expected)


def test_logit_mse_averages_both_directions():
    image, text, teacher_image, teacher_text = _features(7)
    s_i2t, s_t2i = dl.affinity_logits(image, text, 3.0)
    t_i2t, t_t2i = dl.affinity_logits(teacher_image, teacher_text, 5.0)
    # the two directions of one affinity matrix are transposes, so their MSEs agree; shifting the second by 1
    # adds 1 + 2·mean(s − t) to its MSE, and half of that to the average
    twisted = (s_i2t, s_t2i + 1.0)
    torch.testing.assert_close(dl.logit_mse_loss(twisted, (t_i2t, t_t2i)),
                               F.mse_loss(s_i2t, t_i2t) + 0.5 * (1 + 2 * (s_t2i - t_t2i).mean()))


# --- each job's loss path gives the one home's value ------------------------------------------------------


def test_distill_job_losses_are_the_table_functions():
    from compress.models.registry import get_tokenizer
    from training.jobs.distill import DistillJob

    args = parse_args(["--job", "distill", "--train-data", "synthetic", "--teacher-model", "clipc-vit-t2-32",
                       "--student", "teacher", "--student-layers", "1", "--student-width", "32",
                       "--distill-loss", "cosine,fd,icl,crd,affinity"])
    job = DistillJob(args, CPU)
    torch.manual_seed(0)
    model = job.build_model().eval()
    captions = ["one red circle", "two blue squares", "a green star", "three yellow triangles"]
    batch = {"image": torch.randn(4, 3, 32, 32), "text": get_tokenizer(model.model_spec)(captions),
             "caption": captions}
    losses = job.loss(model, batch)
    with torch.no_grad():
        image = model(batch["image"], None)["image_features"]
        scale = model.logit_scale.exp()
        teacher_image = job.teacher.encode_image(batch["image"], normalize=True)
        teacher_text = job.teacher.encode_text(batch["text"], normalize=True)
        teacher_scale = job.teacher.logit_scale.exp()
    expected = {
        "cosine": dl.cosine_loss(image, teacher_image),
        "fd": dl.fd_loss(image, teacher_image),
        "icl": dl.icl_loss(image, teacher_text, scale),
        "crd": dl.crd_loss(image, teacher_text, teacher_image, teacher_text, scale, teacher_scale),
        "affinity": dl.affinity_loss(image, teacher_text, teacher_image, teacher_text, scale, teacher_scale),
    }
    for name, value in expected.items():
        torch.testing.assert_close(losses[f"{name}_loss"].detach(), getattr(args, f"{name}_weight") * value)


def test_prune_job_kd_terms_are_the_one_homes(tmp_path):
    from training.jobs.prune import PruneJob

    args = parse_args(["--job", "prune", "--train-data", "synthetic", "--model", "clipc-vit-t2-32", "--KD",
                       "--epochs", "2", "--search-epochs", "1", "--search-interval", "2",
                       "--w-kd-soft-target", "0.25", "--logs", str(tmp_path), "--name", "kd"])
    job = PruneJob(args, CPU)
    torch.manual_seed(0)
    model = job.build_model()
    ctx = types.SimpleNamespace(unwrapped_model=model, data=types.SimpleNamespace(num_batches=4), step=0,
                                scaler=None, log_scalars=lambda scalars: None)
    job.on_train_start(ctx)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(6, 3, 32, 32, generator=g), "text": torch.randint(1, 1000, (6, 16), generator=g)}
    losses = job.loss(model, batch)
    with torch.no_grad():
        out, teacher = model(batch["image"], batch["text"]), job.teacher(batch["image"], batch["text"])
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    t_image, t_text, t_scale = teacher["image_features"], teacher["text_features"], teacher["logit_scale"]
    student_logits = dl.affinity_logits(image, text, scale)
    teacher_logits = dl.affinity_logits(t_image, t_text, t_scale)
    labels = torch.arange(6)
    torch.testing.assert_close(losses["kd_feat_loss"].detach(), dl.feature_kd_loss(image, text, t_image, t_text))
    torch.testing.assert_close(losses["kd_logits_loss"].detach(), dl.logit_mse_loss(student_logits, teacher_logits))
    torch.testing.assert_close(losses["contrastive_loss"].detach(), dl.soft_target_contrastive_loss(
        student_logits, teacher_logits, labels, 0.25))
    # the same terms in the distill job's vocabulary: L_same is fd on both towers, the soft-target part affinity
    torch.testing.assert_close(losses["kd_feat_loss"].detach(),
                               (dl.fd_loss(image, t_image) + dl.fd_loss(text, t_text)) / 2)
    clip = (F.cross_entropy(student_logits[0], labels) + F.cross_entropy(student_logits[1], labels)) / 2
    torch.testing.assert_close(losses["contrastive_loss"].detach(),
                               0.75 * clip + 0.25 * dl.affinity_loss(image, text, t_image, t_text, scale, t_scale))


class _ImageStudent(torch.nn.Module):
    """What ProtoRKDJob.loss reads of a student: image features and the two temperatures."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(12, width)

    def forward(self, images, backbone_grad=True, scales=()):
        out = {"image_features": self.proj(images.flatten(1))}
        out.update({name: torch.tensor(5.0) for name in scales})
        return out


def test_protorkd_job_losses_are_the_one_homes():
    from training.jobs.protorkd import ProtoRKDJob

    args = parse_args(["--job", "protorkd", "--train-data", "synthetic", "--distiller", "mse,rkd,proto",
                       "--target-temperature", "0.5", "--w-proto-external", "0.3", "--w-rkd-d", "0.7"])
    job = ProtoRKDJob(args, CPU)
    rows, width, k = 10, 4, 3
    rng = np.random.default_rng(0)
    job.teacher_features = rng.standard_normal((rows, width)).astype(np.float32)
    job.episode = 0
    job.clip_loss = job.make_clip_loss()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2])
    job.prototypes = {"image_prototypes": torch.randn(k, width), "text_centroids": torch.randn(k, width),
                      "image_prototypes_external": torch.randn(k, width), "external_centroids": torch.randn(k, width)}
    job.label_of_row = {"text_labels": labels, "external_labels": labels.roll(1)}
    torch.manual_seed(0)
    model = _ImageStudent(width)
    index = torch.tensor([2, 8, 5, 0, 7])
    batch = {"image": torch.randn(5, 3, 2, 2), "index": index}
    losses = job.loss(model, batch)
    with torch.no_grad():
        student = model(batch["image"])["image_features"]
    teacher = torch.from_numpy(job.teacher_features[index.numpy()])
    expected = {
        "simreg_loss": args.w_simreg * dl.simreg_loss(student, teacher),
        "rkd_distance_loss": 0.7 * dl.rkd_distance_loss(student, teacher),
        "rkd_angle_loss": args.w_rkd_a * dl.rkd_angle_loss(student, teacher),
        "proto_loss": args.w_proto * 0.5 * dl.proto_loss(student, job.prototypes["image_prototypes"],
                                                          job.prototypes["text_centroids"], labels[index],
                                                          torch.tensor(5.0), 0.5),
        "proto_external_loss": 0.3 * 0.5 * dl.proto_loss(student, job.prototypes["image_prototypes_external"],
                                                          job.prototypes["external_centroids"],
                                                          labels.roll(1)[index], torch.tensor(5.0), -1),
    }
    assert set(expected) < set(losses)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name].detach(), value, msg=name)


@pytest.mark.parametrize("temperature", [-1.0, 0.5])
def test_proto_loss_is_a_soft_cross_entropy_against_the_teacher_centroids(temperature):
    g = torch.Generator().manual_seed(8)
    features, prototypes, centroids = (torch.randn(n, 4, generator=g) for n in (5, 3, 3))
    labels = torch.tensor([0, 2, 1, 1, 0])
    logits = 3.0 * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T
    targets = dl.proto_targets(centroids, labels, temperature)
    torch.testing.assert_close(targets.sum(-1), torch.ones(5))
    expected = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(dl.proto_loss(features, prototypes, centroids, labels, torch.tensor(3.0), temperature),
                               expected)
