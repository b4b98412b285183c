"""ProtoRKD: losses against hand-computed values, prototypes on 2 gloo ranks, exact mid-episode resume, and
end-to-end runs of `--job protorkd` whose student `compress.load` rebuilds with its teacher's text side."""
import math
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import run_trainer
from test_image_teachers import _ssl_files

from compress.ops import distill_losses
from training import proto

# --- losses, hand-computed -----------------------------------------------------------------------------


def test_simreg_is_squared_distance_of_normalised_features():
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    # row 0: (0.6, 0.8) - (1, 0) = (-0.4, 0.8) -> 0.16 + 0.64 = 0.8 ; row 1: identical directions -> 0
    assert distill_losses.simreg_loss(student, teacher).item() == pytest.approx(0.4)


# a 3-4-5 right triangle (student) against three collinear points (teacher)
TRIANGLE = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
LINE = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # another width: RKD allows it


def test_rkd_distance_compares_mean_normalised_distance_matrices():
    # triangle: d01=3, d02=4, d12=5, mean 4 -> .75, 1, 1.25 ; line: 1, 2, 1, mean 4/3 -> .75, 1.5, .75
    # differences 0, -.5, .5, each twice in the 3x3 matrix; smooth-L1 0.5*x^2 = .125 -> 4 * .125 / 9
    assert distill_losses.rkd_distance_loss(TRIANGLE, LINE).item() == pytest.approx(0.5 / 9, abs=1e-6)


def test_rkd_angle_compares_triplet_cosines():
    # angle cosines at each vertex j between the other two: triangle 0 (right angle), .6, .8 ; line 1, -1, 1
    # each appears twice (i,k and k,i) in the 27 entries; the rest are 0 in both (i == k gives 1 in both,
    # i == j or k == j a zero vector). smooth-L1: |-1| -> .5, |1.6| -> 1.1, |-.2| -> .02
    expected = 2 * (0.5 + 1.1 + 0.02) / 27
    assert distill_losses.rkd_angle_loss(TRIANGLE, LINE).item() == pytest.approx(expected, abs=1e-6)


def test_rkd_gradient_reaches_the_student_only():
    student = TRIANGLE.clone().requires_grad_(True)
    teacher = LINE.clone().requires_grad_(True)
    (distill_losses.rkd_distance_loss(student, teacher) + distill_losses.rkd_angle_loss(student, teacher)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_proto_loss_hard_and_soft_targets():
    features = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logit_scale = torch.tensor(2.0)  # tau = 2: logits (2, 0)
    labels = torch.tensor([0])
    hard = distill_losses.proto_loss(features, prototypes, prototypes, labels, logit_scale, -1)
    assert hard.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # T = 1: targets softmax((1, 0)) = (e, 1) / (e + 1); log-probs -log(1 + e^-2), -2 - log(1 + e^-2)
    p0, p1 = math.e / (math.e + 1), 1 / (math.e + 1)
    expected = p0 * math.log(1 + math.exp(-2)) + p1 * (2 + math.log(1 + math.exp(-2)))
    soft = distill_losses.proto_loss(features, prototypes, prototypes, labels, logit_scale, 1.0)
    assert soft.item() == pytest.approx(expected, abs=1e-6)


def test_proto_loss_ignores_unlabelled_rows():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.eye(2)
    scale = torch.tensor(2.0)
    one = distill_losses.proto_loss(features[:1], prototypes, prototypes, torch.tensor([0]), scale, -1)
    both = distill_losses.proto_loss(features, prototypes, prototypes, torch.tensor([0, -1]), scale, -1)
    assert both.item() == pytest.approx(one.item())


def test_back_translation_is_the_mean_per_cluster():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    translated = proto.translate_prototypes(features, torch.tensor([0, 0, 1]), k=3)
    assert torch.equal(translated, torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))  # empty cluster -> 0


def test_faiss_kmeans_separates_two_blobs_and_labels_by_nearest_centroid():
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(20, 4, generator=generator) * 0.01 + 5,
                       torch.randn(20, 4, generator=generator) * 0.01 - 5])
    centroids, labels = proto.kmeans(blobs, k=2, max_iter=10, nredo=2, seed=0)
    assert centroids.shape == (2, 4) and labels.shape == (40,)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1
    assert labels[0] != labels[20]
    assert torch.allclose(centroids[labels[0]], blobs[:20].mean(0), atol=1e-3)
    assert torch.equal(proto.assign_to_centroids(blobs, centroids), labels)


