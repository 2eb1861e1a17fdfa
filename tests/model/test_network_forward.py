"""The network on its own (`RecurrentDepthModel`): its forward runs the paper's order and is what the transformers
wrapper's forward computes; the fused runner and the depth draw are handed in from above, not imported."""

from __future__ import annotations

import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.inference.cache import KVCache
from recurrent_depth.inference.fused import FusedRunner
from recurrent_depth.model import RecurrentDepthModel


def _lm() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()


def _ids(lm: RecurrentDepthForCausalLM, T: int = 6) -> torch.Tensor:
    return torch.randint(0, lm.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


def test_network_forward_is_the_wrappers_forward() -> None:
    """lm_head(hidden) of the network's forward is the wrapper's logits, bit for bit; latents likewise."""
    lm = _lm()
    ids = _ids(lm)
    s0 = torch.randn(2, 6, lm.config.n_embd, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = lm(ids, num_steps=(1, 2), input_states=s0)
        hidden, latents = lm.transformer(ids, (1, 2), input_states=s0)
    assert torch.equal(lm.lm_head(hidden).float(), out.logits)
    assert torch.equal(latents, out.latent_states)


def test_network_forward_runs_the_stages_in_order() -> None:
    """e = prelude(embed(x)); s = core^r(s0, e); decode(s): the forward composes the stage methods."""
    lm = _lm()
    t, ids = lm.transformer, _ids(lm)
    s0 = torch.randn(2, 6, lm.config.n_embd, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = t.attention_context(ids)
        e = t.embed(ids, ctx)
        state = s0
        for i in range(3):
            state = t.core_step(state, e, i, ctx)
        expected = t.decode(state, ctx)
        got = t(ids, 3, input_states=s0)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_network_forward_extends_a_cache() -> None:
    """A cached forward of the prompt then one token equals the uncached forward of both (to float rounding: the
    uncached pass attends through the package's causal kernel, the cached one through SDPA)."""
    lm = _lm()
    t, ids = lm.transformer, _ids(lm, 7)
    t.fused_decode = False
    with torch.no_grad():
        full, _ = t(ids, 3, init_scale=0.0)
        cache = KVCache()
        t(ids[:, :6], 3, init_scale=0.0, cache=cache)
        assert cache.get_seq_length() == 6
        last, _ = t(ids[:, 6:], 3, init_scale=0.0, cache=cache)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(last, full[:, 6:], rtol=1e-5, atol=1e-5)


class _CountingRunner(FusedRunner):
    def __init__(self) -> None:
        self.parts: list[str] = []

    def run_blocks(self, *args, **kwargs) -> torch.Tensor:
        self.parts.append(args[1])
        return super().run_blocks(*args, **kwargs)


def test_the_network_runs_eagerly_until_a_runner_is_handed_in() -> None:
    """A bare network has no stage runner (it imports no inference code); the wrapper hands it the fused one, and a
    runner handed in is what cached calls go through."""
    lm = _lm()
    assert RecurrentDepthModel(lm.config).stage_runner is None
    assert isinstance(lm.transformer.stage_runner, FusedRunner)
    runner = _CountingRunner()
    lm.transformer.stage_runner = runner
    ids = _ids(lm)
    with torch.no_grad():
        cache = KVCache()
        lm.transformer(ids, 2, init_scale=0.0, cache=cache)
        lm.transformer(ids[:, :1], 2, init_scale=0.0, cache=cache)
    assert runner.parts == ["prelude", "core", "coda"] * 2  # the prompt, then the token
    lm.transformer.stage_runner = None
    with torch.no_grad():
        lm.transformer(ids[:, :1], 2, init_scale=0.0, cache=cache)
    assert runner.parts == ["prelude", "core", "coda"] * 2


class _Recording:
    def __init__(self) -> None:
        self.calls: list[torch.Generator | None] = []

    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        self.calls.append(generator)
        return 1, 1


def test_train_mode_draws_the_depth_from_the_sampler_handed_in() -> None:
    """Without num_steps a train-mode forward draws from `depth_sampler` with `depth_generator` (the training
    loop hands in the sampler its config names); with num_steps, or in eval mode, nothing is drawn."""
    lm = _lm().train()
    lm.depth_sampler, lm.depth_generator = _Recording(), torch.Generator().manual_seed(0)
    ids = _ids(lm)
    lm(ids)
    lm(ids, num_steps=2)
    lm.eval()(ids)
    assert lm.depth_sampler.calls == [lm.depth_generator]
