"""What installing clipcompress gives: setup.py declares every third-party package src/ imports, an import at a
module's top level needs only the default install, constraints.txt pins each declared dependency within its
declared range, and a job or tool that needs an optional package says so in one line at its start."""
import ast
import re
import runpy
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import setuptools
from conftest import subprocess_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# declared but never imported by src/: each is used through another package, which does not declare it
USED_INDIRECTLY = {
    "tensorboard": "torch.utils.tensorboard's SummaryWriter (--report-to tensorboard, the monitor)",
}


def setup_kwargs() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (setup.py run with setup() captured)."""
    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="setup")
    finally:
        setuptools.setup = original
    return captured


def declared() -> tuple:
    """({name: Requirement} of install_requires, {extra: {name: Requirement}})."""
    kwargs = setup_kwargs()

    def by_name(lines):
        return {canonicalize_name(r.name): r for r in map(Requirement, lines)}

    return by_name(kwargs["install_requires"]), {extra: by_name(lines)
                                                 for extra, lines in kwargs["extras_require"].items()}


def third_party_imports(top_level_only: bool = False) -> dict:
    """{import root: ["path:line", ...]} of src/'s absolute imports of packages that are neither the standard
    library nor src's own. `top_level_only`: the imports a module runs when it is imported (not those inside
    a function, which run when it is called)."""
    own = {path.name for path in SRC.iterdir() if (path / "__init__.py").exists()}
    found: dict = {}

    def visit(node, path):
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root not in own:
                    found.setdefault(root, []).append(f"{path.relative_to(REPO)}:{child.lineno}")
            visit(child, path)

    for path in sorted(SRC.rglob("*.py")):
        visit(ast.parse(path.read_text(), str(path)), path)
    return found


def distributions_of(import_name: str) -> set:
    """The distributions that provide an import name (an uninstalled one: the import name itself)."""
    return {canonicalize_name(d) for d in packages_distributions().get(import_name, [import_name])}


def test_setup_declares_every_package_src_imports():
    required, extras = declared()
    anywhere = set(required).union(*extras.values())
    missing = {root: where[:3] for root, where in third_party_imports().items()
               if not distributions_of(root) & anywhere}
    assert not missing, f"imported but declared neither in install_requires nor in an extra: {missing}"


def test_a_module_imports_at_its_top_only_what_the_default_install_has():
    # a package of an extra is imported inside the function that uses it, so the rest runs without it
    required, _ = declared()
    outside = {root: where[:3] for root, where in third_party_imports(top_level_only=True).items()
               if not distributions_of(root) & set(required)}
    assert not outside, f"imported when the module is imported, but only in an extra: {outside}"


def test_every_dependency_is_imported_or_says_what_uses_it():
    required, _ = declared()
    imported = set().union(*(distributions_of(root) for root in third_party_imports()))
    unused = sorted(set(required) - imported - set(USED_INDIRECTLY))
    assert not unused, f"install_requires names packages that src/ never imports: {unused}"
    assert set(USED_INDIRECTLY) <= set(required)


def constraints() -> dict:
    """{canonical name: Version} of constraints.txt's `name==version` lines."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert match, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_constraints_pin_every_declared_dependency_within_its_range():
    required, extras = declared()
    pins = constraints()
    assert "clipcompress" not in pins
    # what scripts/setup_env.sh installs (the package and its dev extra) must be pinned; another extra's
    # packages (wandb) are checked when they are
    for name, requirement in {**required, **extras["dev"]}.items():
        assert name in pins, f"{requirement} is declared but constraints.txt pins no {name}"
    for name, requirement in {**required, **{n: r for e in extras.values() for n, r in e.items()}}.items():
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"constraints.txt pins {name}=={pins[name]}, outside setup.py's {requirement}"


def test_constraints_name_the_python_setup_env_checks():
    # scripts/setup_env.sh reads the tested Python from this first line
    first = (REPO / "constraints.txt").read_text().splitlines()[0]
    assert re.match(r"# python 3\.\d+ ", first), first
    assert "sed -n '1s/^# python \\([0-9.]*\\)" in (REPO / "scripts" / "setup_env.sh").read_text()


# --- optional packages: one line at the start of the job or tool that needs them ----------------------------

def hiding(module: str, program: str) -> str:
    """`python -c` source that makes `module` unimportable (None in sys.modules) and runs `program` as
    __main__ with the command line's arguments."""
    return (f"import runpy, sys; sys.modules[{module!r}] = None; "
            f"runpy.run_module({program!r}, run_name='__main__', alter_sys=True)")


def test_protorkd_without_faiss_stops_at_start_naming_the_install(tiny_corpus, tmp_path):
    # the command line as a user types it, in a fresh interpreter where faiss cannot be imported
    args = ["--job", "protorkd", "--distiller", "proto", "--k", "4", "--train-data", tiny_corpus / "train.tsv",
            "--model", "clipc-vit-t2-32", "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--logs-root", tmp_path, "--name", "nofaiss"]
    result = subprocess.run([sys.executable, "-c", hiding("faiss", "training.main"), *map(str, args)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-4000:]
    line = lines[0]
    assert "--distiller proto" in line and "faiss" in line and "pip install faiss-cpu" in line, line
    # stopped before the teacher embedded anything and before any step: no cache, no checkpoint, no params.txt
    run = tmp_path / "nofaiss"
    assert not (run / "cache").exists() and not list(run.glob("checkpoints/*.pt"))
    assert not (run / "params.txt").exists()


def main_hiding(module: str, main, argv, monkeypatch, capsys) -> str:
    """The error line of `main(argv)` run in this process with `module` unimportable."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as stopped:
        main(list(map(str, argv)))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cascade_without_faiss_stops_at_start_naming_the_install(tmp_path, monkeypatch, capsys):
    from utils import cascade

    line = main_hiding("faiss", cascade.main, ["search", tmp_path / "no_index", "a red circle", "--k", "3"],
                       monkeypatch, capsys)
    assert line.startswith(f"error: {cascade.PROG} needs faiss") and "pip install faiss-cpu" in line, line


def test_export_without_the_onnx_extra_stops_at_start_naming_it(tmp_path, monkeypatch, capsys):
    from utils import export

    argv = [tmp_path / "missing.pt", "--format", "onnx", "--out", tmp_path / "graphs"]
    line = main_hiding("onnxruntime", export.main, argv, monkeypatch, capsys)
    assert "onnxruntime" in line and "pip install 'clipcompress[onnx]'" in line, line
    assert not (tmp_path / "graphs").exists()


def test_require_names_each_module_that_fails_and_the_install_command():
    from foundation.dependencies import MissingDependencyError, require
    from foundation.errors import UserError

    require("this test", ["json", "faiss", "onnxruntime"], "unused")  # [dev] has them: no error
    with pytest.raises(MissingDependencyError) as error:
        require("--flag", ["json", "no_such_module_here"], "pip install it")
    assert isinstance(error.value, UserError)  # one line, exit 2, wherever UserError is caught
    assert str(error.value) == ("--flag needs no_such_module_here (No module named 'no_such_module_here'), "
                                "which cannot be imported: pip install it")
