"""The continuous-batching engine: every row gives what `inference.generate` gives for it alone, rows join and leave
between steps, a shallow row is not held to a deep row's pace, and rows that finished their recurrence cost nothing."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth.inference.generate import generate
from recurrent_depth.serving.engine import BatchEngine, DepthParams, SamplingParams, Sequence
from recurrent_depth.serving.scheduler import QueueFull, Scheduler

TEXTS = ["hello world", "abc", "the quick brown fox", "x", "why?"]
CASES = [  # (num_steps, criterion, threshold, warm_start, kv_sharing, temperature)
    (4, "none", None, False, "full", 0.0),
    (1, "none", None, False, "full", 0.0),
    (9, "none", None, False, "latest", 0.8),
    (12, "kl", 1e-3, False, "full", 0.0),
    (12, "kl", 1e-3, False, "latest", 0.0),
    (10, "latent-diff", 0.05, "raw", 2, 0.0),
    (10, "entropy-diff", 1e-2, True, "full", 0.7),
    (8, "argmax-stability", 2, False, "latest", 0.0),
    (8, "cosine", 1e-3, False, 3, 0.0),
    (8, "minp-kl", 1e-4, True, "full", 0.0),
    (0, "none", None, False, "full", 0.0),
]


def _seq(served, i: int, case: tuple, max_tokens: int = 8, seed: int | None = None) -> Sequence:
    r, crit, thr, warm, sharing, temp = case
    prompt = served.tokenize(TEXTS[i % len(TEXTS)])
    return Sequence(prompt, DepthParams(r, crit, thr, warm, sharing, init_scale=0.5),
                    SamplingParams(max_tokens, temp, 0.9 if temp else 1.0, seed=100 + i if seed is None else seed))


def _alone(served, seq: Sequence) -> tuple[list[int], list[int]]:
    d, sp = seq.depth, seq.sampling
    out = generate(served.model, torch.tensor([seq.prompt]), max_new_tokens=sp.max_tokens, num_steps=d.num_steps,
                   exit_criterion=d.exit_criterion, exit_threshold=d.exit_threshold, warm_start=d.warm_start,
                   kv_sharing=d.kv_sharing, do_sample=sp.temperature > 0, temperature=sp.temperature or 1.0,
                   top_p=sp.top_p if sp.top_p < 1 else None, generator=torch.Generator().manual_seed(sp.seed),
                   init_scale=d.init_scale)
    return out.sequences[0, len(seq.prompt):].tolist(), out.steps[0].tolist()


def _drain(engine: BatchEngine, waiting: list[Sequence], join_every: int = 1) -> int:
    """Step until all done, admitting one waiting sequence every `join_every` steps; returns the step count."""
    steps = 0
    while waiting or engine.live:
        if waiting and engine.free_rows and steps % join_every == 0:
            engine.add(waiting.pop(0))
        engine.step()
        steps += 1
    return steps


def test_batched_rows_equal_generate_alone(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=6)  # no tokenizer: token ids only, no EOS
    seqs = [_seq(served, i, case) for i, case in enumerate(CASES)]
    _drain(engine, list(seqs), join_every=3)  # rows join while others are mid-recurrence
    for seq in seqs:
        tokens, steps = _alone(served, seq)
        assert (seq.tokens, seq.token_steps) == (tokens, steps), seq.depth
    assert any(s.depth.exit_criterion != "none" and min(s.token_steps) < s.depth.num_steps for s in seqs)


def test_shallow_row_not_held_to_deep_rows_pace(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=4)
    finished_at: dict[int, int] = {}
    seqs = [Sequence(served.tokenize("abc"), DepthParams(r), SamplingParams(6, 0.0)) for r in (2, 16)]
    for s in seqs:
        engine.add(s)
    step = 0
    while engine.live:
        engine.step()
        step += 1
        for s in seqs:
            if s.finish_reason and s.id not in finished_at:
                finished_at[s.id] = step
    shallow, deep = (finished_at[s.id] for s in seqs)
    assert shallow == 6 * 2  # one engine step per recurrence: 6 tokens x 2 steps
    assert deep == 6 * 16


def test_only_iterating_rows_cost_core_steps(served, monkeypatch: pytest.MonkeyPatch) -> None:
    t = served.model.transformer
    rows_per_call: list[int] = []
    original = t.core_step

    def counting(state, e, step, ctx):
        rows_per_call.append(state.shape[0])
        return original(state, e, step, ctx)

    monkeypatch.setattr(t, "core_step", counting)
    engine = BatchEngine(served.model, None, max_rows=4)
    seqs = [_seq(served, i, CASES[i]) for i in (0, 3, 5)]
    _drain(engine, list(seqs))
    assert sum(rows_per_call) == sum(s.total_steps for s in seqs)  # no core step for a row that was done
    assert max(rows_per_call) > 1  # and rows were batched


def test_rows_leave_and_slots_are_reused(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=2)
    seqs = [_seq(served, i, CASES[i % 4], max_tokens=3 + i) for i in range(5)]
    _drain(engine, list(seqs))
    assert engine.free_rows == 2 and not engine.live
    for seq in seqs:
        assert (seq.tokens, seq.token_steps) == _alone(served, seq)


def test_remove_frees_the_row(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=1)
    seq = _seq(served, 0, CASES[0], max_tokens=16)
    engine.add(seq)
    engine.step()
    engine.remove(seq)
    assert engine.free_rows == 1 and seq.finish_reason == "abort"
    again = _seq(served, 0, CASES[0], max_tokens=4)
    _drain(engine, [again])
    assert (again.tokens, again.token_steps) == _alone(served, again)


def test_add_rejects_what_does_not_fit(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=1)
    with pytest.raises(ValueError, match="context length"):
        engine.add(Sequence([5] * 90, DepthParams(2), SamplingParams(10, 0.0)))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add(Sequence([], DepthParams(2), SamplingParams(1, 0.0)))
    engine.add(Sequence([5], DepthParams(2), SamplingParams(1, 0.0)))
    with pytest.raises(RuntimeError, match="no free row"):
        engine.add(Sequence([5], DepthParams(2), SamplingParams(1, 0.0)))


def test_kv_bytes_in_use_fall_back_after_a_deep_request(served) -> None:
    engine = BatchEngine(served.model, None, max_rows=3)
    shallow = Sequence(served.tokenize("abc"), DepthParams(2), SamplingParams(40, 0.0, seed=0))
    engine.add(shallow)
    for _ in range(6):
        engine.step()
    before, pools_before = engine.store.bytes_in_use(), engine.store.nbytes()
    deep = Sequence(served.tokenize("the quick brown fox"), DepthParams(64), SamplingParams(4, 0.0))
    engine.add(deep)
    peak = 0
    while deep.finish_reason is None:
        engine.step()
        peak = max(peak, engine.store.bytes_in_use())
    assert peak > 10 * before  # the deep request held 64 core slots
    engine.step()  # the shallow row goes on: a few more tokens at 2 steps
    after = engine.store.bytes_in_use()
    assert after <= before + engine.store._page_bytes("core") + engine.store._page_bytes("prelude") \
        + engine.store._page_bytes("coda")  # at most one new page per part for the shallow row's new tokens
    assert engine.store.nbytes() < peak  # the pools shrank too, not only the count
    _drain(engine, [])
    assert engine.store.bytes_in_use() == 0 and shallow.tokens == _alone(served, shallow)[0]
    assert pools_before > 0


def test_scheduler_queue_limit(served) -> None:
    sched = Scheduler(BatchEngine(served.model, None, max_rows=1), max_queue=2)  # not started: nothing runs
    sched.submit([_seq(served, 0, CASES[0]), _seq(served, 1, CASES[0])])
    with pytest.raises(QueueFull):
        sched.submit([_seq(served, 2, CASES[0])])
