"""The network only: layers, the recurrent-depth model, its initialisation and checkpoint I/O. It imports nothing
from inference, training, serving or evaluation; the transformers wrapper is `recurrent_depth.hf`."""

from recurrent_depth.model.model import RecurrentDepthModel

__all__ = ["RecurrentDepthModel"]
