"""Reinforced shards (clipcompress reinforce, training.data.reinforced): a small set written and read back, the
distill and prune jobs' first step from stored embeddings against the online teacher, ProtoRKD's teacher cache
from them, a teacher mismatch and a tampered reinforce.json refused, and an interrupted run resumed into the
bytes of an uninterrupted one (under torchrun)."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from conftest import REPO, launched, run_trainer, subprocess_env
from test_families import config_name, family_configs  # noqa: F401  (a fixture: the families' tiny configs)

TEACHER = "clipc-vit-t2-32"


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    """A random-init clipc-vit-t2-32 saved as one of our checkpoints (what --job clip writes)."""
    import open_clip

    from compress.models.registry import open_clip_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model_spec": open_clip_spec(TEACHER), "state_dict": open_clip.create_model(TEACHER).state_dict()},
               path)
    return path


def _reinforce(teacher_weights, out, *flags):
    from utils.reinforce import main

    assert main(["--teacher-model", TEACHER, "--teacher-pretrained", str(teacher_weights), "--out", str(out),
                 "--workers", "0", "--batch-size", "8", "--log-level", "warning", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def augmented_set(tiny_corpus, teacher_weights, tmp_path_factory):
    """The first 40 rows of the TSV, 3 flipped-or-not crops each, float16, in shards of 16 rows."""
    return _reinforce(teacher_weights, tmp_path_factory.mktemp("augmented") / "set", "--train-data",
                      str(tiny_corpus / "train.tsv"), "--views", "3", "--flip-probability", "0.5", "--shard-size",
                      "16", "--dataset-size", "40", "--seed", "3")


@pytest.fixture(scope="module")
def plain_set(tiny_corpus, teacher_weights, tmp_path_factory):
    """The first shard of the corpus, one view each (the eval transform), float32: what an online run sees."""
    return _reinforce(teacher_weights, tmp_path_factory.mktemp("plain") / "set", "--train-data",
                      str(tiny_corpus / "shards" / "000000.tar"), "--views", "1", "--no-augment", "--dtype", "float32")


def _samples(folder):
    from training.data.shards import shard_samples

    return list(shard_samples({"url": str(path)} for path in sorted(folder.glob("*.tar"))))


def test_a_coca_teachers_stored_embeddings_are_unnormalised_as_every_families(family_configs):  # noqa: F811
    """CoCa's encoders normalise unless told not to: the stored embeddings are what every other family's encoders
    give, the unnormalised features the reinforced format promises."""
    from compress.models.pretrained import create_clip
    from compress.models.registry import get_tokenizer
    from utils.reinforce import TeacherEncoder

    torch.manual_seed(0)
    teacher = create_clip(config_name("coca"), None).eval()
    encoder = TeacherEncoder(teacher, get_tokenizer(teacher.model_spec), torch.device("cpu"), "fp32")
    views = torch.randn(2, 1, 3, 32, 32)
    image, caption = encoder([{"views": view, "caption": text} for view, text in zip(views, ["a red star", "two"])])
    with torch.no_grad():
        expected_image = teacher.encode_image(views[:, 0], normalize=False)
        expected_caption = teacher.encode_text(get_tokenizer(teacher.model_spec)(["a red star", "two"]),
                                               normalize=False)
    assert np.allclose(image[:, 0], expected_image.numpy(), atol=1e-6)
    assert np.allclose(caption, expected_caption.numpy(), atol=1e-6)
    assert not np.allclose(np.linalg.norm(caption, axis=1), 1.0)


# --- the format ------------------------------------------------------------------------------------------


def test_views_depend_on_seed_key_and_index_only_and_are_crops_of_the_image():
    from training.data.reinforced import DEFAULT_CROP_RATIO, draw_views

    augment = {"crop_scale": [0.08, 1.0], "crop_ratio": list(DEFAULT_CROP_RATIO), "flip": 0.5}
    views = draw_views(7, "000000042", 16, 48, 32, augment)
    assert views.dtype == np.int32 and views.shape == (16, 5)
    assert np.array_equal(views, draw_views(7, "000000042", 16, 48, 32, augment))
    # view v does not depend on how many views are drawn, and another key or seed draws other views
    assert np.array_equal(views[:4], draw_views(7, "000000042", 4, 48, 32, augment))
    assert not np.array_equal(views, draw_views(7, "000000043", 16, 48, 32, augment))
    assert not np.array_equal(views, draw_views(8, "000000042", 16, 48, 32, augment))
    top, left, height, width, flip = views.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 48).all()
    assert set(flip.tolist()) == {0, 1} and len({tuple(v) for v in views[:, :4]}) > 8


def test_round_trip_of_a_reinforced_set(augmented_set, tiny_corpus, teacher_weights):
    """Every sample keeps its image bytes, caption and row; its stored embeddings are the teacher's of the
    stored crops (recomputed here from the image and the crop box) and of its caption."""
    from compress.models.pretrained import create_clip
    from compress.models.registry import get_tokenizer
    from foundation.images import open_rgb
    from training.data.reinforced import StoredViews, ViewMaker, file_sha256, read_reinforcement, view_index

    info = read_reinforcement(augmented_set)
    assert info.header["complete"] and info.views == 3 and info.embed_dim == 64 and info.dtype == np.float16
    assert info.weights == {"source": "file", "sha256": file_sha256(teacher_weights)}
    assert info.header["source"]["samples"] == 40 and info.header["source"]["skipped"] == 0
    sizes = json.loads((augmented_set / "sizes.json").read_text())
    assert sizes == {"000000.tar": 16, "000001.tar": 16, "000002.tar": 8}
    rows = [line.split("\t") for line in (tiny_corpus / "train.tsv").read_text().splitlines()[1:]]

    teacher = create_clip(TEACHER, str(teacher_weights)).eval()
    maker = ViewMaker(info.teacher_spec, info.augment)
    views = StoredViews(info, embeddings=True)
    samples = _samples(augmented_set)
    assert [int(s["idx"]) for s in samples] == list(range(40))
    for sample in samples[::7]:
        row = int(sample["idx"])
        assert sample["jpg"] == (tiny_corpus / rows[row][0]).read_bytes()
        assert sample["txt"].decode() == rows[row][1]
        params = np.load(io.BytesIO(sample["views.npy"]))
        stored = np.load(io.BytesIO(sample["image_emb.npy"]))
        assert params.shape == (3, 5) and stored.shape == (3, 64) and stored.dtype == np.float16
        image = open_rgb(sample["jpg"])
        with torch.no_grad():
            expected = teacher.encode_image(torch.stack([maker(image, p) for p in params]))
            caption = teacher.encode_text(get_tokenizer(teacher.model_spec)([rows[row][1]]))[0]
        torch.testing.assert_close(torch.from_numpy(stored.astype(np.float32)), expected, atol=5e-3, rtol=5e-3)
        # a training run's sample: the view drawn for (seed, epoch, key), with that view's stored embedding
        decoded, view = views.decode(sample, seed=0, epoch=1), view_index(0, 1, sample["__key__"], 3)
        assert torch.equal(decoded["image"], maker(image, params[view]))
        assert torch.equal(decoded["teacher_image"], torch.from_numpy(stored[view].astype(np.float32)))
        torch.testing.assert_close(decoded["teacher_text"], caption, atol=5e-3, rtol=5e-3)
    assert len({view_index(0, epoch, samples[0]["__key__"], 3) for epoch in range(12)}) > 1


def test_stored_samples_with_other_shapes_or_missing_members_are_bad_samples(augmented_set):
    from training.data.reinforced import StoredViews, array_bytes, read_reinforcement

    views = StoredViews(read_reinforcement(augmented_set), embeddings=True)
    sample = _samples(augmented_set)[0]
    assert "bad" not in views.decode(sample, 0, 0)
    for member, value, why in (("image_emb.npy", array_bytes(np.zeros((2, 64), np.float16)), "expected"),
                               ("text_emb.npy", array_bytes(np.zeros(64, np.float32)), "expected"),
                               ("views.npy", array_bytes(np.full((3, 5), 1000, np.int32)), "not a crop"),
                               ("image_emb.npy", b"\x93NUMPY garbage", "not a .npy"),
                               ("text_emb.npy", array_bytes(np.full(64, np.inf, np.float16)), "not finite")):
        assert why in views.decode({**sample, member: value}, 0, 0)["bad"]
    assert "no image_emb.npy member" in views.decode({k: v for k, v in sample.items() if k != "image_emb.npy"},
                                                      0, 0)["bad"]


@pytest.mark.parametrize("edit, refused", [
    (lambda h: h.update(extra=1), "reinforce.json.extra: unknown key"),
    (lambda h: h.update(views=0), "reinforce.json.views"),
    (lambda h: h.update(dtype="float64"), "reinforce.json.dtype"),
    (lambda h: h["teacher"].update(embed_dim=1 << 20), "reinforce.json.teacher.embed_dim"),
    (lambda h: h["teacher"]["weights"].update(sha256="00"), "reinforce.json.teacher.weights.sha256"),
    (lambda h: h["teacher"]["spec"].update(model="hf-hub:evil/model"), "not a local open_clip model config"),
    (lambda h: h["teacher"]["spec"].update(pretrained="/etc/passwd"), "model_spec.pretrained: unknown key"),
    (lambda h: h.update(format="pickle"), "reinforce.json.format"),
])
def test_a_tampered_reinforce_json_is_refused_naming_the_key(augmented_set, tmp_path, edit, refused):
    from training.data.reinforced import ReinforceError, read_reinforcement

    folder = tmp_path / "set"
    shutil.copytree(augmented_set, folder)
    header = json.loads((folder / "reinforce.json").read_text())
    edit(header)
    (folder / "reinforce.json").write_text(json.dumps(header))
    with pytest.raises(ReinforceError, match="reinforce.json") as error:
        read_reinforcement(folder)
    assert refused in str(error.value) and "\n" not in str(error.value)


def test_a_reinforce_json_that_is_no_json_too_large_or_not_a_file_is_refused(augmented_set, tmp_path):
    from training.data.reinforced import MAX_REINFORCE_FILE_BYTES, ReinforceError, read_reinforcement

    folder = tmp_path / "set"
    shutil.copytree(augmented_set, folder)
    for content, refused in ((b"{" * 100_000, "not valid JSON"), (b" " * (MAX_REINFORCE_FILE_BYTES + 1), "over"),
                             (b"[1, 2]", "expected a mapping")):
        (folder / "reinforce.json").write_bytes(content)
        with pytest.raises(ReinforceError, match=refused):
            read_reinforcement(folder)
    (folder / "reinforce.json").unlink()
    os.mkfifo(folder / "reinforce.json")  # never waited on
    with pytest.raises(ReinforceError, match="not a regular file"):
        read_reinforcement(folder)


def test_a_replaced_text_tower_is_refused(augmented_set, tmp_path):
    import safetensors.torch

    from training.data.reinforced import ReinforceError, read_reinforcement

    folder = tmp_path / "set"
    shutil.copytree(augmented_set, folder)
    tower = safetensors.torch.load_file(str(folder / "teacher_text.safetensors"))
    tower["logit_scale"] = tower["logit_scale"] * 2
    safetensors.torch.save_file(tower, str(folder / "teacher_text.safetensors"))
    with pytest.raises(ReinforceError, match="not the file reinforce.json names"):
        read_reinforcement(folder).text_tower()


def test_an_unfinished_set_or_other_settings_are_refused(augmented_set, teacher_weights, tiny_corpus, tmp_path):
    from foundation.errors import UserError
    from training.data.reinforced import ReinforceError, find_reinforcement
    from utils.reinforce import build_parser, reinforce

    folder = tmp_path / "set"
    shutil.copytree(augmented_set, folder)
    header = json.loads((folder / "reinforce.json").read_text())
    (folder / "reinforce.json").write_text(json.dumps({**header, "complete": False}))
    with pytest.raises(ReinforceError, match="unfinished reinforced set"):
        find_reinforcement(str(folder / "{000000..000002}.tar"))
    args = build_parser().parse_args(["--teacher-model", TEACHER, "--teacher-pretrained", str(teacher_weights),
                                      "--train-data", str(tiny_corpus / "train.tsv"), "--out", str(folder),
                                      "--views", "2", "--shard-size", "16", "--dataset-size", "40", "--workers", "0"])
    with pytest.raises(UserError, match="holds a reinforced set of other settings"):
        reinforce(args)


# --- training from stored embeddings ---------------------------------------------------------------------


def _first_step(job_class, flags, train_data):
    """The first training step's losses of `job_class` as the trainer starts it (seeded, one process)."""
    from training.data import get_data
    from training.distributed import DistInfo
    from training.main import seed_everything
    from training.params import parse_args

    args = parse_args(["--train-data", train_data, "--batch-size", "16", "--workers", "0", *flags])
    seed_everything(args.seed)
    job = job_class(args, DistInfo(device=torch.device("cpu")))
    model = job.build_model()
    seed_everything(args.seed)
    transform, tokenizer = job.data_transforms(model)
    data = get_data(args, transform, tokenizer, 0, 1)
    data.set_epoch(0)
    batch = next(data.batches())
    with torch.no_grad():
        return {name: value.item() for name, value in job.loss(model.train(), batch).items()}, batch["index"]


