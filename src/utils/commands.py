"""`clipcompress SUBCOMMAND [ARGS]`: one console command over every entry point.

It only dispatches: each subcommand is the `main(argv)` of one module, imported when chosen, so
`clipcompress lowrank --help` costs what `python -m utils.lowrank --help` costs. As a console script it
works from any folder: unlike `python -m`, it does not put the current folder first on `sys.path`, so a
user's own `utils.py` or `training/` beside their data cannot shadow ours.

`torchrun --nproc_per_node N -m training.main` and `python src/utils/evaluate_checkpoints.py` stay the
trainer's and the monitor's canonical commands; `clipcompress train` / `clipcompress monitor` are the
same code.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, NamedTuple, Optional


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: Dict[str, Command] = {
    "train": Command("training.main", "the trainer, one process (under torchrun: -m training.main)"),
    "torchrun": Command("training.launch", "torchrun without option abbreviations (seed command lines)"),
    "monitor": Command("utils.evaluate_checkpoints", "score every new checkpoint of a run"),
    "report": Command("utils.report", "one table and a Pareto plot over scored runs"),
    "corpus": Command("utils.make_corpus", "write the embedded default corpus"),
    "reinforce": Command("utils.reinforce", "store a teacher's embeddings of augmented views beside the data"),
    "lowrank": Command("utils.lowrank", "low-rank factorisation (SVD / Fisher-weighted SVD)"),
    "heads": Command("utils.heads", "attention-head pruning by sensitivity"),
    "fisher-prune": Command("utils.fisher_prune", "Fisher pruning of heads and neurons under a MAC budget"),
    "token-mask": Command("utils.token_mask", "patch-token masking at inference (FLIP)"),
    "text-layers": Command("utils.text_layers", "drop text-encoder layers"),
    "quantize": Command("utils.quantize", "int8 quantisation of any model kind"),
    "export": Command("utils.export", "export any model kind (safetensors, open_clip local-dir, torch.export, ONNX)"),
    "sweep": Command("utils.sweep", "a post-training tool over a grid, every result scored"),
    "cascade": Command("utils.cascade", "cascaded image search: index, search, experiments"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clipcompress SUBCOMMAND [ARGS ...]", "",
             "Train, distil and compress CLIP models. `clipcompress SUBCOMMAND --help` lists a subcommand's flags.",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clipcompress: unknown subcommand {name!r} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    sys.argv = [f"clipcompress {name}", *rest]  # what the subcommand's own messages name as the program
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
