"""recurrent_depth: recurrent-depth language models (Huginn-compatible) — model, training, inference, evaluation,
serving. Importing the package registers `huginn_raven` with transformers' Auto classes (no remote code).

The names below load on first use, and the registration happens when transformers' Auto modules load (at once if
they already have): `import recurrent_depth` itself imports neither torch nor transformers, so `rdepth --help` is
fast, while `import recurrent_depth; AutoModelForCausalLM.from_pretrained(folder)` works in either import order."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "recurrent_depth.config",
    "RecurrentDepthConfig": "recurrent_depth.config",
    "RecurrentDepthForCausalLM": "recurrent_depth.hf",
    "RecurrentDepthModel": "recurrent_depth.model",
}


def __getattr__(name: str) -> Any:
    """PEP 562: import `recurrent_depth.config` / `.model` / `.hf` when one of their names is first used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'recurrent_depth' has no attribute {name!r}")
    import importlib

    import recurrent_depth.hf  # noqa: F401  (registers the Auto classes)

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin re-export, documented in inference.generate
    """Batched generation with per-row adaptive exit; see `recurrent_depth.inference.generate.generate`."""
    from recurrent_depth.inference.generate import generate as _generate

    return _generate(*args, **kwargs)


_AUTO_CONFIG = "transformers.models.auto.configuration_auto"
_AUTO_MODEL = "transformers.models.auto.modeling_auto"


def _register(module_name: str) -> None:
    """Register with the Auto class that `module_name` defines: AutoConfig alone when only the configuration
    module has loaded (the model module may still be importing it), everything once the model module has."""
    try:
        if module_name == _AUTO_MODEL:
            from recurrent_depth.hf.registration import register_with_transformers

            register_with_transformers()
        else:
            from transformers.models.auto.configuration_auto import AutoConfig

            from recurrent_depth.config import RecurrentDepthConfig

            AutoConfig.register("huginn_raven", RecurrentDepthConfig, exist_ok=True)
    except Exception as exc:  # never break the user's transformers import; say why the Auto classes lack us
        warnings.warn(f"recurrent_depth: could not register huginn_raven with transformers ({exc!r})",
                      RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_register` right after one of transformers' Auto modules has executed, then steps aside."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, name: str, path: Any,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module: ModuleType) -> None:
                exec_module(module)
                _register(name)

            spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]  (this spec's own loader)
        return spec


def _register_when_transformers_loads() -> None:
    pending = set()
    for name in (_AUTO_CONFIG, _AUTO_MODEL):
        if name in sys.modules:
            _register(name)
        else:
            pending.add(name)
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(pending))


_register_when_transformers_loads()

__all__ = ["PRESETS", "RecurrentDepthConfig", "RecurrentDepthForCausalLM", "RecurrentDepthModel", "generate"]
