"""The documentation holds together: the site builds in strict mode, the generated flag pages match the
parsers, every page is reachable from the nav, and the README stays short."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300


def _nav_pages(entries) -> set:
    """Every .md path named anywhere in mkdocs.yml's nav (entries are strings, {title: path} or nested lists)."""
    pages = set()
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            if isinstance(value, list):
                pages |= _nav_pages(value)
            elif isinstance(value, str) and value.endswith(".md"):
                pages.add(value)
    return pages


def _mkdocs_config() -> dict:
    with open(REPO / "mkdocs.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.slow
def test_mkdocs_builds_in_strict_mode(tmp_path):
    # strict mode fails on broken links and anchors, and (mkdocs.yml's validation) on pages left out of the nav
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.slow
def test_flag_pages_match_the_parsers():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "scripts/gen_flag_docs.py", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, ("flag reference is stale; run PYTHONPATH=src python scripts/gen_flag_docs.py\n"
                                    + result.stdout[-4000:] + result.stderr[-4000:])


def test_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_every_docs_page_is_in_the_nav():
    config = _mkdocs_config()
    docs_dir = REPO / config.get("docs_dir", "docs")
    pages = {p.relative_to(docs_dir).as_posix() for p in docs_dir.rglob("*.md")}
    nav = _nav_pages(config["nav"])
    assert not pages - nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert not nav - pages, f"nav entries without a page: {sorted(nav - pages)}"


def _trainer_commands(markdown: str) -> list:
    """The trainer command lines of a page's shell blocks, continuation lines joined: what follows
    `-m training.main` (torchrun, srun, python) or `slurm_example.sh` (its arguments are the trainer's)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"(?:-m training\.main|slurm_example\.sh)\s(.*)", line)
            if match:
                commands.append(match.group(1))
    return commands


def test_quickstart_uses_only_flags_the_trainer_has():
    from training.params import build_parser

    known = {option for action in build_parser()._actions for option in action.option_strings}
    commands = _trainer_commands((REPO / "docs" / "quickstart.md").read_text(encoding="utf-8"))
    assert len(commands) >= 2, "docs/quickstart.md should hold the torchrun and the sbatch command"
    used = {flag for command in commands for flag in re.findall(r"(?<!\S)(--[A-Za-z][\w-]*)", command)}
    assert "--job" in used and "--KD" in used
    assert not used - known, f"docs/quickstart.md names trainer flags that do not exist: {sorted(used - known)}"
