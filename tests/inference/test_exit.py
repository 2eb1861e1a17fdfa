"""Exit criteria: each one exits on a model built to converge, row subsets evaluate like the whole batch, threshold 0
never exits, and bad names or thresholds are clear errors."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth.inference.exit import (
    DEFAULT_THRESHOLDS,
    EXIT_CRITERIA,
    ExitCriterion,
    KLExit,
    make_exit_criterion,
    parse_exit_spec,
)
from recurrent_depth.inference.generate import generate

CRITERIA = [name for name in EXIT_CRITERIA if name != "none"]


@pytest.mark.parametrize("name", CRITERIA)
def test_each_criterion_exits_early_on_a_converging_model(converging_model, name: str) -> None:
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(converging_model, ids, max_new_tokens=4, num_steps=20, exit_criterion=name)
    assert out.steps.shape == (2, 4)
    assert bool((out.steps < 20).all()), out.steps
    assert bool((out.steps >= 1).all())


@pytest.mark.parametrize("name", [*CRITERIA, "none"])
def test_threshold_zero_never_exits_and_equals_fixed_depth(converging_model, name: str) -> None:
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    fixed = generate(converging_model, ids, max_new_tokens=4, num_steps=7)
    zero = generate(converging_model, ids, max_new_tokens=4, num_steps=7, exit_criterion=name, exit_threshold=0)
    assert zero.sequences.tolist() == fixed.sequences.tolist()
    assert bool((zero.steps == 7).all())


@pytest.mark.parametrize("name", CRITERIA)
def test_row_subset_check_equals_whole_batch(name: str) -> None:
    crit = make_exit_criterion(name, DEFAULT_THRESHOLDS[name])
    g = torch.Generator().manual_seed(0)
    s0, s1, s2 = (torch.randn(4, 3, 8, generator=g) for _ in range(3))
    l1, l2 = (torch.randn(4, 16, generator=g) for _ in range(2))
    logit = (lambda x: x) if crit.needs_logits else (lambda x: None)
    mem = crit.init(s0, 16)
    _, mem, _ = crit.check(mem, s1, logit(l1))
    whole_exit, whole_mem, whole_vals = crit.check(mem, s2, logit(l2))
    rows = torch.tensor([3, 1])
    sub_exit, sub_mem, sub_vals = crit.check(mem[rows], s2[rows], logit(l2[rows]))
    assert sub_exit.tolist() == whole_exit[rows].tolist()
    torch.testing.assert_close(sub_vals, whole_vals[rows], rtol=0, atol=0)
    torch.testing.assert_close(sub_mem, whole_mem[rows], rtol=0, atol=0)


def test_latent_criteria_ignore_padded_positions() -> None:
    crit = make_exit_criterion("latent-diff")
    g = torch.Generator().manual_seed(0)
    prev, cur = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    padded_prev = torch.cat([torch.randn(1, 2, 8, generator=g), prev], dim=1)
    padded_cur = torch.cat([torch.randn(1, 2, 8, generator=g), cur], dim=1)
    valid = torch.tensor([[False, False, True, True, True, True]])
    _, _, alone = crit.check(prev, cur, None)
    _, _, padded = crit.check(padded_prev, padded_cur, None, valid)
    torch.testing.assert_close(padded, alone)


def test_kl_matches_its_definition() -> None:
    crit = KLExit(1e-3)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    mem = crit.init(torch.zeros(1, 1, 4), 3)
    _, mem, value = crit.check(mem, torch.zeros(1, 1, 4), logits)
    p = logits.softmax(-1)
    expected = (torch.full((3,), 1 / 3) * (torch.log(torch.tensor(1 / 3)) - p.log())).sum()
    torch.testing.assert_close(value[0], expected)


def test_argmax_stability_counts_consecutive_steps() -> None:
    crit = make_exit_criterion("argmax-stability", 2)
    state = torch.zeros(1, 1, 4)
    mem = crit.init(state, 3)
    seq = [[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0], [0, 3.0, 0]]
    exits = []
    for row in seq:
        e, mem, _ = crit.check(mem, state, torch.tensor([row]))
        exits.append(bool(e))
    assert exits == [False, False, False, False, True]


def test_registry_errors_and_specs() -> None:
    with pytest.raises(ValueError, match="unknown exit criterion 'klx'.*valid: kl, minp-kl"):
        make_exit_criterion("klx")
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        make_exit_criterion("kl", -1.0)
    with pytest.raises(ValueError, match="not a number"):
        parse_exit_spec("kl:abc")
    assert parse_exit_spec("kl:5e-4").threshold == 5e-4
    assert parse_exit_spec("cosine").threshold == DEFAULT_THRESHOLDS["cosine"]
    assert DEFAULT_THRESHOLDS["kl"] == 5e-4  # the paper's threshold
    assert all(isinstance(make_exit_criterion(n), ExitCriterion) for n in EXIT_CRITERIA)


def test_generate_rejects_unknown_criterion(debug_model) -> None:
    with pytest.raises(ValueError, match="unknown exit criterion 'bogus'"):
        generate(debug_model, torch.tensor([[1, 2]]), max_new_tokens=1, num_steps=2, exit_criterion="bogus")
    with pytest.raises(ValueError, match="without an exit_criterion"):
        generate(debug_model, torch.tensor([[1, 2]]), max_new_tokens=1, num_steps=2, exit_threshold=0.1)
