"""--siglip: open_clip's SigLipLoss in the trainer's jobs, chosen by itself for a model with a logit bias, and
distributed across ranks as open_clip distributes it."""
import json
import math
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SRC, launched, subprocess_env
from open_clip.loss import ClipLoss, SigLipLoss

from training.jobs import SIGLIP_INIT_LOGIT_BIAS, add_siglip_bias
from training.jobs.clip import ClipJob
from training.params import build_parser


def _job(*flags, rank=0, world_size=1):
    args = build_parser().parse_args(["--train-data", "synthetic", *flags])
    return ClipJob(args, SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu")))


def _features(n=12, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    return image, text, torch.tensor(math.log(10.0)).exp(), torch.tensor(-10.0)


def _value_and_grads(loss_of, image, text, scale, bias):
    leaves = [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]
    loss = loss_of(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def test_siglip_flag_gives_open_clips_sigmoid_loss_value_and_gradient():
    job = _job("--siglip")
    model = SimpleNamespace(logit_bias=torch.nn.Parameter(torch.zeros(())))
    job.clip_loss = job.make_clip_loss(model)
    assert job.siglip and isinstance(job.clip_loss, SigLipLoss)

    def ours(image, text, scale, bias):
        out = {"image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}
        return job.features_loss(out)["loss"]

    features = _features()
    value, grads = _value_and_grads(ours, *features)
    reference, reference_grads = _value_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), *features)
    # and SigLIP's formula itself: −Σ log σ(z_ij · (s·⟨i, t_j⟩ + b)) / n with z = +1 on the diagonal, −1 off it
    image, text, scale, bias = features
    signs = 2 * torch.eye(len(image)) - 1
    by_hand = -torch.nn.functional.logsigmoid(signs * (scale * image @ text.T + bias)).sum() / len(image)
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(value, by_hand)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected)
    assert grads[3].abs() > 0  # the bias learns


def test_a_model_with_a_logit_bias_selects_the_sigmoid_loss_and_one_without_keeps_clip_loss():
    job = _job()
    assert isinstance(job.make_clip_loss(SimpleNamespace(logit_bias=torch.zeros(()))), SigLipLoss)
    assert job.siglip
    assert isinstance(job.make_clip_loss(SimpleNamespace(logit_bias=None)), ClipLoss) and not job.siglip


def test_siglip_flag_gives_a_plain_clip_a_learnable_bias_recorded_in_its_spec():
    from compress.models.pretrained import create_clip
    from compress.models.registry import build_model

    job = _job("--siglip", "--model", "clipc-vit-t2-32")
    model = create_clip("clipc-vit-t2-32", None)
    assert model.logit_bias is None
    add_siglip_bias(model, job.args)
    assert model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS and model.logit_bias.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(10.0)  # open_clip_train's init for a random model
    rebuilt = build_model(model.model_spec)  # the checkpoint's spec builds the same parameters
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert isinstance(job.make_clip_loss(model), SigLipLoss)


def test_siglip_flag_refused_by_a_job_without_the_sigmoid_loss():
    from foundation.errors import UserError
    from training.jobs.protorkd import ProtoRKDJob

    args = build_parser().parse_args(["--train-data", "synthetic", "--siglip"])
    dist_info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(UserError, match="--siglip: --job protorkd does not train with the sigmoid loss "
                                        r"\(--job clip and --job distill and --job prune do\)"):
        ProtoRKDJob(args, dist_info)


DISTRIBUTED = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    from types import SimpleNamespace
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_siglip_loss import _features, _job
    from open_clip.loss import SigLipLoss
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    image, text, scale, bias = _features(n=4 * world, seed=1)
    n = len(image) // world
    for impl in ("bidir", "shift", "reduce", "gather"):
        job = _job("--siglip", "--loss-dist-impl", impl, rank=rank, world_size=world)
        job.clip_loss = job.make_clip_loss(SimpleNamespace(logit_bias=torch.zeros(())))
        leaves = [t.clone().requires_grad_(True) for t in (image[rank * n:(rank + 1) * n],
                                                           text[rank * n:(rank + 1) * n], scale, bias)]
        loss = job.features_loss(dict(zip(["image_features", "text_features", "logit_scale", "logit_bias"],
                                          leaves)))["loss"]
        loss.backward()
        # what DDP optimises: the mean of the ranks' losses, its gradients averaged over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        gathered = []
        for grad in (leaves[0].grad, leaves[1].grad):
            parts = [torch.zeros_like(grad) for _ in range(world)]
            dist.all_gather(parts, grad)
            gathered.append(torch.cat(parts) / world)
        for leaf in leaves[2:]:
            dist.all_reduce(leaf.grad)
            gathered.append(leaf.grad / world)
        whole = [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]
        reference = SigLipLoss()(*whole)
        reference.backward()
        torch.testing.assert_close(mean_loss, reference.detach(), msg=impl)
        for got, leaf in zip(gathered, whole):
            torch.testing.assert_close(got, leaf.grad, msg=impl)
    dist.destroy_process_group()
    print("rank", rank, "ok")
''')


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_gradients_of_one_process_on_the_concatenated_batch(tmp_path):
    script = tmp_path / "siglip_ranks.py"
    script.write_text(DISTRIBUTED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)]
    env = subprocess_env(TEST_DIR=str(REPO / "tests"), PYTHONPATH=f"{SRC}:{REPO / 'tests'}")
    with launched(cmd, cwd=REPO, env=env, stdout=-1, stderr=-1, text=True) as proc:
        stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-4000:]
    assert stdout.count("ok") == 2


def test_soft_target_sigmoid_loss_is_siglip_at_zero_weight_and_matches_the_teacher_at_one():
    from compress.ops.distill_losses import sigmoid_logits, soft_target_sigmoid_loss

    image, text, scale, bias = _features()
    logits = sigmoid_logits(image, text, scale, bias)
    torch.testing.assert_close(soft_target_sigmoid_loss(logits, torch.randn_like(logits), 0.0),
                               SigLipLoss()(image, text, scale, bias))
    # w = 1: the targets are the teacher's pair probabilities, so a student with the teacher's logits is at the
    # minimum (zero gradient) and any other is above it
    student = logits.clone().requires_grad_(True)
    at_teacher = soft_target_sigmoid_loss(student, logits, 1.0)
    at_teacher.backward()
    assert student.grad.abs().max() < 1e-6
    assert soft_target_sigmoid_loss(logits + 0.5, logits, 1.0) > at_teacher


@pytest.mark.slow
def test_prune_job_trains_siglip_with_kd_through_surgery(tiny_corpus, tmp_path):
    from conftest import run_trainer

    from compress.models.registry import load

    run_trainer(["--job", "prune", "--siglip", "--KD", "--p", "0.5", "--epochs", "2", "--model", "clipc-vit-t2-32",
                 "--train-data", str(tiny_corpus / "train.tsv"), "--logs-root", str(tmp_path), "--name", "p",
                 "--workers", "0", "--batch-size", "32", "--warmup", "1", "--log-every-n-steps", "1"])
    results = [json.loads(line) for line in open(tmp_path / "p" / "results.jsonl")]
    search = [r for r in results if "train/kd_logits_loss" in r]
    assert search and all(math.isfinite(r["train/loss"]) for r in results if "train/loss" in r)
    for epoch, kind in ((1, "masked_clip"), (2, "pruned_clip")):
        model = load(str(tmp_path / "p" / "checkpoints" / f"epoch_{epoch}.pt"))
        assert model.model_spec["kind"] == kind
        assert model.logit_bias is not None and model.logit_bias.item() != SIGLIP_INIT_LOGIT_BIAS  # it learned
