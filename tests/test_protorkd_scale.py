"""ProtoRKD as its users run it and at their scale: the seeds' command lines (no --job, torchrun's --logs and
--p through the launcher, wandb, epoch_latest.pt), --pretrained for the student, self-supervised image
teachers from MoCo/SimCLR/SwAV-shaped files, clustering in bounded memory with rank 0's k-means awaited
outside any collective, and the zero-shot sets of ProtoCLIP's eval tree."""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, launched, run_trainer, subprocess_env
from test_protorkd import fork_ranks

from foundation.errors import UserError
from training import proto

# --- 1. the seeds' command lines ---------------------------------------------------------------------------


def _parse(*argv):
    from training.params import parse_args

    return parse_args(["--train-data", "x.tsv", *argv])


def test_protorkd_flags_without_job_run_protorkd():
    args = _parse("--pretrained-text", "all-MiniLM-L6-v2", "--add-projection-head", "--projection-dim", "384")
    assert args.job == "protorkd"
    assert args.job_from_flags == "--pretrained-text, --add-projection-head, --projection-dim"
    plain = _parse("--epochs", "3")  # trainer flags only: the default job, nothing inferred
    assert plain.job == "clip" and plain.job_from_flags is None


def test_a_flag_of_another_job_is_one_line_naming_its_job():
    with pytest.raises(UserError, match=r"^--k belongs to --job protorkd: not a flag of --job clip"):
        _parse("--job", "clip", "--k", "5")
    with pytest.raises(UserError, match=r"^--p/--prune-ratio belongs to --job prune: not a flag of --job distill"):
        _parse("--job", "distill", "--p", "0.3")
    # a flag two jobs share (add_argument_once) belongs to each of them
    assert _parse("--job", "distill", "--teacher-model", "x").job == "distill"
    assert _parse("--job", "protorkd", "--teacher-model", "x").job == "protorkd"
    with pytest.raises(UserError, match=r"--teacher-model \(--job distill or protorkd\); pass --job"):
        _parse("--teacher-model", "x")
    with pytest.raises(UserError, match=r"--distill-loss \(--job distill\), --k \(--job protorkd\)"):
        _parse("--k", "3", "--distill-loss", "cosine")


def test_help_still_lists_every_jobs_flags(capsys):
    from training.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "--job protorkd:" in stdout and "--kmeans-max-points-per-centroid" in stdout


@pytest.mark.slow
def test_report_to_wandb_is_offline_capable_or_one_line(tiny_corpus, tmp_path, monkeypatch):
    from training import reporting

    # without the package: one line naming the extra and the alternative
    monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"clipcompress\[wandb\].*--report-to tensorboard"):
        reporting.parse_report_to("tensorboard,wandb")
    monkeypatch.undo()
    with pytest.raises(UserError, match="a comma list"):
        reporting.parse_report_to("wandb,none")
    args = ["--job", "clip", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
            "--logs", str(tmp_path), "--name", "wb", "--epochs", "1", "--batch-size", "16", "--workers", "0",
            "--report-to", "wandb,tensorboard", "--stop-after-steps", "2", "--no-save-most-recent"]
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    result = run_trainer(args, env=env, check=False, timeout=240)
    if importlib.util.find_spec("wandb") is None:
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --report-to wandb")
        return
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # logged without a network
    assert list((tmp_path / "wb" / "tensorboard").glob("events.out.tfevents.*"))
    # stopped by --stop-after-steps: only the mid-epoch latest, no epoch-end copy was asked for
    assert [p.name for p in (tmp_path / "wb" / "checkpoints").iterdir()] == ["epoch_latest.pt"]


def test_launcher_passes_logs_and_p_through():
    from training.launch import build_parser

    args = build_parser().parse_args(["--nproc_per_node", "2", "-m", "training.main", "--logs", "logs",
                                      "--p", "0.5", "--nnodes", "9"])
    assert args.module and args.training_script == "training.main"
    assert args.training_script_args == ["--logs", "logs", "--p", "0.5", "--nnodes", "9"]
    assert args.nnodes == "1:1"  # after the script, torchrun's own option names are the script's