# --- prototypes on 2 ranks --------------------------------------------------------------------------------


class FakeTeacher:
    """Stands in for the sentence-transformers teacher: the job only reads its cached embeddings here."""
    dim = 16
    spec = {"type": "fake"}


def _job_and_context(corpus: str, world_size: int, rank: int, clustering_frequency: int = 1):
    """The job (PBT + external prototypes) with a fake teacher's cached embeddings, and the part of the
    trainer's RunContext it reads: a tiny student and the data's episodes."""
    from compress.models.registry import get_preprocess
    from compress.models.text_students import ImageStudent, image_student_spec
    from training.data.csv_dataset import CsvDataset, episode_indices
    from training.jobs.protorkd import ProtoRKDJob

    args = types.SimpleNamespace(distiller="proto", w_proto_external=1.0, PBT=True, k=4, kmeans_max_iter=10,
                                 kmeans_nredo=1, kmeans_max_points_per_centroid=256, seed=0, batch_size=8, workers=0,
                                 precision="fp32", infonce_warmup_epoch=0,
                                 lit_start_epoch=-1, clustering_frequency=clustering_frequency,
                                 episode_size=64)
    dist_info = types.SimpleNamespace(rank=rank, world_size=world_size, local_rank=rank,
                                      device=torch.device("cpu"), is_master=rank == 0)
    job = ProtoRKDJob(args, dist_info)
    torch.manual_seed(0)  # the same student on every rank, as the trainer guarantees
    spec = image_student_spec("clipc-vit-t2-32", {"type": "fake"}, FakeTeacher.dim, True, 32, 1)
    model = ImageStudent(spec, text_encoder=FakeTeacher())
    dataset = CsvDataset(os.path.join(corpus, "train.tsv"), get_preprocess(spec))
    job.teacher = FakeTeacher()
    job.dataset_size, job.episode_size = len(dataset), args.episode_size
    job.teacher_features = np.random.default_rng(1).normal(size=(len(dataset), FakeTeacher.dim)).astype(np.float32)
    job.external_features = np.random.default_rng(2).normal(size=(len(dataset), 8)).astype(np.float32)
    data = types.SimpleNamespace(dataset=dataset, episode_indices=lambda epoch: episode_indices(
        len(dataset), args.episode_size, args.seed, epoch))  # the trainer's DataInfo, as far as the job sees it
    return job, types.SimpleNamespace(unwrapped_model=model, data=data)


def _cluster_once(corpus: str, world_size: int, rank: int, out: str, episodes: int = 1,
                  clustering_frequency: int = 1) -> None:
    """Start `episodes` episodes; save the job state of each, with the episode's rows this rank computed."""
    job, ctx = _job_and_context(corpus, world_size, rank, clustering_frequency)
    states = []
    for episode in range(episodes):
        job.on_epoch_start(episode, ctx)
        assert "mapping" not in job.state_dict()  # a pure function of (seed, episode): nothing to save
        states.append({**job.state_dict(), "mapping": job.mapping})
    torch.save({"state": states[0], "states": states, "teacher": torch.from_numpy(job.teacher_features)},
               os.path.join(out, f"rank{rank}.pt"))


def fork_ranks(main, *args) -> None:
    """`main(rank, *args)` in 2 forked processes, joined. Forked, not spawned: a spawned rank imports torch,
    faiss and the test modules again, most of a minute on 2 busy cores. A fork inherits none of its parent's
    OpenMP worker threads, yet the runtime waits for them in the fork's first parallel region, for ever (faiss's
    k-means hangs): each rank runs one thread, as a trainer rank on 2 cores does."""
    mp.start_processes(_one_thread, args=(main, *args), nprocs=2, join=True, start_method="fork")


def _one_thread(rank: int, main, *args) -> None:
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    main(rank, *args)


