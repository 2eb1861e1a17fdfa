"""Models for the inference tests: the random `debug` preset, and a stub whose recurrence converges."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM


def make_debug_model(seed: int = 0, **overrides) -> RecurrentDepthForCausalLM:
    torch.manual_seed(seed)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug", **overrides)).eval()


def make_converging_model(seed: int = 0, contraction: float = 0.05) -> RecurrentDepthForCausalLM:
    """The debug preset with the adapter's state half scaled down, so s_{i+1} = Core(Adapter[s_i, e]) is a
    contraction in s and the latent state (and with it the next-token distribution) converges within a few steps."""
    model = make_debug_model(seed)
    d = model.config.n_embd
    with torch.no_grad():
        model.transformer.adapter.weight[:, :d] *= contraction
        model.transformer.adapter.weight[:, d:] *= 4.0  # the embedding dominates: a fixed point per token
    return model


@pytest.fixture(scope="module")
def debug_model() -> RecurrentDepthForCausalLM:
    return make_debug_model()


@pytest.fixture(scope="module")
def converging_model() -> RecurrentDepthForCausalLM:
    return make_converging_model()