def _launch(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run a launcher command; its whole process tree is killed if it fails or times out."""
    with launched(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_seed_torchrun_line_through_the_launcher_two_processes(tiny_corpus, tmp_path):
    """The ProtoRKD README's torchrun line, as written but for the launcher's name and sizes: no --job, a bare
    --logs, 2 gloo processes; then UPop's --p through the same launcher. (--standalone: a free rendezvous port,
    so concurrent test runs on one machine do not meet on torchrun's default one.)"""
    launcher = [sys.executable, "-m", "training.launch", "--standalone", "--nproc_per_node", "2",
                "-m", "training.main"]
    seed = ["--dataset-size", "256", "--episode-size", "0", "--train-data", str(tiny_corpus / "train.tsv"),
            "--epochs", "1", "--save-frequency", "4", "--batch-size", "32", "--workers", "0",
            "--model", "clipc-vit-t2-32", "--add-projection-head", "--projection-dim", "384",
            "--projection-n-layers", "2", "--pretrained-text", "all-MiniLM-L6-v2", "--lr", "5e-4", "--warmup", "2",
            "--wd", "0.5", "--max-grad-norm", "10", "--report-to", "tensorboard", "--logs", str(tmp_path / "logs"),
            "--copy-codebase", "--name", "tea[MiniLM]_stu[vit]_[MSE](tiny)"]
    result = _launch(launcher + seed)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "logs" / "tea[MiniLM]_stu[vit]_[MSE](tiny)"
    out_log = (run / "out.log").read_text()
    assert "job protorkd, 2 process(es)" in out_log
    assert ("no --job given: running --job protorkd, the job of --pretrained-text, --add-projection-head, "
            "--projection-dim, --projection-n-layers") in out_log
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"epoch_1.pt", "epoch_latest.pt"}
    assert (run / "code" / "src" / "training" / "launch.py").is_file()

    prune = ["--job", "prune", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
             "--logs", str(tmp_path / "logs"), "--name", "upop", "--epochs", "2", "--batch-size", "16",
             "--workers", "0", "--p", "0.5", "--stop-after-steps", "2", "--warmup", "1"]
    result = _launch(launcher + prune)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "p: 0.5" in (tmp_path / "logs" / "upop" / "params.txt").read_text().splitlines()


# --- 2. --pretrained for the ProtoRKD student ---------------------------------------------------------------


def _protorkd_job(*argv):
    from training.jobs.protorkd import ProtoRKDJob
    from training.params import parse_args

    args = parse_args(["--job", "protorkd", "--train-data", "x.tsv", *argv])
    dist_info = types.SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                      is_master=True)
    return ProtoRKDJob(args, dist_info)


def test_pretrained_fills_the_students_backbone(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "r18.pth")
    model = _protorkd_job("--model", "resnet18", "--force-image-size", "32", "--distiller", "rkd",
                          "--pretrained", str(tmp_path / "r18.pth")).build_model()
    assert torch.equal(model.visual.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.visual.bn1.running_var, source.bn1.running_var)

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    # resnet34 holds every tensor of a resnet18 and more: refused, not loaded as a truncated copy
    with pytest.raises(UserError, match=r"^--pretrained \(resnet18\) .*r34.pth does not fit: .* lacks \(e.g. layer1.2"):
        _protorkd_job("--model", "resnet18", "--distiller", "rkd",
                      "--pretrained", str(tmp_path / "r34.pth")).build_model()
    with pytest.raises(UserError, match="takes a local weights file"):
        _protorkd_job("--model", "resnet18", "--distiller", "rkd", "--pretrained", "openai").build_model()


# --- 3. self-supervised image teachers ---------------------------------------------------------------------


