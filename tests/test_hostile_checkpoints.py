"""A checkpoint is data: a crafted `model_spec` never reaches a model builder, through any entry point.

The attack is real: open_clip.create_model(..., pretrained_image_path=F, weights_only=False) unpickles F,
and F here is a pickle whose load runs `touch MARKER`. Before specs were validated, a spec whose
`model_kwargs` carried those two keys made the marker appear through --resume, the monitor, compress.load,
the compress CLIs, eval.load_encoder and the cascade. Each test below goes through one entry point and
asserts the one-line refusal that names the key, and that the marker never appears.
A trust suite, cross-module by design: one attack followed through every entry point, so not named by a module.
"""
import logging
import os
import pickle

import pytest
import torch
from conftest import REPO, fork_server, run_trainer

MODEL = "clipc-vit-t2-32"


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def attack(tmp_path):
    """(marker path, a checkpoint with real weights whose spec asks open_clip to unpickle the payload)."""
    from compress.models.registry import build_model, open_clip_spec

    marker = tmp_path / "MARKER"
    payload = tmp_path / "payload.pt"
    with open(payload, "wb") as f:
        pickle.dump({"state_dict": _RunsCode(marker)}, f)
    # sanity: the payload really runs code when unpickled, so a missing marker below means "refused"
    with open(payload, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    weights = build_model(open_clip_spec(MODEL)).state_dict()
    spec = {"kind": "open_clip", "model": MODEL,
            "model_kwargs": {"pretrained_image_path": str(payload), "weights_only": False}}
    run = tmp_path / "crafted"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "epoch_1.pt"
    torch.save({"epoch": 1, "step": 8, "name": "crafted", "job": "clip", "model_spec": spec,
                "state_dict": weights}, checkpoint)
    return marker, checkpoint


REFUSAL = "model_spec.model_kwargs.pretrained_image_path: unknown key"


def run_module(args, timeout=180):
    """`python -m MODULE ARGS` (args = ["-m", MODULE, ...]) as a child of the fork server."""
    flag, module, *rest = args
    assert flag == "-m", args
    return fork_server().run(module, [str(a) for a in rest], cwd=REPO, timeout=timeout)


def assert_refused(result, marker):
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert result.returncode != 0
    assert REFUSAL in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# --- crafted specs of every kind, straight into compress.load ---------------------------------------------

HOSTILE_SPECS = [
    ({"kind": "open_clip", "model": MODEL, "model_kwargs": {"cache_dir": "/tmp"}}, "model_kwargs.cache_dir"),
    ({"kind": "open_clip", "model": "hf-hub:attacker/model"}, "model_spec.model: 'hf-hub:attacker/model'"),
    ({"kind": "open_clip", "model": "local-dir:/tmp"}, "is not a local open_clip model config"),
    ({"kind": "open_clip", "model": MODEL, "pretrained": "/tmp/x.pt"}, "model_spec.pretrained: unknown key"),
    ({"kind": "compact_clip", "model": MODEL, "blocks": {"../../etc": {"heads": 1, "head_dim": 8, "mlp_width": 8}}},
     "model_spec.blocks.../../etc: key not allowed"),
    ({"kind": "compact_clip", "model": MODEL, "blocks": {"transformer.resblocks.0": {"heads": -3, "head_dim": 8,
                                                                                      "mlp_width": 8}}},
     "blocks.transformer.resblocks.0.heads: -3 is outside"),
    ({"kind": "pruned_clip", "model": MODEL, "towers": {"image": [{"heads": 1, "head_dim": 8, "mlp_width": 8,
                                                                   "loader": "x"}]}},
     "towers.image[0].loader: unknown key"),
    ({"kind": "masked_clip", "base": {"kind": "open_clip", "model": MODEL, "model_kwargs": {"load_weights": True}},
      "masks": {}}, "model_spec.base.model_kwargs.load_weights: unknown key"),
    ({"kind": "image_student", "backbone": {"type": "torchvision", "name": "resnet18", "image_size": 32},
      "embed_dim": 384, "text_encoder": {"type": "sentence_transformers", "name": "/tmp/attacker_model"}},
     "model_spec.text_encoder.name: text encoder '/tmp/attacker_model'"),
    ({"kind": "image_student", "backbone": {"type": "torchvision", "name": "resnet18", "image_size": 32},
      "embed_dim": 384, "text_encoder": {"type": "open_clip", "model": MODEL, "pretrained": "/tmp/evil.pt"}},
     "model_spec.text_encoder.pretrained: names a weights file the caller did not allow"),
    ({"kind": "image_student", "backbone": {"type": "open_clip", "name": "hf-hub:x/y", "image_size": 32},
      "embed_dim": 384, "text_encoder": {"type": "sentence_transformers", "name": "all-MiniLM-L6-v2"}},
     "model_spec.backbone.name"),
    ({"kind": "student_clip", "embed_dim": 64,
      "image_tower": {"type": "open_clip_vit",
                      "vision_cfg": {"timm_model_name": "vit_base", "timm_model_pretrained": True}},
      "text_tower": {"text_cfg": {"width": 64}}}, "model_spec.image_tower.vision_cfg.timm_model_name: unknown key"),
    ({"kind": "student_clip", "embed_dim": 64, "image_tower": {"type": "torchvision", "arch": "resnet18",
                                                               "input_size": 32},
      "text_tower": {"text_cfg": {"hf_model_name": "bert-base-uncased"}}},
     "model_spec.text_tower.text_cfg.hf_model_name: unknown key"),
    ({"kind": "student_clip", "embed_dim": 64, "image_tower": {"type": "torchvision", "arch": "os.system",
                                                               "input_size": 32}, "text_tower": {"text_cfg": {}}},
     "is not a torchvision classification architecture"),
    ({"kind": "no_such_kind"}, "model_spec.kind: unknown model kind"),
    ("not a mapping", "model_spec: expected a mapping"),
]


@pytest.mark.parametrize("spec, says", HOSTILE_SPECS, ids=[s for _, s in HOSTILE_SPECS])
def test_compress_load_refuses_every_crafted_spec(spec, says):
    import compress
    from compress.models.spec import SpecError

    with pytest.raises(SpecError) as error:
        compress.load({"model_spec": spec, "state_dict": {}})
    message = str(error.value)
    assert says in message and "\n" not in message, message


def test_every_kind_has_a_schema_and_every_spec_we_write_passes_it():
    from compress.models.registry import MODEL_KINDS, build_model, open_clip_spec
    from compress.models.spec import SCHEMAS, validate_spec
    from compress.models.students import student_clip_spec, student_image_spec

    assert set(MODEL_KINDS) == set(SCHEMAS)
    for spec in (open_clip_spec(MODEL), student_clip_spec(student_image_spec("resnet18", MODEL), MODEL)):
        assert validate_spec(spec) == spec
        assert build_model(spec).model_spec == spec


def test_an_allowed_text_encoder_is_loaded_and_an_unknown_key_never_reaches_the_output(tmp_path):
    from compress.models.spec import SpecError, validate_spec

    spec = {"kind": "image_student", "backbone": {"type": "torchvision", "name": "resnet18", "image_size": 32},
            "embed_dim": 384, "text_encoder": {"type": "sentence_transformers", "name": "my-teacher"}}
    with pytest.raises(SpecError):
        validate_spec(spec)
    assert validate_spec(spec, allowed_text_encoders={"my-teacher"}) == spec


def test_eval_load_encoder_refuses(attack):
    import eval as clip_eval

    marker, checkpoint = attack
    with pytest.raises(ValueError, match=REFUSAL):
        clip_eval.load_encoder(str(checkpoint))
    assert not marker.exists()


@pytest.mark.slow
def test_trainer_resume_refuses(attack, tiny_corpus, tmp_path):
    marker, checkpoint = attack
    result = run_trainer(["--train-data", str(tiny_corpus / "train.tsv"), "--model", MODEL, "--logs-root",
                          str(tmp_path / "logs"), "--name", "resumed", "--batch-size", "32", "--workers", "0",
                          "--epochs", "1", "--resume", str(checkpoint)], check=False, timeout=180)
    assert_refused(result, marker)
    assert result.returncode == 2


@pytest.mark.slow
def test_protorkd_resume_refuses_a_crafted_student(tiny_corpus, tmp_path):
    """protorkd builds its student itself (not through build_model): its resume validates the spec too."""
    run = tmp_path / "logs" / "rkd"
    (run / "checkpoints").mkdir(parents=True)
    spec = {"kind": "image_student", "backbone": {"type": "torchvision", "name": "resnet18", "image_size": 32,
                                                  "weights": "/tmp/attacker.pth"},
            "embed_dim": 384, "text_encoder": {"type": "sentence_transformers", "name": "all-MiniLM-L6-v2"}}
    torch.save({"epoch": 1, "step": 1, "model_spec": spec, "state_dict": {}}, run / "checkpoints" / "epoch_1.pt")
    result = run_trainer(["--job", "protorkd", "--train-data", str(tiny_corpus / "train.tsv"), "--model", "resnet18",
                          "--logs-root", str(tmp_path / "logs"), "--name", "rkd", "--batch-size", "32",
                          "--workers", "0", "--epochs", "2", "--resume", "latest"], check=False, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "model_spec.backbone.weights: unknown key" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("job_flags", [
    ["--pretrained"],
    ["--job", "distill", "--teacher-model", MODEL, "--student", "resnet18", "--teacher-pretrained"],
    ["--job", "protorkd", "--model", "resnet18", "--teacher-model", MODEL, "--teacher-pretrained"],
    ["--job", "prune", "--prune-ratio", "0.5", "--epochs", "2", "--pretrained"],
], ids=["clip --pretrained", "distill --teacher-pretrained", "protorkd --teacher-pretrained", "prune --pretrained"])
def test_weight_flags_read_weights_only(attack, tiny_corpus, tmp_path, job_flags):
    """--pretrained and the teacher flags take the file's weights through open_clip's weights_only loader; the
    spec inside is not used at all, so the crafted one can neither run code nor be copied into the run."""
    marker, checkpoint = attack
    args = ["--train-data", str(tiny_corpus / "train.tsv"), "--model", MODEL, "--logs-root", str(tmp_path / "logs"),
            "--name", "weights", "--batch-size", "32", "--workers", "0", "--epochs", "1",
            "--stop-after-steps", "1", *job_flags, str(checkpoint)]
    result = run_trainer(args, check=False, timeout=240)
    assert not marker.exists()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    written = torch.load(tmp_path / "logs" / "weights" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert "pretrained_image_path" not in repr(written["model_spec"])


def test_monitor_skips_and_names_the_key(attack, tiny_corpus, caplog):
    from compress.models.registry import build_model, open_clip_spec
    from utils import evaluate_checkpoints as monitor_cli

    marker, checkpoint = attack
    # an honest checkpoint beside the crafted one: the monitor skips the one, scores the other and exits 0
    # (with nothing it could score, --once exits 1: tests/test_families.py checks that)
    spec = open_clip_spec(MODEL)
    torch.save({"epoch": 2, "step": 16, "name": "crafted", "job": "clip", "model_spec": spec,
                "state_dict": build_model(spec).state_dict()}, checkpoint.parent / "epoch_2.pt")
    caplog.set_level(logging.INFO, logger="evaluate_checkpoints")
    assert monitor_cli.main(["--logs-dir", str(checkpoint.parent.parent), "--eval-data-dir",
                             str(tiny_corpus / "eval"), "--workers", "0", "--device", "cpu", "--once"]) == 0
    assert not marker.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("refused" in w and REFUSAL in w for w in warnings), warnings
    scored = checkpoint.parent.parent / monitor_cli.CSV_NAME
    assert scored.exists() and "epoch_2" in scored.read_text() and "epoch_1.pt" not in scored.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("tool, flags", [
    ("lowrank", ["--ratio", "0.5"]),
    ("heads", ["--num-heads", "1", "--calib-data", "TRAIN"]),
    ("fisher_prune", ["--mac-constraint", "0.6", "--calib-data", "TRAIN"]),
    ("token_mask", ["--drop", "0.5"]),
    ("text_layers", ["--keep-first", "1"]),
])
def test_compress_tools_refuse_and_write_nothing(attack, tiny_corpus, tmp_path, tool, flags):
    marker, checkpoint = attack
    flags = [str(tiny_corpus / "train.tsv") if f == "TRAIN" else f for f in flags]
    out = tmp_path / "out"
    result = run_module(["-m", f"utils.{tool}", "--pretrained", str(checkpoint), "--out", str(out), *flags])
    assert_refused(result, marker)
    assert result.returncode == 2 and not out.exists()


@pytest.mark.slow
def test_cascade_refuses(attack, tiny_corpus, tmp_path):
    marker, checkpoint = attack
    config = tmp_path / "cascade.toml"
    config.write_text(f"""experiment = "topk"
name = "crafted"
[data]
eval_data_dir = "{tiny_corpus / 'eval'}"
[[levels]]
checkpoint = "{checkpoint}"
[[levels]]
checkpoint = "{checkpoint}"
[cascade]
m = [2]
k = [1]
""")
    result = run_module(["-m", "utils.cascade", "--config", str(config), "--log-dir", str(tmp_path / "logs")])
    assert_refused(result, marker)
