"""BatchNorm students work in eval mode: the statistics re-estimation (compress.ops.batchnorm) by hand, on
a student whose running averages are stale, and after a real `--job distill` run of a MobileNetV3-S student,
whose eval-mode features must match its train-mode ones on the same batch."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import run_trainer
from torch import nn

import compress
from compress.models.registry import build_model, get_preprocess
from compress.models.students import student_clip_spec, student_image_spec
from compress.ops.batchnorm import recalibrate_batchnorm, trained_batchnorms
from foundation.images import open_rgb


def _train_mode_features(model, images):
    """Features with train-mode BatchNorm (each layer normalises with this batch's own statistics) on a copy;
    dropout stays off, so the comparison with eval mode shows the statistics alone."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    with torch.no_grad():
        return model.encode_image(images, normalize=True)


def test_statistics_become_the_average_over_the_batches_and_nothing_else_changes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 2), nn.BatchNorm1d(2))
    net[4].eval()  # a frozen layer: training never updates it, so neither does the re-estimation
    net[4].train = lambda mode=True: net[4]  # stays in eval mode whatever model.train() says
    frozen_mean = net[4].running_mean.clone()
    batches = [torch.randn(16, 4) * (i + 1) + i for i in range(3)]
    net.train(False)
    assert trained_batchnorms(net) == [net[1]]
    assert recalibrate_batchnorm(net, batches, net) == 3
    with torch.no_grad():
        hidden = [net[0](b) for b in batches]
    # momentum None: the plain average of the per-batch means and (unbiased) variances
    torch.testing.assert_close(net[1].running_mean, torch.stack([h.mean(0) for h in hidden]).mean(0))
    torch.testing.assert_close(net[1].running_var, torch.stack([h.var(0) for h in hidden]).mean(0))
    assert net[1].momentum == 0.1 and not net.training and not net[1].training and not net[2].training
    torch.testing.assert_close(net[4].running_mean, frozen_mean)
    before = net[1].running_mean.clone()
    assert recalibrate_batchnorm(net, [], net) == 0  # no batches: the statistics are left as they were
    torch.testing.assert_close(net[1].running_mean, before)


def test_a_student_with_stale_statistics_collapses_in_eval_mode_until_they_are_re_estimated():
    torch.manual_seed(0)
    # at 64 px the last feature maps are 2x2, so a batch of 64 gives each channel 256 values: the n/(n-1) of
    # the unbiased running variance is then negligible (at 32 px and 1x1 maps it compounds over the layers)
    student = build_model(student_clip_spec(student_image_spec("mobilenet_v3_small", "clipc-vit-t2-32",
                                                               image_size=64), "clipc-vit-t2-32"))
    images = torch.randn(64, 3, 64, 64)
    for layer in trained_batchnorms(student):  # running averages that no longer fit the weights
        layer.running_var.fill_(1e-6)
        layer.running_mean.fill_(3.0)
    train_features = _train_mode_features(student, images)
    with torch.no_grad():
        stale = student.eval().encode_image(images, normalize=True)
    assert F.cosine_similarity(stale, train_features).mean() < 0.9
    recalibrate_batchnorm(student, [images], student.encode_image)
    with torch.no_grad():
        fixed = student.eval().encode_image(images, normalize=True)
    # re-estimated on this very batch: eval mode normalises with its mean and (unbiased) variance, which is what
    # train mode used up to the n/(n-1) variance correction
    assert F.cosine_similarity(fixed, train_features).min() > 0.99


def test_a_frozen_backbone_keeps_its_statistics():
    student = build_model(student_clip_spec(student_image_spec("mobilenet_v3_small", "clipc-vit-t2-32",
                                                               freeze_backbone=True), "clipc-vit-t2-32"))
    assert trained_batchnorms(student) == []
    vit = build_model(student_clip_spec(student_image_spec("teacher", "clipc-vit-t2-32", layers=1),
                                        "clipc-vit-t2-32"))
    assert trained_batchnorms(vit) == []  # LayerNorm only: eval mode was never the problem


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
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
def test_a_distilled_mobilenet_student_works_in_eval_mode(tiny_corpus, teacher_checkpoint, tmp_path):
    run_trainer(["--job", "distill", "--teacher-model", "clipc-vit-t2-32", "--teacher-pretrained",
                 str(teacher_checkpoint), "--student", "mobilenet_v3_small", "--train-data",
                 str(tiny_corpus / "train.tsv"), "--student-image-size", "64", "--epochs", "1", "--batch-size", "32",
                 "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--bn-recalibration-batches", "8",
                 "--logs", str(tmp_path), "--name", "bn", "--report-to", "none", "--log-level", "warning"])
    student = compress.load(str(tmp_path / "bn" / "checkpoints" / "epoch_1.pt"))
    preprocess = get_preprocess(student.model_spec)
    paths = sorted((tiny_corpus / "images" / "train").glob("*.jpg"))[:64]
    images = torch.stack([preprocess(open_rgb(p)) for p in paths])
    train_features = _train_mode_features(student, images)
    with torch.no_grad():
        eval_features = student.eval().encode_image(images, normalize=True)
    # the batch's own statistics (train mode) and the re-estimated ones (eval mode) give the same embedding:
    # on average to 0.995, and for every one of the 64 images to 0.98 (the re-estimation reads training crops,
    # these are eval views; this seed's student has its worst image at 0.987 and its mean at 0.999)
    similarity = F.cosine_similarity(eval_features, train_features)
    assert similarity.mean() > 0.995 and similarity.min() > 0.98, similarity
    spread = eval_features.std(dim=0).mean() / train_features.std(dim=0).mean()
    assert 0.8 < spread < 1.25  # not collapsed: the images stay apart as much as in train mode