def _rank_main(rank: int, corpus: str, out: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other tests on the machine
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        _cluster_once(corpus, 2, rank, out)
        torch.distributed.barrier()  # both ranks done talking before the connections close
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_hold_identical_prototypes_equal_to_one_process(tiny_corpus, tmp_path):
    fork_ranks(_rank_main, str(tiny_corpus), str(tmp_path))
    (tmp_path / "single").mkdir()
    _cluster_once(str(tiny_corpus), 1, 0, str(tmp_path / "single"))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    s0, s1, s = rank0["state"], rank1["state"], single["state"]
    assert torch.equal(s0["mapping"], s1["mapping"]) and torch.equal(s0["mapping"], s["mapping"])
    names = {"text_centroids", "text_labels", "image_prototypes", "external_centroids", "external_labels",
             "image_prototypes_external"}
    assert set(s0["prototypes"]) == names
    for name in names:
        assert torch.equal(s0["prototypes"][name], s1["prototypes"][name]), name  # broadcast: bit-identical
    # gathering covered every episode sample in order: the same prototypes as one process computing all
    assert torch.equal(s0["prototypes"]["text_labels"], s["prototypes"]["text_labels"])
    for name in ("image_prototypes", "image_prototypes_external"):
        assert torch.allclose(s0["prototypes"][name], s["prototypes"][name], atol=1e-5), name


def test_an_old_checkpoints_saved_mapping_is_ignored_on_resume(tiny_corpus):
    """Checkpoints from before the mapping was recomputed hold it in job_state: a resume mid-episode
    recomputes the rows (the same ones), keeps the saved prototypes and labels the rows by them."""
    job, ctx = _job_and_context(str(tiny_corpus), 1, 0)
    job.on_epoch_start(0, ctx)
    old_state = {**job.state_dict(), "mapping": torch.zeros(64, dtype=torch.long)}  # a stale copy, wrong on purpose
    resumed, resumed_ctx = _job_and_context(str(tiny_corpus), 1, 0)
    resumed.load_state_dict(old_state)
    resumed.on_epoch_start(0, resumed_ctx)
    assert torch.equal(resumed.mapping, ctx.data.episode_indices(0)) and torch.equal(resumed.mapping, job.mapping)
    for name, value in job.prototypes.items():
        assert torch.equal(resumed.prototypes[name], value), name  # restored, not re-clustered
    for name, lookup in job.label_of_row.items():
        assert torch.equal(resumed.label_of_row[name], lookup), name
    assert "mapping" not in resumed.state_dict()


def test_between_clusterings_a_new_episode_is_labelled_by_nearest_centroid(tiny_corpus, tmp_path):
    _cluster_once(str(tiny_corpus), 1, 0, str(tmp_path), episodes=2, clustering_frequency=2)
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    first, second = saved["states"]
    assert first["clustered_episode"] == second["clustered_episode"] == 0
    assert not torch.equal(first["mapping"], second["mapping"])  # a new episode …
    for name in ("text_centroids", "image_prototypes", "external_centroids", "image_prototypes_external"):
        assert torch.equal(first["prototypes"][name], second["prototypes"][name]), name  # … same prototypes
    rows = torch.nn.functional.normalize(saved["teacher"][second["mapping"]], dim=1)
    distances = torch.cdist(rows, first["prototypes"]["text_centroids"])
    assert torch.equal(second["prototypes"]["text_labels"], distances.argmin(dim=1))


# --- end to end through the trainer ---------------------------------------------------------------------------


def _train(corpus: Path, logs: Path, name: str, cache: Path, *extra: str):
    args = ["--job", "protorkd", "--train-data", str(corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
            "--logs", str(logs), "--name", name, "--epochs", "2", "--batch-size", "16", "--workers", "0",
            "--episode-size", "64", "--distiller", "mse,rkd,proto", "--k", "4", "--PBT",
            "--target-temperature", "0.1", "--w-proto-external", "1", "--add-projection-head",
            "--projection-hidden-dim", "32", "--teacher-cache-dir", str(cache), "--warmup", "2",
            "--log-every-n-steps", "2", "--log-level", "warning", *extra]
    return run_trainer(args, timeout=300)


def _checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def whole_run(tiny_corpus, tmp_path_factory):
    """(logs, teacher cache) of an uninterrupted 2-episode run, which built the cache (fp32)."""
    root = tmp_path_factory.mktemp("protorkd")
    logs, cache = root / "logs", root / "cache"
    _train(tiny_corpus, logs, "whole", cache)
    return logs, cache


@pytest.mark.slow
def test_end_to_end_and_mid_episode_resume(tiny_corpus, whole_run):
    logs, cache = whole_run
    _train(tiny_corpus, logs, "cut", cache, "--stop-after-steps", "6")  # 4 steps per episode: stops inside episode 1
    mid = _checkpoint(logs / "cut" / "checkpoints" / "epoch_latest.pt")
    assert mid["epoch"] == 1 and mid["step_in_epoch"] == 2 and mid["job_state"]["episode"] == 1
    _train(tiny_corpus, logs, "cut", cache, "--resume", "latest")

    whole = _checkpoint(logs / "whole" / "checkpoints" / "epoch_2.pt")
    resumed = _checkpoint(logs / "cut" / "checkpoints" / "epoch_2.pt")
    for state in (whole["job_state"], resumed["job_state"]):
        assert state["episode"] == 1 and state["clustered_episode"] == 1
    # the episode's rows are recomputed from (seed, episode), never saved; the resumed run kept the
    # prototypes it was cut in (no re-clustering on a changed model) …
    assert not any("mapping" in ckpt["job_state"] for ckpt in (mid, whole, resumed))
    for name, value in mid["job_state"]["prototypes"].items():
        assert torch.equal(resumed["job_state"]["prototypes"][name], value), name
    # … which are those of the uninterrupted run, and so are the weights it ends with
    for name, value in whole["job_state"]["prototypes"].items():
        assert torch.allclose(resumed["job_state"]["prototypes"][name].float(), value.float(), atol=1e-6), name
    for key, value in whole["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][key].float(), value.float(), atol=1e-5), key
    # the teacher stays out of the checkpoint; the cache was built once and reused by the later runs
    assert not any(key.startswith("text_encoder") for key in whole["state_dict"])
    assert len(list(cache.glob("teacher_*.npy"))) == 1

    # the student rebuilds from its spec with the teacher's text side: encode_text = the cached embeddings
    import compress

    student = compress.load(str(logs / "whole" / "checkpoints" / "epoch_2.pt"))
    cached = np.load(next(cache.glob("teacher_*.npy")))
    captions = [line.split("\t", 1)[1] for line in (tiny_corpus / "train.tsv").read_text().splitlines()[1:4]]
    assert torch.allclose(student.encode_text(captions), torch.from_numpy(cached[:3]), atol=1e-4)
    assert student.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, cached.shape[1])


@pytest.mark.slow
def test_two_process_run_through_warmup_prototypes_and_lit(tiny_corpus, tmp_path):
    """torchrun, 2 gloo processes: episode 0 InfoNCE only (warm-up), episode 1 with prototypes, episode 2 LiT
    (frozen backbone, head + temperature trained with InfoNCE)."""
    run_trainer(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
                 "--logs-root", str(tmp_path), "--name", "ddp", "--epochs", "3", "--batch-size", "16", "--workers", "0",
                 "--episode-size", "128", "--distiller", "rkd,proto", "--k", "4", "--PBT", "--w-proto-external", "1",
                 "--infonce-warmup-epoch", "1", "--lit-start-epoch", "2", "--add-projection-head",
                 "--projection-hidden-dim", "32", "--log-level", "warning"], nproc=2, timeout=300)
    before_lit, after_lit = (_checkpoint(tmp_path / "ddp" / "checkpoints" / f"epoch_{e}.pt") for e in (2, 3))
    assert before_lit["job_state"]["clustered_episode"] == after_lit["job_state"]["clustered_episode"] == 1
    weights_before, weights_after = before_lit["state_dict"], after_lit["state_dict"]
    assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before if k.startswith("visual."))
    assert not torch.equal(weights_before["head.0.weight"], weights_after["head.0.weight"])
    assert not torch.equal(weights_before["logit_scale"], weights_after["logit_scale"])


