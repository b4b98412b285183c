"""The layer contracts (import-linter, .importlinter) and ruff hold for the whole tree."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    # the venv's console script sits beside its python; fall back to PATH for other installs
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


@pytest.mark.slow
def test_import_layers_hold():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _layer_packages(config: str, contract: str):
    """The `layers =` entries of one contract in .importlinter, top to bottom."""
    section = config.split(f"[importlinter:contract:{contract}]", 1)[1].split("\n[", 1)[0]
    lines = section.split("layers =", 1)[1].splitlines()[1:]
    return [line.strip() for line in lines if line.startswith("    ") and line.strip()]


def test_contracts_name_every_layer_by_package_and_ignore_nothing():
    config = (REPO / ".importlinter").read_text()
    assert "ignore_imports" not in config
    top = _layer_packages(config, "layers")
    # every top-level package is a layer, and a layer is a whole package (never a list of its modules)
    packages = sorted(p.name for p in (REPO / "src").iterdir() if (p / "__init__.py").exists())
    assert sorted(top) == packages, f"layers {top} against packages {packages}"
    assert all("." not in layer and ":" not in layer for layer in top)
    # inside compress, every module lies in one of its layer subpackages: a new compress/<x>.py fails here
    inner = _layer_packages(config, "compress-inside")
    compress = REPO / "src" / "compress"
    for path in compress.rglob("*.py"):
        relative = path.relative_to(compress)
        if relative == Path("__init__.py"):
            continue
        assert relative.parts[0] in inner, f"src/compress/{relative} lies in no layer of compress ({inner})"


def test_no_module_name_twice_inside_a_package():
    """`compress/lowrank.py` beside `compress/ops/lowrank.py` hid which was the library: each module (or
    subpackage) name appears once under each top-level package."""
    src = REPO / "src"
    for package in (p for p in src.iterdir() if (p / "__init__.py").exists()):
        seen = {}
        for path in package.rglob("*.py"):
            if path.name == "__main__.py" or path.parent == package and path.name == "__init__.py":
                continue
            name = path.parent.name if path.name == "__init__.py" else path.stem
            where = str(path.relative_to(src))
            assert name not in seen, f"module name {name!r} twice in {package.name}: {seen[name]} and {where}"
            seen[name] = where


@pytest.mark.slow
def test_ruff_is_clean():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