def test_the_first_distill_step_from_stored_embeddings_equals_the_online_one(plain_set, tiny_corpus, teacher_weights):
    """One view, no augmentation: the same batch and student, and the loss of every distill loss is the online
    teacher's, whether the teacher runs on the original shard, on the reinforced one, or not at all."""
    from training.jobs.distill import DistillJob

    teacher = ["--teacher-model", TEACHER, "--teacher-pretrained", str(teacher_weights)]
    common = ["--job", "distill", "--student", "mobilenet_v3_small", "--distill-loss", "cosine,fd,icl,crd,affinity"]
    online, rows = _first_step(DistillJob, common + teacher, str(tiny_corpus / "shards" / "000000.tar"))
    stored, stored_rows = _first_step(DistillJob, common, str(plain_set / "000000.tar"))
    recomputed, recomputed_rows = _first_step(DistillJob, common + teacher + ["--ignore-stored-embeddings"],
                                              str(plain_set / "000000.tar"))
    assert torch.equal(rows, stored_rows) and torch.equal(rows, recomputed_rows)
    assert set(stored) == set(online) >= {"loss", "cosine_loss", "fd_loss", "icl_loss", "crd_loss", "affinity_loss"}
    for name in online:
        assert stored[name] == pytest.approx(online[name], rel=1e-5, abs=1e-6), name
        assert recomputed[name] == pytest.approx(online[name], rel=1e-5, abs=1e-6), name
    # naming the set's own teacher is accepted, and it changes nothing
    named, _ = _first_step(DistillJob, common + teacher, str(plain_set / "000000.tar"))
    assert named == stored


