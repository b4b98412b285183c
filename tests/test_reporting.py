"""--report-to (training/reporting.py): wandb offline next to tensorboard, or one line naming the extra."""
import importlib.util

import pytest
from conftest import run_trainer, subprocess_env

from foundation.errors import UserError


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