def test_clip_teacher_is_referenced_by_its_weights_file_and_rebuilt_on_load(tmp_path):
    import open_clip

    import compress
    from compress.models.text_students import FrozenTextEncoder, ImageStudent, image_student_spec
    from foundation.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(open_clip.create_model("clipc-vit-t2-32").state_dict(), weights)
    text_spec = {"type": "open_clip", "model": "clipc-vit-t2-32", "pretrained": str(weights)}
    teacher = FrozenTextEncoder(text_spec)
    spec = image_student_spec("resnet18", text_spec, teacher.dim, image_size=32)  # torchvision backbone
    student = ImageStudent(spec, text_encoder=teacher)
    assert spec["head"] == {"n_layers": 0, "hidden_dim": 2048}  # 512-d resnet18 features -> one Linear to 64
    assert not any(key.startswith("text") for key in student.state_dict())
    # a checkpoint never chooses what file is read: the caller names the teacher's weights it trusts
    with pytest.raises(ValueError, match="text_encoder.pretrained"):
        compress.load({"model_spec": spec, "state_dict": student.state_dict()})
    loaded = compress.load({"model_spec": spec, "state_dict": student.state_dict()},
                           allowed_text_encoders=[str(weights)])
    captions = ["two red circles", "a blue star"]
    assert torch.equal(loaded.encode_text(captions), teacher.encode(captions))
    images = torch.randn(2, 3, 32, 32)
    student.eval()
    assert torch.allclose(loaded.encode_image(images), student.encode_image(images))


