"""Pretrained image backbones: self-supervised image teachers from MoCo/SimCLR/SwAV-shaped files
(compress/models/image_teachers.py), and --pretrained filling a student's backbone (compress/models/students.py)."""
import types
from pathlib import Path

import pytest
import torch

from foundation.errors import UserError


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