def _ssl_files(tmp_path: Path):
    """resnet18 weights laid out as MoCo v2's, SimCLR's and SwAV's checkpoints; the source nets."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))  # MoCo v2
    momentum = torchvision.models.resnet18(weights=None)
    moco = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    moco.update({f"module.encoder_k.{k}": v for k, v in momentum.state_dict().items()})
    moco.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": moco,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}, tmp_path / "moco.pth")
    torch.save(net.state_dict(), tmp_path / "simclr.pth")  # a raw state dict
    swav = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    head = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 32))
    swav.update({f"module.projection_head.{k}": v for k, v in head.state_dict().items()})
    swav["module.prototypes.weight"] = torch.randn(100, 32)
    torch.save({"epoch": 800, "state_dict": swav}, tmp_path / "swav.pth.tar")
    return net.eval(), head.eval()


def test_image_teachers_from_moco_simclr_and_swav_files(tmp_path, caplog):
    from compress.models.image_teachers import FrozenImageTeacher

    net, swav_head = _ssl_files(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = torch.flatten(torch.nn.Sequential(*list(net.children())[:-1])(images), 1)
        projected = net(images)
    moco = FrozenImageTeacher("resnet18", str(tmp_path / "moco.pth"), image_size=32)
    assert moco.dim == 512 and torch.allclose(moco.encode(images), pooled, atol=1e-5)
    assert "prefix 'module.encoder_q.' stripped" in moco.description
    assert "encoder_k (momentum encoder) (122)" in moco.description and "queue (queue) (1)" in moco.description
    assert "fc (projection head) (4)" in moco.description
    moco_head = FrozenImageTeacher("resnet18", str(tmp_path / "moco.pth"), "head", image_size=32)
    assert moco_head.dim == 128 and torch.allclose(moco_head.encode(images), projected, atol=1e-5)
    simclr = FrozenImageTeacher("resnet18", str(tmp_path / "simclr.pth"), "head", image_size=32)
    assert torch.allclose(simclr.encode(images), projected, atol=1e-5)
    swav = FrozenImageTeacher("resnet18", str(tmp_path / "swav.pth.tar"), "head", image_size=32)
    assert "prototypes (SwAV prototypes) (1)" in swav.description
    assert torch.allclose(swav.encode(images), swav_head(pooled), atol=1e-5)
    assert swav.module[0].training is False  # frozen: BatchNorm statistics never move
    # one clear line when the file does not fit the architecture, or is no weights-only file
    with pytest.raises(ValueError, match=r"^--teacher-pretrained \(resnet34\) .*moco.pth does not fit"):
        FrozenImageTeacher("resnet34", str(tmp_path / "moco.pth"))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "opt": types.SimpleNamespace(lr=1)}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        FrozenImageTeacher("resnet18", str(tmp_path / "pickle.pth"))


def test_distill_student_pretrained_takes_a_moco_file(tmp_path):
    from compress.models.registry import build_model
    from compress.models.students import load_torchvision_weights, student_clip_spec, student_image_spec

    net, _ = _ssl_files(tmp_path)
    model = build_model(student_clip_spec(student_image_spec("resnet18", "clipc-vit-t2-32"), "clipc-vit-t2-32"))
    report = load_torchvision_weights(model.visual, str(tmp_path / "moco.pth"))
    assert torch.equal(model.visual.net.layer2[0].conv1.weight, net.layer2[0].conv1.weight)
    assert "momentum encoder" in report and model.visual.net.fc.out_features == 64  # the projection stays fresh


def test_swav_wide_resnet_widths():
    from compress.models.image_teachers import swav_wide_resnet50

    net = swav_wide_resnet50(2)
    assert net.conv1.out_channels == 128 and net.layer4[-1].conv3.out_channels == 4096
    assert 93e6 < sum(p.numel() for p in net.parameters()) < 95e6  # SwAV's RN50-w2: 94M parameters


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


# --- 4. clustering at scale ---------------------------------------------------------------------------------


def test_chunked_assignment_equals_the_dense_argmin():
    generator = torch.Generator().manual_seed(0)
    features, centroids = torch.randn(1000, 8, generator=generator), torch.randn(37, 8, generator=generator)
    dense = torch.cdist(features, centroids).argmin(dim=1)
    assert torch.equal(proto.assign_to_centroids(features, centroids, chunk_rows=7), dense)
    assert torch.equal(proto.assign_to_centroids(features.numpy(), centroids.numpy()), dense)


@pytest.mark.slow
def test_assignment_memory_is_linear_not_rows_times_clusters():
    """200k rows x 5000 centroids: a dense score matrix would be 4 GB; the labelling stays near the features'
    own 12.8 MB (peak resident memory of a fresh process, above its baseline after imports)."""
    code = """
import resource, numpy as np, torch, faiss
from training import proto
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(0)
x, c = rng.standard_normal((200_000, 16), dtype=np.float32), rng.standard_normal((5000, 16), dtype=np.float32)
labels = proto.assign_to_centroids(x, c)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, len(labels))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120, check=True)
    peak_mib, rows = result.stdout.split()
    assert int(rows) == 200_000 and float(peak_mib) < 300, peak_mib


def test_kmeans_samples_points_per_centroid_but_labels_every_row():
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(500, 4, generator=generator) * 0.01 + 5,
                       torch.randn(500, 4, generator=generator) * 0.01 - 5])
    centroids, labels = proto.kmeans(blobs, k=2, max_iter=10, seed=0, max_points_per_centroid=20)
    assert labels.shape == (1000,) and len(set(labels[:500].tolist())) == len(set(labels[500:].tolist())) == 1
    assert torch.allclose(centroids[labels[0]], blobs[:500].mean(0), atol=1e-2)


def test_faiss_uses_the_local_ranks_gpu_only(monkeypatch):
    import faiss

    assert proto.faiss_gpu(torch.device("cpu")) is None
    if not hasattr(faiss, "StandardGpuResources"):
        assert proto.faiss_gpu(torch.device("cuda", 3)) is None  # faiss-cpu: k-means on the CPU
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 8)
    assert proto.faiss_gpu(torch.device("cuda", 3)) == 3  # rank 3's GPU, not every visible one


