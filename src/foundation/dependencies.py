"""Packages that only some jobs and tools import, checked when such a job or tool starts.

faiss (ProtoRKD's k-means prototypes, the cascade's index) and the ONNX tooling (`utils.export`) are
imported inside the functions that use them. A job or tool that will need one calls `require` before any
expensive work, so a missing or broken install ends it with one line naming the install command (a
UserError: exit 2) instead of an ImportError after the teacher has embedded every caption."""
from __future__ import annotations

from importlib import import_module
from typing import Sequence

from foundation.errors import UserError

# faiss-cpu is in the default install; a GPU build replaces it (docs/install.md)
FAISS_INSTALL = "pip install faiss-cpu (or a GPU build of faiss: docs/install.md)"
ONNX_INSTALL = "pip install 'clipcompress[onnx]'"
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


class MissingDependencyError(UserError):
    """A package the asked-for job or tool needs cannot be imported."""


def require(what: str, modules: Sequence[str], install: str) -> None:
    """Import each of `modules`; MissingDependencyError, one line naming `what`, each module that failed
    and why, and the `install` command, when any cannot be imported (absent, or present with a shared
    library that does not load)."""
    failed = []
    for module in modules:
        try:
            import_module(module)
        except ImportError as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            failed.append(f"{module} ({reason})")
    if failed:
        raise MissingDependencyError(f"{what} needs {', '.join(failed)}, which cannot be imported: {install}")
