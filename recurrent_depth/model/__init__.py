"""The network only: layers, the recurrent-depth model, its initialisation and checkpoint I/O."""

from recurrent_depth.model.causal_lm import RecurrentDepthForCausalLM, RecurrentDepthOutput
from recurrent_depth.model.model import RecurrentDepthModel

__all__ = ["RecurrentDepthForCausalLM", "RecurrentDepthModel", "RecurrentDepthOutput"]