def test_the_first_prune_kd_step_from_stored_embeddings_equals_the_online_one(plain_set, tiny_corpus,
                                                                              teacher_weights):
    """--job prune --KD on a set reinforced with its starting model: the teacher's features are the stored ones.
    The student starts as the teacher, so the KD terms vanish in both, and the losses agree."""
    from training.jobs.prune import PruneJob

    flags = ["--job", "prune", "--model", TEACHER, "--pretrained", str(teacher_weights), "--KD", "--epochs", "2",
             "--w-kd-soft-target", "0.5"]
    online, _ = _first_step(PruneJob, flags, str(tiny_corpus / "shards" / "000000.tar"))
    stored, _ = _first_step(PruneJob, flags, str(plain_set / "000000.tar"))
    assert set(online) == set(stored) >= {"kd_feat_loss", "kd_logits_loss", "contrastive_loss"}
    for name in online:
        assert stored[name] == pytest.approx(online[name], rel=1e-5, abs=1e-6), name


def test_prune_kd_from_another_teacher_is_refused(plain_set, tmp_path):
    import open_clip

    from foundation.errors import UserError
    from training.distributed import DistInfo
    from training.jobs.prune import PruneJob
    from training.params import parse_args

    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model(TEACHER).state_dict(), other)
    args = parse_args(["--job", "prune", "--model", TEACHER, "--pretrained", str(other), "--KD", "--epochs", "2",
                       "--train-data", str(plain_set / "000000.tar")])
    with pytest.raises(UserError, match="stores the embeddings of clipc-vit-t2-32, sha256"):
        PruneJob(args, DistInfo(device=torch.device("cpu"))).build_model()


