"""Every --precision through training and in-loop eval on CPU (bf16 runs there too), and the start-up lines."""

import pytest
import torch
from conftest import run_trainer
from test_trainer import common_args, read_results

from compress.models.registry import open_clip_spec
from eval.models import load_encoder
from foundation.model_configs import register_model_configs
from training.accel import PURE_BF16_WARNING, autocast_dtype, faiss_summary


@pytest.mark.slow
def test_training_and_in_loop_eval_in_pure_bf16(tiny_corpus, tmp_path):
    precision = "bf16"
    args = common_args(tiny_corpus, tmp_path, precision, "--epochs", "1", "--precision", precision,
                       "--zeroshot-frequency", "1", "--eval-data-dir", str(tiny_corpus / "eval"))
    result = run_trainer(args)
    evals = [row["eval/zeroshot/shapes/acc1"] for row in read_results(tmp_path / precision)
             if "eval/zeroshot/shapes/acc1" in row]
    assert len(evals) == 1 and 0.0 <= evals[0] <= 1.0
    assert PURE_BF16_WARNING[:40] in result.stderr
    # the start-up line naming the faiss this process loaded (faiss-cpu and faiss-gpu share one package)
    import faiss

    summary = faiss_summary()
    assert faiss.__file__ in summary and f"sees {faiss.get_num_gpus()} GPU(s)" in summary
    assert summary in (tmp_path / precision / "out.log").read_text()
    # the monitor's path: the checkpoint loads and embeds in fp32 whatever it was trained in
    encoder = load_encoder(str(tmp_path / precision / "checkpoints" / "epoch_1.pt"))
    features = encoder.encode_image(torch.rand(2, 3, 32, 32))
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


@pytest.mark.parametrize("weights, autocast", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_eval_encoder_takes_fp32_images_in_every_precision(weights, autocast):
    import open_clip

    from eval.models import encoder_from_model

    register_model_configs()
    model = open_clip.create_model("clipc-vit-t2-32").to(weights).eval()
    encoder = encoder_from_model(model, model_spec=open_clip_spec("clipc-vit-t2-32"), device="cpu")
    encoder.autocast_dtype = autocast  # what evaluate_model sets for amp / amp_bf16
    features = encoder.encode_image(torch.rand(2, 3, 32, 32))  # fp32 in, as every eval loader gives
    assert features.dtype == torch.float32 and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-3)
    text = encoder.encode_text(["a red circle", "a blue square"])
    assert text.dtype == torch.float32 and torch.isfinite(text).all()


def test_autocast_dtype_of_each_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is None
    assert autocast_dtype("amp", cuda) == torch.float16 and autocast_dtype("amp", cpu) == torch.bfloat16
    assert autocast_dtype("amp_bf16", cuda) == torch.bfloat16


def test_two_faiss_builds_installed_side_by_side_are_named_in_the_log_line(monkeypatch):
    import training.accel as accel

    monkeypatch.setattr(accel, "faiss_distributions", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    assert "WARNING: faiss-cpu and faiss-gpu-cu12 are all installed" in accel.faiss_summary()
    monkeypatch.setattr(accel, "faiss_distributions", lambda: ["faiss-cpu"])
    assert "WARNING" not in accel.faiss_summary()