@pytest.mark.slow
def test_user_errors_are_one_line(tiny_corpus, tmp_path):
    result = run_trainer(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model",
                          "clipc-vit-t2-32", "--logs", str(tmp_path), "--name", "bad", "--distiller", "mse,dino"],
                         check=False)
    assert result.returncode == 2
    assert "error: --distiller 'mse,dino'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_teacher_cache_is_built_under_the_runs_autocast_and_keyed_on_it(tiny_corpus, whole_run, tmp_path):
    """--precision amp_bf16 embeds the captions under bf16 autocast, as the training steps run: a cache of its
    own (fp32 features differ in their last bits), close to the fp32 one (the uninterrupted run's, same data and
    teacher) but not equal to it."""
    import numpy as np

    logs, cache = tmp_path / "logs", tmp_path / "cache"
    shutil.copytree(whole_run[1], cache)  # a copy: the end-to-end test counts the files of its own
    (fp32_cache,) = cache.glob("teacher_*.npy")
    _train(tiny_corpus, logs, "bf16", cache, "--stop-after-steps", "1", "--precision", "amp_bf16")
    (bf16_cache,) = set(cache.glob("teacher_*.npy")) - {fp32_cache}
    full, autocast = np.load(fp32_cache), np.load(bf16_cache)
    assert full.shape == autocast.shape and full.dtype == autocast.dtype == np.float32
    cosine = (full * autocast).sum(1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(autocast, axis=1))
    assert cosine.min() > 0.99 and not np.array_equal(full, autocast)


@pytest.mark.slow
def test_protorkd_with_an_image_teacher_end_to_end(tiny_corpus, tmp_path):
    """rkd + prototypes against a MoCo-shaped resnet18 teacher: its features are cached by row from its own
    eval transform, and the student it leaves has no text side (linear probe only)."""
    _ssl_files(tmp_path)
    cache = tmp_path / "cache"
    run_trainer(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
                 "--teacher-model", "resnet18", "--teacher-pretrained", str(tmp_path / "moco.pth"),
                 "--teacher-features", "head", "--teacher-image-size", "32", "--distiller", "rkd,proto",
                 "--k", "4", "--PBT", "--episode-size", "64", "--epochs", "1", "--batch-size", "16",
                 "--workers", "1", "--teacher-batch-size", "48", "--logs", str(tmp_path / "logs"), "--name", "ssl",
                 "--teacher-cache-dir", str(cache), "--warmup", "1", "--log-level", "warning"], timeout=300)
    out_log = (tmp_path / "logs" / "ssl" / "out.log").read_text()
    assert "image teacher resnet18 from" in out_log and "momentum encoder" in out_log
    features = np.load(next(cache.glob("teacher_*.npy")))
    assert features.shape == (256, 128) and np.abs(features).sum(axis=1).min() > 0  # every row embedded

    from compress.models.image_teachers import FrozenImageTeacher
    from training.data.csv_dataset import CsvDataset

    teacher = FrozenImageTeacher("resnet18", str(tmp_path / "moco.pth"), "head", image_size=32)
    rows = CsvDataset(str(tiny_corpus / "train.tsv"), teacher.transform)
    from training.data.samples import load_image

    batch = torch.stack([teacher.transform(load_image(rows.paths[i], lambda: "row")) for i in (0, 97, 255)])
    assert torch.allclose(torch.from_numpy(features[[0, 97, 255]]), teacher.encode(batch), atol=1e-4)

    import compress
    import eval as evaluation

    checkpoint = tmp_path / "logs" / "ssl" / "checkpoints" / "epoch_1.pt"
    spec = torch.load(checkpoint, weights_only=True)["model_spec"]
    assert spec["text_encoder"] is None and spec["text_input"] == "none"
    student = compress.load(str(checkpoint))
    with pytest.raises(ValueError, match="no text side"):
        student.encode_text(["a red circle"])
    encoder = evaluation.load_encoder(str(checkpoint))
    assert encoder.tokenizer is None
    metrics = evaluation.run_benchmarks(encoder, tiny_corpus / "eval", benchmarks=("zeroshot", "linear_probe"))
    assert metrics and all(key.startswith("linear_probe/") for key in metrics)


