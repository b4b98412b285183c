"""`clipcompress SUBCOMMAND`: the console command dispatches to every entry point, from any folder."""
import subprocess
import sys
from pathlib import Path

import pytest

from utils.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def _console_script() -> str:
    script = Path(sys.executable).with_name("clipcompress")
    assert script.exists(), "the clipcompress console script is not installed: pip install -e ."
    return str(script)


def _user_folder(tmp_path: Path) -> Path:
    """A researcher's working folder whose own modules share our top-level package names."""
    (tmp_path / "utils.py").write_text("raise SystemExit('the user module utils.py was imported')\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("raise SystemExit('the user package training was imported')\n")
    return tmp_path


@pytest.mark.slow
def test_help_lists_every_subcommand_from_a_folder_with_clashing_modules(tmp_path):
    result = subprocess.run([_console_script(), "--help"], cwd=_user_folder(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert f"  {name} " in result.stdout, f"{name} missing from:\n{result.stdout}"


@pytest.mark.slow
def test_subcommands_reach_their_parsers_from_another_folder(tmp_path):
    folder = _user_folder(tmp_path)
    for name in ("report", "lowrank", "train"):
        result = subprocess.run([_console_script(), name, "--help"], cwd=folder, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
        assert "usage:" in result.stdout and "--" in result.stdout, result.stdout[:500]


@pytest.mark.slow
def test_unknown_subcommand_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([_console_script(), "no-such-tool"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown subcommand 'no-such-tool'" in result.stderr


def test_every_subcommand_module_has_a_main():
    import importlib

    for name, command in COMMANDS.items():
        assert callable(getattr(importlib.import_module(command.module), "main", None)), name
