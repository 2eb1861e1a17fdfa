"""recurrent_depth: recurrent-depth language models (Huginn-compatible) — model, training, inference, evaluation,
serving. The names below load on first use (so `rdepth --help` does not import torch); loading the model classes,
here or through `recurrent_depth.model`, registers `huginn_raven` with transformers' Auto classes (no remote code)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "recurrent_depth.config",
    "RecurrentDepthConfig": "recurrent_depth.config",
    "RecurrentDepthForCausalLM": "recurrent_depth.model",
    "RecurrentDepthModel": "recurrent_depth.model",
}


def __getattr__(name: str) -> Any:
    """PEP 562: import `recurrent_depth.config` / `recurrent_depth.model` when one of their names is first used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'recurrent_depth' has no attribute {name!r}")
    import importlib

    import recurrent_depth.model  # noqa: F401  (registers the Auto classes)

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin re-export, documented in inference.generate
    """Batched generation with per-row adaptive exit; see `recurrent_depth.inference.generate.generate`."""
    from recurrent_depth.inference.generate import generate as _generate

    return _generate(*args, **kwargs)


__all__ = ["PRESETS", "RecurrentDepthConfig", "RecurrentDepthForCausalLM", "RecurrentDepthModel", "generate"]