def test_protorkd_teacher_rows_come_from_the_stored_caption_embeddings(augmented_set, tiny_corpus, teacher_weights):
    """The rows the set holds are its stored embeddings, the others (past its 40 rows, or whose caption is not
    the TSV's) the teacher's own: both what the online teacher cache would hold."""
    from compress.models.text_students import FrozenTextEncoder
    from training.data.reinforced import read_reinforcement
    from training.jobs.protorkd import StoredTeacherRows

    captions = [line.split("\t", 1)[1] for line in (tiny_corpus / "train.tsv").read_text().splitlines()[1:]]
    captions[5] = "a caption the set does not hold"
    teacher = FrozenTextEncoder({"type": "open_clip", "model": TEACHER, "pretrained": str(teacher_weights)})
    rows = StoredTeacherRows(read_reinforcement(augmented_set), captions, teacher, 16)
    first, second = rows.encode(list(range(0, 32))), rows.encode(list(range(32, 56)))
    assert (rows.read, rows.computed, rows.differing) == (39, 17, 1)  # rows 5 and 40..55 computed
    expected = teacher.encode(captions[:56])
    torch.testing.assert_close(torch.cat([first, second]), expected, atol=5e-3, rtol=5e-3)


@pytest.mark.slow
def test_a_distill_run_reads_stored_embeddings_and_a_teacher_mismatch_is_one_line(plain_set, teacher_weights,
                                                                                  tmp_path):
    import compress
    from training.data.reinforced import file_sha256

    common = ["--job", "distill", "--train-data", str(plain_set / "000000.tar"), "--batch-size", "16",
              "--workers", "0", "--epochs", "1", "--stop-after-steps", "2", "--report-to", "none",
              "--distill-loss", "cosine,icl", "--logs", str(tmp_path)]
    result = run_trainer(common + ["--name", "stored"])
    assert f"using stored teacher embeddings from {TEACHER}, sha256" in result.stderr
    student = compress.load(str(tmp_path / "stored" / "checkpoints" / "epoch_latest.pt"))
    teacher = compress.load(str(teacher_weights))
    tokens = compress.get_tokenizer(student.model_spec)(["two large red circles"])
    assert torch.equal(student.encode_text(tokens), teacher.encode_text(tokens))  # the stored text tower
    refused = run_trainer(common + ["--name", "other", "--teacher-model", "clipc-vit-t2-64"], check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --teacher-model/--teacher-pretrained name teacher clipc-vit-t2-64, but {plain_set} "
                      f"stores the embeddings of {TEACHER}, sha256 {file_sha256(teacher_weights)[:12]}: pass "
                      f"--ignore-stored-embeddings to compute this teacher's embeddings online, or train on shards "
                      f"reinforced with it"]


