"""`clipcompress-torchrun` (or `python -m training.launch`): torchrun with option abbreviations off.

torchrun's argument parser lets a prefix stand for one of its own options and applies that to every
argument, the script's included. So the ProtoRKD README's `torchrun ... -m training.main ... --logs logs` fails
("ambiguous option: --logs could match --logs-specs, --logs_specs"), and UPop's `--p 0.5` is taken as an
abbreviation of one of torchrun's own options. This launcher is torch.distributed.run itself — the same
parser, options, elastic agent and `run()` — with `allow_abbrev=False`: torchrun's options must be spelled
in full, and everything after the training script or `-m module` goes to the script untouched:

    clipcompress-torchrun --nproc_per_node 8 -m training.main --logs logs ...
"""
from __future__ import annotations

import sys
from typing import List, Optional

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import record


def build_parser():
    """torchrun's parser, abbreviations off."""
    parser = torchrun.get_args_parser()
    parser.allow_abbrev = False
    parser.prog = "clipcompress-torchrun"
    return parser


@record
def main(argv: Optional[List[str]] = None) -> None:
    torchrun.run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