def _wait_main(rank: int, out: str) -> None:
    from training.distributed import compute_on_master

    torch.set_num_threads(1)
    # a 2 s collective timeout: rank 0's 6 s job must not trip it on the waiting rank
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=2))
    log_lines = []
    handler = logging.Handler()
    handler.emit = lambda record: log_lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        import time

        def slow():
            time.sleep(6)
            return {"centroids": torch.arange(4)}

        result = compute_on_master(slow, "a k-means", report_every_s=2, poll_s=0.1)

        def fails():
            raise RuntimeError("faiss ran out of memory")

        failure = None
        try:
            compute_on_master(fails, "the second k-means", poll_s=0.1)
        except (RuntimeError, UserError) as error:
            failure = f"{type(error).__name__}: {error}"
        torch.save({"result": result, "log": log_lines, "failure": failure}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_waiting_ranks_outlast_the_collective_timeout(tmp_path):
    fork_ranks(_wait_main, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0["result"]["centroids"], rank1["result"]["centroids"])
    assert any("still waiting for rank 0 (a k-means)" in line and "--dist-timeout-minutes does not apply" in line
               for line in rank1["log"])
    assert rank0["failure"] == "RuntimeError: faiss ran out of memory"
    assert rank1["failure"] == "UserError: rank 0 failed while the second k-means; its log says why"


def _gather_main(rank: int, corpus: str, out: str) -> None:
    from test_protorkd import _job_and_context

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


# --- 5. zero-shot sets in ProtoCLIP's layout ----------------------------------------------------------------


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def test_protoclip_eval_tree_gets_real_class_names_and_templates(tmp_path, caplog):
    from eval.data import discover_datasets
    from eval.templates import ZEROSHOT_SETS

    root = tmp_path / "eval"
    for number in ("000", "001", "046", "047", "499"):  # CLOOB's numbered birdsnap folders; 046 is empty there
        if number == "046":
            (root / "birdsnap" / "test" / number).mkdir(parents=True)
        else:
            _image(root / "birdsnap" / "test" / number / "a.jpg")
    for index in range(43):
        _image(root / "gtsrb" / "test" / f"{index:05d}" / "a.png")
    ucf_folders = [name.replace(" ", "") for name in ZEROSHOT_SETS["ucf101"]["classnames"]]
    for split in ("testlist01", "testlist02", "testlist03"):
        for name in ucf_folders:
            _image(root / "ucf101" / split / name / "f.jpg")
    for index in range(1000):
        _image(root / "imagenet" / "test" / f"n{index:08d}" / "a.jpg")
    (root / "imagenet" / "train").mkdir()
    (root / "downloads_tmp").mkdir()

    found, notes = discover_datasets(root)
    assert {"birdsnap", "gtsrb", "ucf101", "imagenet"} <= set(found)
    assert any(note.startswith("downloads_tmp:") and "ignored" in note for note in notes)
    assert any("testlist02, testlist03 not scored" in note for note in notes)
    with caplog.at_level(logging.INFO, logger="eval.data"):
        birdsnap = found["birdsnap"].build(lambda image: image)
    # folder n is class n of CLIP's list (ProtoCLIP deletes the empty ones from it: the same names remain)
    assert birdsnap.classnames == ["Coopers Hawk", "Northern Goshawk", "Hooded Merganser", "Blue headed Vireo"]
    assert birdsnap.templates == ["a photo of a {}, a type of bird."] and len(birdsnap.test) == 4
    assert "1 empty class folder(s)" in caplog.text and "(046)" in caplog.text
    gtsrb = found["gtsrb"].build(lambda image: image)
    assert gtsrb.classnames[14] == "stop" and len(gtsrb.templates) == 3
    ucf = found["ucf101"].build(lambda image: image)
    assert ucf.classnames[0] == "Apply Eye Makeup" and ucf.classnames[-1] == "Yo Yo" and len(ucf.templates) == 48
    imagenet = found["imagenet"].build(lambda image: image)
    assert imagenet.classnames[0] == "tench" and len(imagenet.templates) == 80
    for name, entry in ZEROSHOT_SETS.items():
        assert len(entry["classnames"]) == {"birdsnap": 500, "country211": 211, "flowers102": 102, "gtsrb": 43,
                                            "stanford_cars": 196, "ucf101": 101}[name], name
        assert all("{}" in template for template in entry["templates"]), name


def test_zeroshot_sets_file_is_package_data():
    setup = (REPO / "setup.py").read_text()
    assert '"eval": ["*.json"]' in setup
    assert json.loads((REPO / "src" / "eval" / "zeroshot_sets.json").read_text())["flowers102"]["classnames"][0] == \
        "pink primrose"
