"""The inspection's computations: exit steps on stubs that converge at known steps, the trace against the model's
own forward, the logit lens, PCA trajectories and the choice of tokens."""

from __future__ import annotations

import math

import pytest
import torch
from inspection_stubs import contraction_stub, settling_stub

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.inspection import (
    CRITERIA,
    convergence,
    default_criteria,
    first_exit,
    latent_trajectories,
    logit_lens,
    pca_projection,
    resolve_positions,
    select_positions,
    trace_latents,
)


def test_settling_stub_every_criterion_stops_where_the_state_stops_moving() -> None:
    settle, R = [1, 3, 6, 9, 30], 14
    model = settling_stub(settle)
    trace = trace_latents(model, torch.arange(len(settle)), R, init_scale=0.0)
    conv = convergence(trace)
    assert conv.criteria == list(CRITERIA)
    for name in CRITERIA:
        expected = [k + (5 if name == "argmax-stability" else 1) for k in settle]
        exited = [e <= R for e in expected]
        assert conv.exited[name].tolist() == exited, name
        assert conv.exit_step[name].tolist() == [e if ok else R for e, ok in zip(expected, exited)], name
    # once settled the state does not move at all; before, it jumps between one-hot states
    for p, k in enumerate(settle):
        assert torch.all(conv.distance[k:, p] == 0)
        assert torch.all(conv.distance[1:k, p] > 1)
    assert conv.values["argmax-stability"][:, 0].tolist() == [0, 1, 2, 3, 4, 5] + list(range(6, R))


def test_contraction_stub_latent_diff_follows_the_closed_form() -> None:
    rates, R = [0.5, 0.7, 0.9, 0.999], 30
    model, _ = contraction_stub(rates)
    trace = trace_latents(model, torch.arange(len(rates)), R, init_scale=0.0)
    conv = convergence(trace)
    # s_0 = 0 and s_t = f (1 - rho^t), so ||s_t - s_(t-1)|| / ||s_t|| = rho^(t-1) (1 - rho) / (1 - rho^t)
    for p, rho in enumerate(rates):
        closed = [rho ** (t - 1) * (1 - rho) / (1 - rho**t) for t in range(1, R + 1)]
        torch.testing.assert_close(conv.values["latent-diff"][:, p], torch.tensor(closed), rtol=1e-4, atol=1e-6)
        below = [t for t, v in enumerate(closed, start=1) if v < 0.03]
        if below:
            assert int(conv.exit_step["latent-diff"][p]) == below[0]
        else:
            assert not conv.exited["latent-diff"][p] and int(conv.exit_step["latent-diff"][p]) == R
    assert conv.exited["latent-diff"].tolist() == [True, True, True, False]
    torch.testing.assert_close(conv.relative, conv.values["latent-diff"])
    # the states move along f only: cosine is undefined at step 1 (s_0 = 0) and zero afterwards
    assert torch.isnan(conv.values["cosine"][0]).all()
    assert conv.exit_step["cosine"].tolist() == [2] * len(rates)


def test_select_positions_picks_the_most_and_least_converged() -> None:
    rates = [0.9, 0.3, 0.97, 0.6, 0.8]
    model, _ = contraction_stub(rates)
    trace = trace_latents(model, torch.arange(len(rates)), 12, init_scale=0.0)
    assert select_positions(trace, count=2) == [1, 3, 2, 0]
    assert select_positions(trace, count=1) == [1, 2]
    one = trace_latents(contraction_stub([0.5])[0], torch.arange(1), 4, init_scale=0.0)
    assert select_positions(one, count=2) == [0]


def test_trace_matches_the_models_own_forward(debug_model: RecurrentDepthForCausalLM) -> None:
    ids = torch.tensor([5, 17, 42, 99, 3, 250])
    R = 4
    trace = trace_latents(debug_model, ids, R, init_scale=0.0, top_k=3)
    assert trace.states.shape == (R + 1, len(ids), debug_model.config.n_embd)
    assert torch.all(trace.states[0] == 0)
    prev = torch.full((len(ids), debug_model.config.vocab_size), 1.0 / debug_model.config.vocab_size)
    with torch.no_grad():
        for t in range(1, R + 1):
            out = debug_model(ids[None], num_steps=t, init_scale=0.0)
            probs = out.logits[0].softmax(-1)
            torch.testing.assert_close(debug_model.transformer.ln_f(trace.states[t]), out.latent_states[0])
            top_p, top_i = probs.topk(3, dim=-1)
            assert torch.equal(trace.top_ids[t - 1], top_i)
            torch.testing.assert_close(trace.top_probs[t - 1], top_p)
            kl = (prev * (prev.log() - probs.log())).sum(-1)  # KL(p_(t-1) || p_t), written out
            torch.testing.assert_close(trace.values["kl"][t - 1], kl, rtol=1e-4, atol=1e-6)
            prev = probs


def test_random_initial_state_is_reproducible_with_a_seed(debug_model: RecurrentDepthForCausalLM) -> None:
    ids = torch.tensor([1, 2, 3])
    runs = [trace_latents(debug_model, ids, 2, init_scale=1.0, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0].states, runs[1].states)
    assert not torch.equal(runs[0].states[0], runs[2].states[0])
    assert runs[0].states[0].abs().sum() > 0


