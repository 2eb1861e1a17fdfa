"""The depth samplers: Huginn's distribution, bounds, per-step determinism, independence from rank and RNG state."""

from __future__ import annotations

import statistics

import pytest
import torch

from recurrent_depth.depth_sampler import FixedDepth, NonRecurrent, PoissonLogNormalFilling, make_sampler


def test_poisson_lognormal_distribution_matches_reference_facts() -> None:
    s = PoissonLogNormalFilling(mean_recurrence=32, backprop_depth=8)
    draws = [s.sample(step=i) for i in range(20000)]
    totals = [n + k for n, k in draws]
    # reference §3: E[p] = 33 (tau has mean 32, +1), median 29, P(p > 64) about 5.8%
    assert abs(statistics.fmean(totals) - 33) < 0.6
    assert 27 <= statistics.median(totals) <= 31
    assert 0.04 < sum(t > 64 for t in totals) / len(totals) < 0.08
    for n, k in draws:
        assert n >= 0 and 1 <= k <= 8 and k == min(8, n + k)
    assert any(k < 8 for _, k in draws)  # short draws keep all their steps with gradients


def test_sampler_is_a_function_of_the_step_only() -> None:
    s = PoissonLogNormalFilling(8, 4)
    torch.manual_seed(1)
    a = [s.sample(step=i) for i in range(50)]
    torch.manual_seed(2)
    torch.rand(100)
    b = [s.sample(step=i) for i in range(50)]
    assert a == b
    assert len(set(a)) > 5  # it does vary from step to step


def test_generator_path_and_fixed_and_non_recurrent() -> None:
    s = PoissonLogNormalFilling(16, 4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [s.sample(generator=g1) for _ in range(10)] == [s.sample(generator=g2) for _ in range(10)]
    assert FixedDepth(12, 4).sample(step=3) == (8, 4)
    assert FixedDepth(3, 8).sample() == (0, 3)
    assert NonRecurrent().sample(step=7) == (0, 1)
    assert make_sampler("fixed", 10, 2, num_steps=0).sample() == (8, 2)
    assert make_sampler("non-recurrent", 10, 2).sample() == (0, 1)


@pytest.mark.parametrize("kwargs", [dict(mean_recurrence=0), dict(backprop_depth=0), dict(sigma=0.0)])
def test_invalid_sampler_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PoissonLogNormalFilling(**kwargs)


def test_unknown_sampler_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="poisson-lognormal-filling"):
        make_sampler("geometric", 8, 2)


def test_model_draws_from_the_sampler_in_train_mode() -> None:
    from recurrent_depth.config import RecurrentDepthConfig
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).train()
    ids = torch.randint(0, 256, (1, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert model.transformer.adapter.weight.grad is not None


def test_the_config_accepts_exactly_the_samplers_make_sampler_builds() -> None:
    """One list of sampler names (depth_sampler.SamplerName): the config's `depth.sampler` type is it."""
    import typing

    from recurrent_depth.depth_sampler import SAMPLERS
    from recurrent_depth.training.config import DepthSection

    assert typing.get_args(typing.get_type_hints(DepthSection)["sampler"]) == SAMPLERS
    assert all(make_sampler(name, 8, 2).sample(step=0) for name in SAMPLERS)


def test_depth_warmup_ramps_the_total_depth_from_one_then_hands_over() -> None:
    """`depth.warmup_steps`: step t of the ramp runs at most 1 + t * mean / warmup recurrences (r = 1 first), the
    last min(total, backprop_depth) with gradients; after the ramp, the wrapped sampler's own draw, unchanged."""
    from recurrent_depth.depth_sampler import DepthWarmup

    inner = PoissonLogNormalFilling(mean_recurrence=8, backprop_depth=2)
    warm = make_sampler("poisson-lognormal-filling", 8, 2, warmup_steps=100)
    assert isinstance(warm, DepthWarmup)
    assert warm.sample(step=0) == (0, 1)
    caps = [1 + t * 8 // 100 for t in range(100)]
    totals = [sum(warm.sample(step=t)) for t in range(100)]
    assert all(total <= cap for total, cap in zip(totals, caps)) and max(totals) > 4  # capped, and rising
    assert all(k == min(2, n + k) for n, k in (warm.sample(step=t) for t in range(100)))  # the last 2 with grads
    assert [warm.sample(step=t) for t in range(100, 140)] == [inner.sample(step=t) for t in range(100, 140)]
    assert make_sampler("fixed", 8, 2, num_steps=6, warmup_steps=10).sample(step=5) == (2, 2)  # cap 1 + 5*6//10 = 4
    with pytest.raises(ValueError, match="warmup_steps"):
        DepthWarmup(inner, 0, 8, 2)
