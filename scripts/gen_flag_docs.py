"""Write docs/flags/<name>.md, one page per entry point, from the entry point's own argparse parser.

    PYTHONPATH=src python scripts/gen_flag_docs.py            # (re)write the pages
    PYTHONPATH=src python scripts/gen_flag_docs.py --check    # exit 1, naming each stale page, if any differs

The pages are never edited by hand: a flag's documentation is its `help=` text, so the page cannot drift
from the code. tests/test_docs.py runs --check, so a changed flag without regenerated pages fails the suite.

Output is deterministic: the tables are formatted from `parser._action_groups` here (no argparse help
formatter, whose wrapping follows the terminal width), and the usage line is built from the required
flags and positionals rather than from argparse's usage wrapper.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

# Some defaults are computed at import time from the machine (e.g. the monitor's --device is "cuda" when a
# GPU is visible). Hiding GPUs before torch is imported makes the pages the same on every machine.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parent.parent
FLAGS_DIR = REPO / "docs" / "flags"
sys.path.insert(0, str(REPO / "src"))


class EntryPoint(NamedTuple):
    page: str        # docs/flags/<page>.md
    command: str     # how a user runs it (shown as the usage line's program)
    module: str      # where build_parser() lives
    summary: str     # one line under the title


ENTRY_POINTS: List[EntryPoint] = [
    EntryPoint("training.main", "torchrun --nproc_per_node N -m training.main", "training.params",
               "The trainer: every job's flags, one group per job (`--job clip`, ...). "
               "`clipcompress train` runs one process."),
    EntryPoint("utils.lowrank", "clipcompress lowrank", "utils.lowrank",
               "Low-rank factorisation (SVD / Fisher-weighted SVD) of transformer Linears."),
    EntryPoint("utils.heads", "clipcompress heads", "utils.heads",
               "Attention-head pruning by sensitivity."),
    EntryPoint("utils.fisher_prune", "clipcompress fisher-prune", "utils.fisher_prune",
               "Fisher pruning of heads and MLP neurons under a MAC budget."),
    EntryPoint("utils.token_mask", "clipcompress token-mask", "utils.token_mask",
               "Patch-token masking at inference (FLIP)."),
    EntryPoint("utils.text_layers", "clipcompress text-layers", "utils.text_layers",
               "Dropping text-encoder layers."),
    EntryPoint("utils.quantize", "clipcompress quantize", "utils.quantize",
               "int8 quantisation of the Linears of any model kind (the last step of a chain)."),
    EntryPoint("utils.export", "clipcompress export", "utils.export",
               "Export any model kind: a safetensors folder, open_clip's local-dir layout, torch.export programs "
               "or ONNX graphs."),
    EntryPoint("utils.sweep", "clipcompress sweep", "utils.sweep",
               "A post-training tool over a grid, each result scored by the monitor: one table and plots."),
    EntryPoint("utils.cascade", "clipcompress cascade", "utils.cascade",
               "Cascaded image search: experiments configured in TOML, and the `index` / `search` subcommands."),
    EntryPoint("evaluate_checkpoints", "python src/utils/evaluate_checkpoints.py", "utils.evaluate_checkpoints",
               "The checkpoint monitor (also `clipcompress monitor`)."),
    EntryPoint("utils.report", "clipcompress report", "utils.report",
               "One table and a Pareto plot over the runs the monitor scored."),
    EntryPoint("utils.make_corpus", "clipcompress corpus", "utils.make_corpus",
               "The embedded default corpus."),
    EntryPoint("utils.reinforce", "clipcompress reinforce", "utils.reinforce",
               "Reinforced shards: a teacher's embeddings of K augmented views and of the captions, stored beside "
               "the data (docs/reinforce.md)."),
]


def _escape(text: str) -> str:
    """Help text as literal Markdown inside a table cell: no emphasis, links, HTML or column breaks."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def _code(text: str) -> str:
    """A code span that survives any content (backticks inside) and table pipes."""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def _value(action: argparse.Action) -> str:
    """The value a flag takes, as argparse would spell it in usage (METAVAR, [METAVAR ...], ...)."""
    if action.nargs == 0:
        return ""
    metavar = action.metavar
    if metavar is None and action.choices:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    elif metavar is None:
        # argparse's own convention: positionals are shown by dest, flags by DEST
        metavar = action.dest.upper() if action.option_strings else action.dest
    if isinstance(metavar, tuple):
        return " ".join(metavar)
    nargs = action.nargs
    if nargs is None:
        return metavar
    if nargs == "?":
        return f"[{metavar}]"
    if nargs == "*":
        return f"[{metavar} ...]"
    if nargs == "+":
        return f"{metavar} [{metavar} ...]"
    if isinstance(nargs, int):
        return " ".join([metavar] * nargs)
    return metavar  # argparse.REMAINDER and friends: not used by our parsers


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:  # store_true / store_false / count-style switches
        return "on" if action.default else "off"
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    if isinstance(action.default, str):
        # repr shows control characters escaped (the TSV separator is '\t')
        return _code(repr(action.default)[1:-1] or "''")
    if isinstance(action.default, (list, tuple)):
        # an empty list (a repeatable flag given no times) has nothing to show
        return _code(" ".join(map(str, action.default))) if action.default else ""
    return _code(str(action.default))