# --- resume --------------------------------------------------------------------------------------------


def _files(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_shards_of_an_uninterrupted_torchrun(tiny_corpus, teacher_weights, tmp_path):
    """SIGKILL mid-run (a shard half written), then the same command: every file is byte for byte what an
    uninterrupted run writes, here one under torchrun with two ranks, each writing its share of the shards."""
    flags = ["--teacher-model", TEACHER, "--teacher-pretrained", str(teacher_weights), "--train-data",
             str(tiny_corpus / "train.tsv"), "--views", "2", "--shard-size", "4", "--dataset-size", "120",
             "--workers", "0", "--batch-size", "2"]
    interrupted = tmp_path / "interrupted"
    with launched([sys.executable, "-m", "utils.reinforce", *flags, "--out", str(interrupted)], cwd=REPO,
                  env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 240
        while len(list(interrupted.glob("*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = len(list(interrupted.glob("*.tar")))
    assert 3 <= written < 30, f"{written} of 30 shards when killed"
    resumed = subprocess.run([sys.executable, "-m", "utils.reinforce", *flags, "--out", str(interrupted)], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{30 - written} of this rank's 30 shard(s) to write" in resumed.stderr

    whole = tmp_path / "whole"
    uninterrupted = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    "-m", "utils.reinforce", *flags, "--out", str(whole)], cwd=REPO,
                                   env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert "15 of this rank's 15 shard(s) to write (2 process(es))" in uninterrupted.stderr
    mine, theirs = _files(interrupted), _files(whole)
    assert sorted(mine) == sorted(theirs) and len([n for n in mine if n.endswith(".tar")]) == 30
    assert [name for name in mine if mine[name] != theirs[name]] == []
    with tarfile.open(interrupted / "000007.tar") as tar:  # a whole shard: 4 samples of 6 members
        assert len(tar.getnames()) == 4 * 6
