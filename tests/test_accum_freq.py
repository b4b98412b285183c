"""--accum-freq as open_clip_train means it: the contrastive loss of N micro-batches of B sees N x B samples."""
import json

import pytest
import torch
from conftest import run_trainer

MODEL = "clipc-vit-t2-32"


def _run(corpus, tmp_path, name, batch_size, accum_freq):
    """One optimizer step over a 32-row set. Equality must hold there: the contrastive loss of the whole set
    does not depend on row order; the model has no dropout, patch dropout or BatchNorm, and the images take the
    eval transform (no --aug-cfg), so a recomputed micro-batch gives the features that were cached. --eps 1 makes
    AdamW's first update lr·g/(|g| + 1), which follows the gradient's value instead of only its sign."""
    header, *rows = (corpus / "train.tsv").read_text().splitlines()[:33]
    data = tmp_path / "train32.tsv"
    data.write_text("\n".join([header, *(f"{corpus}/{row}" for row in rows)]) + "\n")
    run_trainer(["--train-data", str(data), "--model", MODEL, "--logs-root", str(tmp_path), "--name", name,
                 "--workers", "0", "--epochs", "1", "--warmup", "1", "--lr", "1e-2", "--eps", "1", "--wd", "0",
                 "--seed", "3", "--log-every-n-steps", "1", "--batch-size", str(batch_size),
                 "--accum-freq", str(accum_freq)])
    state = torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    results = [json.loads(line) for line in open(tmp_path / name / "results.jsonl")]
    return state, [r["train/loss"] for r in results if "train/loss" in r]


def _initial_weights():
    """The weights the runs start from (training.main seeds everything with --seed before the build)."""
    from compress.models.pretrained import create_clip
    from training.main import seed_everything

    seed_everything(3)
    return create_clip(MODEL, None).state_dict()


@pytest.mark.slow
def test_accum_freq_two_of_sixteen_writes_the_weights_of_one_batch_of_thirty_two(tiny_corpus, tmp_path):
    whole, whole_loss = _run(tiny_corpus, tmp_path, "b32", 32, 1)
    accumulated, accumulated_loss = _run(tiny_corpus, tmp_path, "b16x2", 16, 2)
    assert len(whole_loss) == len(accumulated_loss) == 1  # one step each, logging the loss over all 32 rows
    assert accumulated_loss[0] == pytest.approx(whole_loss[0], rel=1e-5)
    assert whole.keys() == accumulated.keys()
    initial = _initial_weights()
    moved = max((whole[k] - initial[k].to(whole[k].dtype)).abs().max().item() for k in whole)
    assert moved > 1e-4  # the step changed the weights by far more than the tolerance below
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=0, atol=1e-6, msg=key)
