"""recurrent_depth: recurrent-depth language models (Huginn-compatible) — model, training, inference, evaluation,
serving. Importing the package registers `huginn_raven` with transformers' Auto classes (no remote code)."""

from recurrent_depth.config import PRESETS, RecurrentDepthConfig
from recurrent_depth.model import RecurrentDepthForCausalLM, RecurrentDepthModel
from recurrent_depth.model.registration import register_with_transformers

register_with_transformers()

__version__ = "0.1.0"


def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin re-export, documented in inference.generate
    """Batched generation with per-row adaptive exit; see `recurrent_depth.inference.generate.generate`."""
    from recurrent_depth.inference.generate import generate as _generate

    return _generate(*args, **kwargs)


__all__ = ["PRESETS", "RecurrentDepthConfig", "RecurrentDepthForCausalLM", "RecurrentDepthModel", "generate"]
