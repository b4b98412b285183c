"""The layer contracts (import-linter, .importlinter) and ruff hold for the whole tree."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    # the venv's console script sits beside its python; fall back to PATH for other installs
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def test_import_layers_hold():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_contracts_cover_every_package_and_ignore_nothing():
    config = (REPO / ".importlinter").read_text()
    assert "ignore_imports" not in config
    for package in sorted(p.name for p in (REPO / "src").iterdir() if (p / "__init__.py").exists()):
        assert f"\n    {package}\n" in config, f"package {package} is in no layer contract"


def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
