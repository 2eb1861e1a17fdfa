"""The transformers glue, above the network and the inference engine: `RecurrentDepthForCausalLM` (a
`PreTrainedModel` whose `generate` routes the reference's keywords to `recurrent_depth.inference`) and the
registration of `huginn_raven` with transformers' Auto classes (no remote code), done on import."""

from recurrent_depth.hf.causal_lm import RecurrentDepthForCausalLM, RecurrentDepthOutput
from recurrent_depth.hf.registration import register_with_transformers

register_with_transformers()

__all__ = ["RecurrentDepthForCausalLM", "RecurrentDepthOutput", "register_with_transformers"]
