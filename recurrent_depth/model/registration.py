"""Register `huginn_raven` with transformers' AutoConfig / AutoModelForCausalLM, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads a Huginn checkpoint with our code and no `trust_remote_code`."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.model.causal_lm import RecurrentDepthForCausalLM


def register_with_transformers() -> None:
    """Idempotent: safe to call more than once."""
    AutoConfig.register("huginn_raven", RecurrentDepthConfig, exist_ok=True)
    AutoModelForCausalLM.register(RecurrentDepthConfig, RecurrentDepthForCausalLM, exist_ok=True)
