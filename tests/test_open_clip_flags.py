"""open_clip_train's training flags that users carry over: each one's parsing and what it changes."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress.models.pretrained import create_clip
from compress.models.registry import build_model, get_preprocess
from foundation.errors import UserError
from training.distributed import DistInfo
from training.jobs import force_patch_dropout, train_preprocess
from training.main import cosine_schedule, sync_batchnorm
from training.params import parse_args

MODEL = "clipc-vit-t2-32"


def _args(*flags):
    return parse_args(["--train-data", "synthetic", "--model", MODEL, *flags])


def _usage_error(capsys, *flags) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _args(*flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- --aug-cfg -----------------------------------------------------------------------------------------------


def test_aug_cfg_parses_key_value_pairs_as_open_clip_train():
    args = _args("--aug-cfg", "scale=(0.5,1.0)", "color_jitter=0.4", "re_mode=pixel", "use_timm=True")
    assert args.aug_cfg == {"scale": (0.5, 1.0), "color_jitter": 0.4, "re_mode": "pixel", "use_timm": True}
    assert _args("--aug-cfg").aug_cfg == {}
    assert _args().aug_cfg is None


def test_aug_cfg_pair_without_equals_is_a_usage_error(capsys):
    assert "--aug-cfg: expected KEY=VALUE pairs, got 'scale'" in _usage_error(capsys, "--aug-cfg", "scale")


def test_aug_cfg_turns_on_open_clips_train_transform():
    from torchvision.transforms import CenterCrop, RandomResizedCrop

    model = create_clip(MODEL, None)
    plain = train_preprocess(model, _args()).transforms
    augmented = train_preprocess(model, _args("--aug-cfg", "scale=(0.5,1.0)")).transforms
    assert not any(isinstance(t, RandomResizedCrop) for t in plain)
    assert any(isinstance(t, CenterCrop) for t in plain)
    crop = next(t for t in augmented if isinstance(t, RandomResizedCrop))
    assert crop.scale == (0.5, 1.0)


# --- --image-mean/--image-std/--image-interpolation/--image-resize-mode ----------------------------------------


def test_image_flags_feed_the_transform_and_the_checkpoints_spec():
    from torchvision.transforms import InterpolationMode, Normalize, Resize

    model = create_clip(MODEL, None)
    args = _args("--image-mean", "0.5", "--image-std", "0.25", "0.5", "1", "--image-interpolation", "bilinear",
                 "--image-resize-mode", "squash")
    transform = train_preprocess(model, args)
    normalize = next(t for t in transform.transforms if isinstance(t, Normalize))
    assert list(normalize.mean) == [0.5, 0.5, 0.5] and list(normalize.std) == [0.25, 0.5, 1.0]
    resize = next(t for t in transform.transforms if isinstance(t, Resize))
    assert resize.interpolation == InterpolationMode.BILINEAR
    size = model.model_spec["preprocess"]["image_size"]
    assert resize.size == (size, size)  # squash: both sides to the image size, no crop
    preprocess = model.model_spec["preprocess"]
    assert preprocess["mean"] == [0.5] * 3 and preprocess["resize_mode"] == "squash"
    # what eval and export read: the spec's preprocessing, the same transform
    assert repr(get_preprocess(model.model_spec)) == repr(transform)


def test_image_flags_checked_at_parse_time(capsys):
    assert "one value or one per channel" in _usage_error(capsys, "--image-mean", "0.1", "0.2")
    assert "--image-std: every value must be positive" in _usage_error(capsys, "--image-std", "0")


# --- --force-patch-dropout ------------------------------------------------------------------------------------


def test_force_patch_dropout_drops_patches_in_training_only_and_is_rebuilt_from_the_spec():
    from open_clip.transformer import PatchDropout

    model = create_clip(MODEL, None)
    force_patch_dropout(model, _args("--force-patch-dropout", "0.5"))
    assert isinstance(model.visual.patch_dropout, PatchDropout) and model.visual.patch_dropout.prob == 0.5
    tokens = torch.randn(2, 17, 8)  # a class token and 16 patches
    model.train()
    assert model.visual.patch_dropout(tokens).shape[1] == 1 + 8
    model.eval()
    assert model.visual.patch_dropout(tokens).shape[1] == 17
    assert model.model_spec["model_kwargs"]["force_patch_dropout"] == 0.5
    assert build_model(model.model_spec).visual.patch_dropout.prob == 0.5
    force_patch_dropout(model, _args("--force-patch-dropout", "0"))
    assert isinstance(model.visual.patch_dropout, nn.Identity)


def test_force_patch_dropout_range_and_job(capsys):
    assert "must be in [0, 1)" in _usage_error(capsys, "--force-patch-dropout", "1")
    with pytest.raises(UserError, match="--force-patch-dropout"):
        force_patch_dropout(SimpleNamespace(visual=nn.Conv2d(3, 3, 1), model_spec={}),
                            _args("--force-patch-dropout", "0.5"))
    with pytest.raises(UserError, match="belongs to --job clip"):  # another job refuses it
        parse_args(["--train-data", "synthetic", "--job", "distill", "--force-patch-dropout", "0.5"])


# --- --lr-scheduler const / const-cooldown --------------------------------------------------------------------


def _rates(*flags, total=10, phases=(0,), cooldown=0):
    args = _args("--lr", "1.0", "--warmup", "2", "--epochs", "2", *flags)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
    set_lr = cosine_schedule(optimizer, args, total, phases, cooldown_steps=cooldown)
    return [set_lr(step) for step in range(total)]


def test_const_cooldown_is_open_clip_trains_const_lr_cooldown():
    from open_clip_train.scheduler import const_lr_cooldown

    flags = ("--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1", "--lr-cooldown-end", "0.1",
             "--lr-cooldown-power", "2")
    ours = _rates(*flags, cooldown=4)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = const_lr_cooldown(optimizer, 1.0, 2, 10, 4, cooldown_power=2.0, cooldown_end_lr=0.1)
    assert ours == pytest.approx([reference(step) for step in range(10)])
    assert ours[2:6] == [1.0] * 4 and ours[-1] < 1.0
    assert _rates("--lr-scheduler", "const") == pytest.approx([0.5] + [1.0] * 9)
    # each schedule phase (a prune job's fine-tune) cools down at its own end
    phased = _rates(*flags, phases=(0, 5), cooldown=2)
    assert phased[2] == phased[3] == 1.0 and phased[4] < 1.0  # steps 0-4: warm-up 2, cooldown over 3-4
    assert phased[5] < 1.0 and phased[7] == phased[8] == 1.0 and phased[9] < 1.0  # steps 5-9: the same again


def test_const_cooldown_needs_epochs_cooldown(capsys):
    assert "needs --epochs-cooldown" in _usage_error(capsys, "--lr-scheduler", "const-cooldown")
    assert "needs --epochs-cooldown" in _usage_error(capsys, "--lr-scheduler", "const-cooldown",
                                                     "--epochs-cooldown", "3")
    assert "--epochs-cooldown is for" in _usage_error(capsys, "--epochs-cooldown", "1")


def test_run_schedule_cools_down_over_the_last_epochs():
    from training.main import run_schedule

    args = _args("--lr", "1.0", "--warmup", "1", "--epochs", "4", "--lr-scheduler", "const-cooldown",
                 "--epochs-cooldown", "1", "--accum-freq", "2")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    job = SimpleNamespace(lr_phase_starts=lambda steps_per_epoch: [0])
    set_lr = run_schedule(optimizer, args, SimpleNamespace(num_batches=6), job)  # 3 steps per epoch, 12 in all
    rates = [set_lr(step) for step in range(12)]
    assert rates[:9] == [1.0] * 9 and rates[9] == pytest.approx(1.0) and rates[10] < 1.0 and rates[11] < rates[10]


# --- --use-bn-sync --------------------------------------------------------------------------------------------


def test_use_bn_sync_converts_batchnorm_under_ddp_only():
    def student():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))

    gpu_ranks = DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    model = student()
    before = model.state_dict()
    sync_batchnorm(model, _args("--use-bn-sync"), gpu_ranks)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[2][0], nn.SyncBatchNorm)
    assert model.state_dict().keys() == before.keys()  # checkpoints keep BatchNorm's names
    one_process = student()
    sync_batchnorm(one_process, _args("--use-bn-sync"), DistInfo(device=torch.device("cuda", 0)))
    assert type(one_process[1]) is nn.BatchNorm2d
    without_flag = student()
    sync_batchnorm(without_flag, _args(), gpu_ranks)
    assert type(without_flag[1]) is nn.BatchNorm2d
    with pytest.raises(UserError, match="--use-bn-sync"):
        sync_batchnorm(student(), _args("--use-bn-sync"), DistInfo(world_size=2))


def test_siglip_and_loss_dist_impl_parse():
    args = _args("--siglip", "--loss-dist-impl", "shift")
    assert args.siglip and args.loss_dist_impl == "shift"
    assert math.isclose(_args().lr, 5e-4)


# --- --val-data / --val-frequency -----------------------------------------------------------------------------


def _val_tsv(corpus, path, rows=32):
    header, *lines = (corpus / "train.tsv").read_text().splitlines()
    path.write_text("\n".join([header, *(f"{corpus}/{line}" for line in lines[-rows:])]) + "\n")
    return path


def test_validation_loss_is_open_clips_clip_loss_of_the_held_out_set(tiny_corpus, tmp_path):
    from open_clip.loss import ClipLoss

    from compress.models.registry import get_tokenizer
    from training.validation import make_val_data, validation_loss

    args = parse_args(["--train-data", "synthetic", "--model", MODEL, "--workers", "0", "--batch-size", "32",
                       "--val-data", str(_val_tsv(tiny_corpus, tmp_path / "val.tsv"))])
    model = create_clip(MODEL, None)
    model.output_dict = True
    job = SimpleNamespace(siglip=False, clip_loss=ClipLoss())
    tokenizer = get_tokenizer(model.model_spec)
    data = make_val_data(args, get_preprocess(model.model_spec), tokenizer, job, DistInfo())
    metrics = validation_loss(model, data, job, "fp32", torch.device("cpu"))
    assert metrics["num_samples"] == 32 and model.training  # the model is back in training mode
    model.eval()
    batch = next(iter(data.loader))
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        text = model.encode_text(batch["text"], normalize=True)
        expected = ClipLoss()(image, text, model.logit_scale.exp())
    assert metrics["contrastive_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_val_data_refused_by_a_job_without_a_contrastive_loss():
    from training.validation import make_val_data

    args = _args("--val-data", "val.tsv")
    with pytest.raises(UserError, match="--val-data"):
        make_val_data(args, None, None, SimpleNamespace(), DistInfo())
    assert make_val_data(_args(), None, None, SimpleNamespace(), DistInfo()) is None


@pytest.mark.slow
def test_val_data_logs_the_validation_loss_every_val_frequency_epochs_and_after_the_last(tiny_corpus, tmp_path):
    import json

    from conftest import run_trainer

    run_trainer(["--train-data", str(tiny_corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(tmp_path),
                 "--name", "v", "--workers", "0", "--batch-size", "32", "--epochs", "3", "--val-frequency", "2",
                 "--val-data", str(_val_tsv(tiny_corpus, tmp_path / "val.tsv")), "--siglip"])
    rows = [json.loads(line) for line in open(tmp_path / "v" / "results.jsonl")]
    validated = [(r["epoch"], r["val/num_samples"]) for r in rows if "val/contrastive_loss" in r]
    assert validated == [(2, 32), (3, 32)]
    assert all(math.isfinite(r["val/contrastive_loss"]) for r in rows if "val/contrastive_loss" in r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "v").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "val/contrastive_loss" in events.Tags()["scalars"]


# --- --distill-model / --distill-pretrained -------------------------------------------------------------------


def _clip_job(*flags):
    from training.jobs.clip import ClipJob

    return ClipJob(_args(*flags), DistInfo())


def test_distill_model_adds_open_clips_distill_clip_loss_with_a_frozen_teacher(tmp_path):
    from open_clip.loss import DistillClipLoss

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(create_clip(MODEL, None).state_dict(), weights)
    job = _clip_job("--distill-model", MODEL, "--distill-pretrained", str(weights))
    model = job.build_model()
    assert isinstance(job.clip_loss, DistillClipLoss)
    assert not any(p.requires_grad for p in job.teacher.parameters()) and not job.teacher.training
    batch = {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 400, (4, model.context_length))}
    out = job.features(model, batch)
    losses = job.features_loss(out)
    with torch.no_grad():
        teacher = job.teacher(batch["image"], batch["text"])
    expected = DistillClipLoss()(out["image_features"], out["text_features"], out["logit_scale"],
                                 teacher["image_features"], teacher["text_features"], teacher["logit_scale"],
                                 output_dict=True)
    torch.testing.assert_close(losses["distill_loss"], expected["distill_loss"])
    torch.testing.assert_close(losses["loss"], expected["contrastive_loss"] + expected["distill_loss"])
    losses["loss"].backward()
    assert model.visual.conv1.weight.grad is not None and model.text_projection.grad is not None  # both towers


def test_distill_model_flags_come_together_and_not_with_siglip(tmp_path):
    with pytest.raises(UserError, match="come together"):
        _clip_job("--distill-model", MODEL).build_model()
    with pytest.raises(UserError, match="--siglip"):
        _clip_job("--distill-model", MODEL, "--distill-pretrained", str(tmp_path / "t.pt"), "--siglip").build_model()
