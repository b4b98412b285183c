"""Where a run's scalars go besides results.jsonl: tensorboard, wandb, both or neither (`--report-to`).

The trainer talks to one writer with tensorboard's `add_scalar(tag, value, step)` / `close()`; this module
builds it from the sinks asked for. wandb is an optional dependency (`pip install 'clipcompress[wandb]'`):
asking for it without the package is one line at parse time (training/params.py), before any run folder
exists. `WANDB_MODE=offline` makes wandb write its run under `<run>/wandb/` without a network.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import List, Optional

from foundation.errors import UserError

SINKS = ("tensorboard", "wandb", "none")


def parse_report_to(text: str) -> str:
    """--report-to checked and normalised: a comma list of SINKS ('none' alone); UserError (one line)
    otherwise, wandb without its package included."""
    sinks = [sink.strip() for sink in text.split(",") if sink.strip()]
    unknown = [sink for sink in sinks if sink not in SINKS]
    if unknown or not sinks or ("none" in sinks and len(sinks) > 1):
        raise UserError(f"--report-to {text!r}: a comma list of tensorboard and wandb, or none")
    if "wandb" in sinks and importlib.util.find_spec("wandb") is None:
        raise UserError("--report-to wandb: the wandb package is not installed (pip install 'clipcompress[wandb]'); "
                        "or use --report-to tensorboard")
    return ",".join(sinks)


class WandbWriter:
    """tensorboard's writer interface over a wandb run."""

    def __init__(self, args, log_dir: Path):
        import wandb

        self.wandb = wandb
        config = {key: value for key, value in vars(args).items()
                  if isinstance(value, (str, int, float, bool, type(None)))}
        # one wandb run per run folder, so `--resume latest` continues it rather than starting another
        run_id = hashlib.sha1(str(Path(log_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=args.wandb_project_name, name=args.name, id=run_id, resume="allow",
                              dir=str(log_dir), config=config)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Several writers as one."""

    def __init__(self, writers: List):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(tag, value, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def make_writer(args, log_dir: Path, is_master: bool) -> Optional[Writers]:
    """The writer of `args.report_to`'s sinks on rank 0 (None elsewhere, or for 'none')."""
    sinks = args.report_to.split(",")
    if not is_master or sinks == ["none"]:
        return None
    writers = []
    if "tensorboard" in sinks:
        from torch.utils.tensorboard import SummaryWriter

        writers.append(SummaryWriter(str(Path(log_dir) / "tensorboard")))
    if "wandb" in sinks:
        writers.append(WandbWriter(args, log_dir))
    return Writers(writers)
