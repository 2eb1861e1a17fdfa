"""Import the reference implementation (seal-rg/recurrent-pretraining `recpre/raven_*_minimal.py`, kept outside this
repo) from REFERENCE_DIR as a package, so that its relative import of the config resolves. Used by the benchmark
workers that run under REFERENCE_PYTHON."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import ModuleType


def import_reference(reference_dir: str) -> tuple[ModuleType, ModuleType]:
    """(raven_modeling_minimal, raven_config_minimal) loaded from `reference_dir`."""
    import importlib

    pkg = Path(tempfile.mkdtemp()) / "raven_reference"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("raven_modeling_minimal.py", "raven_config_minimal.py"):
        (pkg / name).symlink_to(Path(reference_dir) / name)
    sys.path.insert(0, str(pkg.parent))
    return (importlib.import_module("raven_reference.raven_modeling_minimal"),
            importlib.import_module("raven_reference.raven_config_minimal"))