def test_thresholds_reach_the_shared_criteria() -> None:
    settle, R = [2, 8], 12
    model = settling_stub(settle)
    loose = trace_latents(model, torch.arange(2), R, init_scale=0.0,
                          criteria=default_criteria({"kl": 100.0, "argmax-stability": 2}))
    assert loose.thresholds["kl"] == 100.0
    conv = convergence(loose)
    assert conv.exit_step["kl"].tolist() == [1, 1]  # any KL is below 100
    assert conv.exit_step["argmax-stability"].tolist() == [4, 10]
    with pytest.raises(ValueError, match="unknown exit criterion 'kll'.*kl, minp-kl"):
        default_criteria({"kll": 1.0})
    with pytest.raises(ValueError, match="threshold"):
        default_criteria({"kl": -1.0})


def test_first_exit_takes_the_first_step_and_marks_never() -> None:
    fires = torch.tensor([[False, False, True], [True, False, True], [True, False, False]])
    step, exited = first_exit(fires)
    assert step.tolist() == [2, 3, 1]
    assert exited.tolist() == [True, False, True]


def test_bad_inputs_are_refused_with_the_reason(debug_model: RecurrentDepthForCausalLM) -> None:
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        trace_latents(debug_model, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="prompt is empty"):
        trace_latents(debug_model, torch.tensor([], dtype=torch.long), 2)
    with pytest.raises(ValueError, match="one prompt"):
        trace_latents(debug_model, torch.ones(2, 3, dtype=torch.long), 2)
    short = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug", block_size=4)).eval()
    with pytest.raises(ValueError, match="prompt has 5 tokens, more than the model's block_size of 4"):
        trace_latents(short, torch.arange(5), 2)


def test_logit_lens_decodes_every_step() -> None:
    model = settling_stub([2, 5], d=16)
    trace = trace_latents(model, torch.arange(2), 6, init_scale=0.0, top_k=4)
    lens = logit_lens(trace, decode=lambda ids: f"<{ids[0]}>")
    assert len(lens) == 2 and all(len(pos) == 6 and all(len(step) == 4 for step in pos) for pos in lens)
    for p in range(2):
        for t in range(6):
            entries = lens[p][t]
            assert [e.token_id for e in entries] == trace.top_ids[t, p].tolist()
            assert [e.text for e in entries] == [f"<{i}>" for i in trace.top_ids[t, p].tolist()]
            assert all(a.prob >= b.prob for a, b in zip(entries, entries[1:]))
    # position 1 settles at step 5 on token (1 + 3*4 + 1) % 16 = 14; before, the argmax moves by 3 each step
    assert [lens[1][t][0].token_id for t in range(6)] == [4, 7, 10, 13, 14, 14]
    assert logit_lens(trace)[0][0][0].text.startswith("#")


def test_pca_recovers_a_planar_orbit() -> None:
    g = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(10, 2, generator=g))  # two orthonormal directions in 10-d
    angle = torch.linspace(0, 2 * math.pi, 41)[:-1]
    circle = torch.stack([2.0 * angle.cos(), 2.0 * angle.sin()], dim=1)  # (40, 2), radius 2
    points = circle @ basis.T + 5.0 + 1e-4 * torch.randn(40, 10, generator=g)
    coords, explained = pca_projection(points, 4)
    assert coords.shape == (40, 4) and explained.shape == (4,)
    assert explained[:2].sum() > 0.999
    torch.testing.assert_close(coords[:, :2].norm(dim=1), torch.full((40,), 2.0), atol=1e-3, rtol=0)
    assert torch.all(coords[-1] >= 0)  # sign convention: the last point is on the positive side


def test_trajectories_for_picked_and_default_tokens() -> None:
    rates = [0.5, 0.95, 0.8]
    model, fixed = contraction_stub(rates)
    trace = trace_latents(model, torch.tensor([10, 11, 12]), 16, init_scale=0.0)
    trajs = latent_trajectories(trace, select_positions(trace, count=1), n_components=6)
    assert [t.position for t in trajs] == [0, 1]
    assert [t.token_id for t in trajs] == [10, 11]
    # a contraction from 0 toward f is a straight line: one component explains it all
    assert trajs[0].coords.shape == (17, 6) and trajs[0].explained[0] > 0.999
    with pytest.raises(ValueError, match="outside the prompt's 3 tokens"):
        latent_trajectories(trace, [3])


def test_resolve_positions_by_index_or_text() -> None:
    texts = ["The", " cat", " sat", " cat"]
    assert resolve_positions([0, "-1", "cat", "2"], texts) == [0, 3, 1, 2]
    assert resolve_positions(["1", " cat"], texts) == [1]
    with pytest.raises(ValueError, match="no token 'dog' in the prompt; its tokens are: 'The'"):
        resolve_positions(["dog"], texts)
    with pytest.raises(ValueError, match="position 4 is outside"):
        resolve_positions([4], texts)


def test_half_precision_model_gives_fp32_records(debug_model: RecurrentDepthForCausalLM) -> None:
    import copy

    half = copy.deepcopy(debug_model).to(torch.bfloat16)
    trace = trace_latents(half, torch.tensor([4, 8, 15, 16]), 3, init_scale=0.0)
    assert trace.states.dtype == torch.float32 and trace.top_probs.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v[1:]).all() for v in trace.values.values())
    reference = trace_latents(debug_model, torch.tensor([4, 8, 15, 16]), 3, init_scale=0.0)
    torch.testing.assert_close(trace.states, reference.states, rtol=0.1, atol=0.1)
