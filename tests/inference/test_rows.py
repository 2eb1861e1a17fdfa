"""The library's per-row step engine (`inference.rows`) without a server: rows at mixed depths, exits and sharing
policies give what `generate()` gives each alone, and a row ends at a stop token id or at max_tokens."""

from __future__ import annotations

import torch

from recurrent_depth.inference import fused
from recurrent_depth.inference.generate import generate
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.rows import Row, RowEngine
from tests.inference.conftest import make_converging_model


def test_rows_equal_generate_alone_and_end_at_a_stop_token(converging_model) -> None:
    depths = [DepthParams(3), DepthParams(12, "kl", 1e-2), DepthParams(8, "latent-diff", 0.05, "raw", 2),
              DepthParams(6, "kl", 1e-2, kv_sharing="full")]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    first = generate(converging_model, torch.tensor([prompts[0]]), max_new_tokens=6, num_steps=3).sequences
    stop = int(first[0, 3 + 2])  # row 0's third token: it must stop there
    rows = [Row(p, d, SamplingParams(6, 0.0, seed=0, stop_token_ids=(stop,) if i == 0 else ()))
            for i, (p, d) in enumerate(zip(prompts, depths))]
    engine = RowEngine(converging_model, max_rows=2)
    engine.run(rows)
    for i, (row, d) in enumerate(zip(rows, depths)):
        out = generate(converging_model, torch.tensor([row.prompt]), max_new_tokens=6, num_steps=d.num_steps,
                       exit_criterion=d.exit_criterion, exit_threshold=d.exit_threshold, warm_start=d.warm_start,
                       kv_sharing=d.kv_sharing, eos_token_id=stop if i == 0 else None)
        n = len(row.tokens)
        assert (row.tokens, row.token_steps) == (out.sequences[0, len(row.prompt):][:n].tolist(),
                                                 out.steps[0, :n].tolist()), d
    assert rows[0].finish_reason == "stop" and rows[0].tokens[-1] == stop and len(rows[0].tokens) <= 3
    assert all(r.finish_reason == "length" and len(r.tokens) == 6 for r in rows[1:])
    assert any(min(r.token_steps) < r.depth.num_steps for r in rows[1:])  # some rows exited early
    assert engine.store.bytes_in_use() == 0 and engine.free_rows == 2


def test_row_engine_runs_the_fused_op_with_the_eager_tokens(monkeypatch) -> None:
    """Prompts, one core step per row (each at its own step, slot and position) and the coda go through the fused op
    over keys gathered from the paged store, and give the tokens and steps of the eager modules."""
    model = make_converging_model(contraction=0.6)  # slow enough convergence for varied exits
    depths = [DepthParams(5), DepthParams(12, "kl", 1e-4, kv_sharing="latest"), DepthParams(9, "kl", 1e-4),
              DepthParams(7, kv_sharing=2), DepthParams(10, "latent-diff", 0.05, "raw", 1)]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    stages: list[str] = []
    real = fused._run_paged
    monkeypatch.setattr(fused, "_run_paged", lambda cache, blocks, part, *a: stages.append(part)
                        or real(cache, blocks, part, *a))

    def run(on: bool) -> list[tuple[list[int], list[int]]]:
        model.transformer.fused_decode = on
        rows = [Row(p, d, SamplingParams(6, 0.0)) for p, d in zip(prompts, depths)]
        engine, waiting = RowEngine(model, max_rows=3), list(rows)
        while waiting or engine.live:  # rows join mid-way: different lengths and steps share calls
            if waiting and engine.free_rows:
                engine.add(waiting.pop(0))
            engine.step()
        return [(r.tokens, r.token_steps) for r in rows]

    try:
        eager = run(False)
        assert not stages
        fast = run(True)
    finally:
        model.transformer.fused_decode = True
    assert {"prelude", "core", "coda"} <= set(stages)
    assert fast == eager
    assert len({s for _, steps in fast[1:3] for s in steps}) > 1  # rows exited at different depths
