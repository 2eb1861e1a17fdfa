"""The network only: layers, the recurrent-depth model, its initialisation and checkpoint I/O.

Importing it registers `huginn_raven` with transformers' Auto classes (no remote code)."""

from recurrent_depth.model.causal_lm import RecurrentDepthForCausalLM, RecurrentDepthOutput
from recurrent_depth.model.model import RecurrentDepthModel
from recurrent_depth.model.registration import register_with_transformers

register_with_transformers()

__all__ = ["RecurrentDepthForCausalLM", "RecurrentDepthModel", "RecurrentDepthOutput"]