def _exclusion(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    """What a mutually exclusive group adds to its members' help."""
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            names = ", ".join(a.option_strings[0] for a in group._group_actions)
            return f" (exactly one of {names})" if group.required else f" (at most one of {names})"
    return ""


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        # expand %(default)s etc. exactly as argparse's help formatter does
        params = dict(vars(action), prog=prog)
        for name in list(params):
            if params[name] is argparse.SUPPRESS:
                del params[name]
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        text = text % params
    return _escape(text)


def _usage(entry: EntryPoint, parser: argparse.ArgumentParser) -> str:
    parts = [entry.command]
    for action in parser._actions:
        if action.option_strings and action.required:
            parts.append(f"{action.option_strings[0]} {_value(action)}".strip())
    for group in parser._mutually_exclusive_groups:
        if group.required:
            parts.append("(" + " | ".join(f"{a.option_strings[0]} {_value(a)}".strip()
                                          for a in group._group_actions) + ")")
    parts.append("[options]")
    for action in parser._actions:
        if not action.option_strings:
            parts.append(_value(action))
    return " ".join(parts)


def render(entry: EntryPoint, parser: argparse.ArgumentParser) -> str:
    prog = entry.command
    lines = [
        f"# {entry.page}",
        "",
        "<!-- Generated by scripts/gen_flag_docs.py from the entry point's argparse parser: do not edit. -->",
        "",
        entry.summary,
        "",
        "```text",
        _usage(entry, parser),
        "```",
        "",
    ]
    if parser.description:
        lines += [_escape(parser.description), ""]
    # argparse titles its default groups by Python version ("optional arguments" before 3.10, "options"
    # since): name them here so the pages do not depend on the interpreter
    default_titles = {id(parser._positionals): "positional arguments", id(parser._optionals): "general"}
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)
                   and a.help is not argparse.SUPPRESS]
        title = default_titles.get(id(group), group.title or "")
        if not actions:
            if id(group) not in default_titles:  # a declared group, e.g. a job without flags of its own
                lines += [f"## {_escape(title)}", "", "No flags of its own.", ""]
            continue
        lines += [f"## {_escape(title)}", ""]
        if group.description:
            lines += [_escape(group.description), ""]
        lines += ["| flag | default | choices | help |", "|---|---|---|---|"]
        for action in actions:
            if action.option_strings:
                # a plain one-value flag is shown bare (its default tells it from a switch); a flag that takes
                # several values shows how many
                value = _value(action) if action.nargs not in (None, 0) else ""
                names = ", ".join(_code(f"{o} {value}".strip()) for o in action.option_strings)
            else:
                names = _code(_value(action))
            choices = ", ".join(_code(str(c)) for c in action.choices) if action.choices else ""
            help_text = _help(action, prog) + " " + _escape(_exclusion(action, parser))
            lines.append(f"| {names} | {_default(action)} | {choices} | {help_text.strip()} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def subcommands(entry: EntryPoint, parser: argparse.ArgumentParser) -> List[Tuple[EntryPoint, argparse.ArgumentParser]]:
    """A page per subcommand (`clipcompress cascade index`), named <page>.<subcommand>, from its own
    parser: its flags are not the main parser's."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                summary = (helps.get(name) or name)[:1].upper() + (helps.get(name) or name)[1:] + "."
                found.append((EntryPoint(f"{entry.page}.{name}", f"{entry.command} {name}", entry.module, summary),
                              sub))
    return found


def index_page(entries: Optional[List[Tuple[EntryPoint, str]]] = None) -> str:
    lines = [
        "# Flag reference",
        "",
        "<!-- Generated by scripts/gen_flag_docs.py: do not edit. -->",
        "",
        "One page per entry point, generated from its argparse parser (`build_parser()`), so every flag's",
        "text here is its `--help` text. Regenerate with `PYTHONPATH=src python scripts/gen_flag_docs.py`;",
        "the test suite (`tests/test_docs.py`) fails when a page is stale.",
        "",
        "| entry point | command | parser |",
        "|---|---|---|",
    ]
    for entry, parser_name in entries if entries is not None else [(e, "build_parser") for e in ENTRY_POINTS]:
        lines.append(f"| [{entry.page}]({entry.page}.md) | `{entry.command}` | `{entry.module}.{parser_name}` |")
    return "\n".join(lines) + "\n"


def expected_pages() -> Tuple[Dict[Path, str], List[str]]:
    """({path: text} of every page that can be generated, [modules that have no build_parser()])."""
    pages = {}
    missing, listed = [], []
    for entry in ENTRY_POINTS:
        module = importlib.import_module(entry.module)
        build_parser = getattr(module, "build_parser", None)
        listed.append((entry, "build_parser"))
        if build_parser is None:
            missing.append(entry)
            continue
        parser = build_parser()
        pages[FLAGS_DIR / f"{entry.page}.md"] = render(entry, parser)
        for sub_entry, sub_parser in subcommands(entry, parser):
            listed.append((sub_entry, f"build_parser (subcommand {sub_entry.command.rsplit(' ', 1)[1]})"))
            pages[FLAGS_DIR / f"{sub_entry.page}.md"] = render(sub_entry, sub_parser)
    return {FLAGS_DIR / "index.md": index_page(listed), **pages}, missing


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming every page that differs from what the parsers say")
    args = parser.parse_args(argv)
    pages, missing = expected_pages()
    for entry in missing:
        # its page cannot be checked: stale by definition, and a failure either way
        print(f"stale: docs/flags/{entry.page}.md ({entry.module} has no build_parser())")
    known = {FLAGS_DIR / f"{entry.page}.md" for entry in missing}
    # a page for an entry point that no longer exists is stale too
    extra = sorted(p for p in FLAGS_DIR.glob("*.md") if p not in pages and p not in known) if FLAGS_DIR.is_dir() else []
    stale = [p for p, text in pages.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run: PYTHONPATH=src python scripts/gen_flag_docs.py)")
        for path in extra:
            print(f"stale: {path.relative_to(REPO)} (no entry point generates it)")
        return 1 if stale or extra or missing else 0
    FLAGS_DIR.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(pages[path], encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    for path in extra:
        path.unlink()
        print(f"removed {path.relative_to(REPO)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