def _gather_main(rank: int, corpus: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        job, ctx = _job_and_context(corpus, 2, rank)
        job.mapping = job.episode_indices(0, ctx)
        features = job.episode_image_features(ctx)
        torch.save({"features": features}, os.path.join(out, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_back_translation_features_reach_rank_zero_only(tiny_corpus, tmp_path):
    fork_ranks(_gather_main, str(tiny_corpus), str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["features"].shape == (64, 16) and rank1["features"] is None


# --- every CLIP family as a text teacher ----------------------------------------------------------------

# module-scoped fixtures of tests/test_families.py: the families' tiny configs (SigLIP's stand-in tokenizer
# included) and each family's random-init CLIP saved as one of our checkpoints
from test_families import FAMILIES, config_name, family_configs, family_models, teachers  # noqa: E402,F401


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_is_a_text_teacher_with_its_own_tokenizer_and_text_tower(family, teachers,  # noqa: F811
                                                                             family_models):  # noqa: F811
    """The teacher --job protorkd builds from --teacher-model/--teacher-pretrained embeds captions (what its row
    cache holds) as the family's CLIP does through its own tokenizer and text tower (a CustomTextCLIP's `text.`,
    CoCa's cls-token pooling, SigLIP's Hugging Face tokenizer), unnormalised, at the CLIP's embedding width."""
    from compress.models.registry import get_tokenizer
    from training.distributed import DistInfo
    from training.jobs.protorkd import ProtoRKDJob
    from training.params import parse_args

    args = parse_args(["--job", "protorkd", "--train-data", "synthetic", "--teacher-model", config_name(family),
                       "--teacher-pretrained", str(teachers[family])])
    job = ProtoRKDJob(args, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    teacher = job.build_teacher(job.text_encoder_spec())
    clip = family_models[family]  # compress.load of the same checkpoint
    captions = ["one red circle", "two blue squares", "a green star on a plain background"]
    with torch.no_grad():
        expected = clip.encode_text(get_tokenizer(clip.model_spec)(captions), normalize=False)
    embeddings = teacher.encode(captions, batch_size=2)
    assert teacher.dim == expected.shape[1] == embeddings.shape[1]
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(embeddings.norm(dim=-1), torch.ones(len(captions)))  # as the tower gives them


@pytest.mark.slow
def test_protorkd_trains_from_a_siglip_teacher(tiny_corpus, teachers, tmp_path):  # noqa: F811
    """A whole --job protorkd run (in this process, where the tiny family configs are registered) with SigLIP's text
    tower as teacher: its row cache holds the SigLIP CLIP's caption embeddings, and the student rebuilds with that
    teacher as its text side."""
    import compress
    from training.main import main

    weights = str(teachers["siglip"])
    main(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
          "--teacher-model", config_name("siglip"), "--teacher-pretrained", weights, "--logs", str(tmp_path),
          "--name", "siglip", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--episode-size", "32",
          "--distiller", "mse,infonce", "--teacher-cache-dir", str(tmp_path / "cache"), "--log-level", "warning",
          "--report-to", "none"])
    cached = np.load(next((tmp_path / "cache").glob("teacher_*.npy")))
    student = compress.load(str(tmp_path / "siglip" / "checkpoints" / "epoch_1.pt"), allowed_text_encoders=[weights])
    assert student.model_spec["text_encoder"] == {"type": "open_clip", "model": config_name("siglip"),
                                                  "pretrained": weights}
    captions = [line.split("\t", 1)[1] for line in (tiny_corpus / "train.tsv").read_text().splitlines()[1:4]]
    clip = compress.load(weights)
    with torch.no_grad():
        expected = clip.encode_text(compress.get_tokenizer(clip.model_spec)(captions))
    torch.testing.assert_close(torch.from_numpy(cached[:3]), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student.encode_text(captions), expected, rtol=1e-4, atol=1e-4)
    assert student.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, cached.shape[1])
