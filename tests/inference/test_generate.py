"""The engine against the reference fixtures and against itself: padded batches equal rows alone, cached equals
uncached, batched adaptive exit equals each row alone, speculative equals greedy, and exited rows stop computing."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from recurrent_depth import RecurrentDepthForCausalLM
from recurrent_depth.inference.generate import generate
from tests.conftest import fixture_dir, fixture_json


@pytest.fixture(scope="module", params=["huginn-tiny", "huginn-tiny-242"])
def reference(request):
    model = RecurrentDepthForCausalLM.from_pretrained(fixture_dir(request.param)).eval()
    return model, fixture_json(request.param)


def _native_kwargs(key: str, n_new: int) -> dict:
    """The engine's keywords for a fixture generation name (see ../shared/fixtures/README.md)."""
    if key.startswith("greedy_steps"):
        return dict(num_steps=int(key.removeprefix("greedy_steps")), max_new_tokens=n_new)
    if key.startswith("greedy_warmstart_steps"):
        return dict(num_steps=int(key.removeprefix("greedy_warmstart_steps")), max_new_tokens=n_new, warm_start=True)
    if key.startswith("greedy_adaptive_"):
        _, _, crit, thr, mx = key.split("_")
        return dict(num_steps=int(mx.removeprefix("max")), max_new_tokens=n_new, exit_criterion=crit,
                    exit_threshold=float(thr), kv_sharing="full")  # the reference's default cache lookup
    _, _, draft, look, verify = key.split("_")
    return dict(num_steps=int(verify.removeprefix("verify")), draft_steps=int(draft.removeprefix("draft")),
                lookahead=int(look.removeprefix("look")), max_new_tokens=6)


def _reference_kwargs(key: str, n_new: int) -> dict:
    """The reference's keywords for the same generation."""
    kw = _native_kwargs(key, n_new)
    ref = dict(num_steps=kw["num_steps"], max_new_tokens=kw["max_new_tokens"], init_scale=0.0)
    if kw.get("warm_start"):
        ref["continuous_compute"] = True
    elif "exit_criterion" in kw:
        ref.update(criterion=kw["exit_criterion"], exit_threshold=kw["exit_threshold"])
    elif "draft_steps" in kw:
        ref.update(draft_steps=kw["draft_steps"], lookahead_for_draft=kw["lookahead"])
    else:
        ref["cache_lookup_strategy"] = "full"
    return ref


def _expected(key: str, seq: list[int], prompt_len: int) -> list[int]:
    # the reference's speculative path may emit tokens past max_new_tokens: compare the first 6 new ones
    return seq[: prompt_len + 6] if key.startswith("greedy_speculative") else seq


def test_engine_reproduces_every_fixture_generation(reference) -> None:
    model, meta = reference
    prompt = torch.tensor(meta["prompt"])
    kinds = set()
    for key, expected in meta["generations"].items():
        n_new = len(expected[0]) - prompt.shape[1]
        out = generate(model, prompt, **_native_kwargs(key, n_new))
        assert out.sequences[0].tolist() == _expected(key, expected[0], prompt.shape[1]), key
        kinds.add(key.split("_")[1].rstrip("0123456789"))
    assert kinds == {"steps", "warmstart", "adaptive", "speculative"}


def test_reference_keywords_reproduce_every_fixture_generation(reference) -> None:
    model, meta = reference
    prompt = torch.tensor(meta["prompt"])
    for key, expected in meta["generations"].items():
        n_new = len(expected[0]) - prompt.shape[1]
        out = model.generate(prompt, GenerationConfig(do_sample=False), **_reference_kwargs(key, n_new))
        assert out[0].tolist() == _expected(key, expected[0], prompt.shape[1]), key


def test_reference_min_steps_and_prefill_keywords(debug_model) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=4, num_steps=10, criterion="kl", exit_threshold=10.0, init_scale=0.0,
              return_dict_in_generate=True)
    eager = debug_model.generate(ids, **kw)
    assert eager.steps.tolist() == [[1, 1, 1, 1]]  # a huge threshold exits at the first check
    late = debug_model.generate(ids, min_steps=3, **kw)  # no check at recurrence indices 0..2
    assert late.steps.tolist() == [[4, 4, 4, 4]]
    no_prefill_exit = debug_model.generate(ids, do_not_exit_in_prefill=True, **kw)
    assert no_prefill_exit.steps.tolist() == [[10, 1, 1, 1]]
    with pytest.raises(TypeError, match="does not support"):
        debug_model.generate(ids, criterion="kl", max_new_tokens=2, headway=3)


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 256, (3, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _alone(model, ids, mask, row, **kw):
    start = int((mask[row] == 0).sum())
    return generate(model, ids[row: row + 1, start:], **kw)


@pytest.mark.parametrize("kw", [
    dict(num_steps=4),
    dict(num_steps=4, warm_start=True),
    dict(num_steps=12, exit_criterion="kl", exit_threshold=5e-4),
    dict(num_steps=12, exit_criterion="latent-diff", exit_threshold=0.3, kv_sharing="latest"),
    dict(num_steps=12, exit_criterion="entropy-diff", exit_threshold=0.01, kv_sharing=2),
    dict(num_steps=6, draft_steps=2, lookahead=3),
], ids=["fixed", "warm", "kl", "latent-diff-latest", "entropy-cyclic2", "speculative"])
def test_padded_batch_equals_rows_alone(debug_model, kw) -> None:
    ids, mask = _padded_batch()
    out = generate(debug_model, ids, mask, max_new_tokens=6, **kw)
    for row in range(3):
        alone = _alone(debug_model, ids, mask, row, max_new_tokens=6, **kw)
        assert out.sequences[row, -6:].tolist() == alone.sequences[0, -6:].tolist(), row
        assert out.steps[row].tolist() == alone.steps[0].tolist(), row


def test_batched_adaptive_exit_really_varies_per_row(debug_model) -> None:
    ids, mask = _padded_batch()
    out = generate(debug_model, ids, mask, max_new_tokens=6, num_steps=12, exit_criterion="kl", exit_threshold=5e-4)
    assert len(set(out.steps.flatten().tolist())) > 2  # rows and tokens exit at different depths
    assert bool((out.steps < 12).any())


@pytest.mark.parametrize("kv_sharing", ["full", 1, 3])
def test_cached_generation_equals_uncached_recompute(debug_model, kv_sharing) -> None:
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    out = generate(debug_model, ids, max_new_tokens=5, num_steps=3, kv_sharing=kv_sharing)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = debug_model(seq, num_steps=3, init_scale=0.0).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    if kv_sharing == "full":
        assert out.sequences.tolist() == seq.tolist()
    else:  # sharing changes what deeper steps read: equal only where k covers every step
        same = out.sequences.tolist() == seq.tolist()
        assert same == (kv_sharing >= 3)


def test_cached_logits_equal_full_forward(debug_model) -> None:
    from recurrent_depth.inference.params import DepthParams, SamplingParams
    from recurrent_depth.inference.rows import Row, RowEngine

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    engine = RowEngine(debug_model, max_rows=2, max_len=9, chunk=None)
    rows = [Row(r[:4].tolist(), DepthParams(5, kv_sharing="full"), SamplingParams(5, 0.0)) for r in ids]
    for row in rows:
        engine.add(row)
    pieces = [engine.forward(rows, ids[:, :4].tolist(), 5, all_logits=True)]
    for t in range(4, 9):
        pieces.append(engine.forward(rows, ids[:, t:t + 1].tolist(), 5, all_logits=True))
    with torch.no_grad():
        full = debug_model(ids, num_steps=5, init_scale=0.0).logits
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_speculative_equals_greedy_in_a_batch(debug_model) -> None:
    ids, mask = _padded_batch(1)
    greedy = generate(debug_model, ids, mask, max_new_tokens=9, num_steps=6)
    for draft_steps, lookahead in ((1, 2), (3, 4), (6, 1)):
        spec = generate(debug_model, ids, mask, max_new_tokens=9, num_steps=6, draft_steps=draft_steps,
                        lookahead=lookahead)
        assert spec.sequences.tolist() == greedy.sequences.tolist(), (draft_steps, lookahead)
    same_depth = generate(debug_model, ids, mask, max_new_tokens=9, num_steps=6, draft_steps=6, lookahead=3)
    assert same_depth.stats["accepted_per_round"] == 3  # drafting at the verifier's depth is always accepted


def test_exited_rows_stop_costing_compute(converging_model) -> None:
    calls: list[int] = []
    hook = converging_model.transformer.core_block[0].register_forward_hook(
        lambda mod, args, out: calls.append(args[0].shape[0] * args[0].shape[1]))
    try:
        ids = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(5))
        out = generate(converging_model, ids, max_new_tokens=3, num_steps=16, exit_criterion="kl")
    finally:
        hook.remove()
    steps = out.steps
    expected = int(steps[:, 0].sum()) * 4 + int(steps[:, 1:].sum())  # prompt tokens count at the first position
    assert sum(calls) == expected
    assert int(steps.sum()) < 3 * 3 * 16


def test_kv_policies_memory_and_latest_semantics(converging_model) -> None:
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6))
    full = generate(converging_model, ids, max_new_tokens=4, num_steps=32)
    one = generate(converging_model, ids, max_new_tokens=4, num_steps=32, kv_sharing=1)
    assert full.stats["core_kv_bytes"] == 32 * one.stats["core_kv_bytes"]
    assert one.kv_cache_bytes < full.kv_cache_bytes
    # with exits, `latest` fills the deeper slots the exited tokens skipped; `full` leaves them empty
    kw = dict(max_new_tokens=4, num_steps=32, exit_criterion="kl")
    assert generate(converging_model, ids, kv_sharing="full", **kw).kv_cache_bytes < \
        generate(converging_model, ids, kv_sharing="latest", **kw).kv_cache_bytes


def test_eos_stops_rows_and_pads(debug_model) -> None:
    ids = torch.randint(4, 256, (2, 5), generator=torch.Generator().manual_seed(7))
    free = generate(debug_model, ids, max_new_tokens=6, num_steps=3)
    eos = int(free.sequences[0, 5 + 2])  # row 0's third new token
    out = generate(debug_model, ids, max_new_tokens=6, num_steps=3, eos_token_id=eos)
    row0 = out.sequences[0, 5:].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free.sequences[0, 5: 5 + first + 1].tolist()
    assert row0[first:] == [eos] * (6 - first)
    assert out.steps[0, first + 1:].tolist() == [0] * (5 - first)


def test_sampling_is_reproducible_with_a_seeded_generator(debug_model) -> None:
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=8, num_steps=3, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, min_p=0.01)
    a = generate(debug_model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(debug_model, ids, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(debug_model, ids, generator=torch.Generator().manual_seed(2), **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.sequences.tolist() != c.sequences.tolist()


def test_streamer_receives_prompt_then_tokens(debug_model) -> None:
    class Collect:
        def __init__(self) -> None:
            self.items, self.ended = [], False

        def put(self, value) -> None:
            self.items.append(value.tolist())

        def end(self) -> None:
            self.ended = True

    ids = torch.tensor([[5, 6, 7]])
    s = Collect()
    out = generate(debug_model, ids, max_new_tokens=4, num_steps=2, streamer=s)
    assert s.ended and s.items[0] == [[5, 6, 7]]
    assert [x[0][0] for x in s.items[1:]] == out.sequences[0, 3:].tolist()


def test_bad_arguments_are_clear_errors(debug_model) -> None:
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="unknown KV sharing policy 'sometimes'"):
        generate(debug_model, ids, max_new_tokens=2, num_steps=2, kv_sharing="sometimes")
    with pytest.raises(ValueError, match="integer k >= 1"):
        generate(debug_model, ids, max_new_tokens=2, num_steps=2, kv_sharing=0)
    with pytest.raises(ValueError, match="padding must be on the left"):
        generate(debug_model, ids, torch.tensor([[1, 1, 0]]), max_new_tokens=2, num_steps=2)
    with pytest.raises(ValueError, match="greedy at fixed depth"):
        generate(debug_model, ids, max_new_tokens=2, num_steps=2, draft_steps=1, exit_criterion="kl")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(debug_model, ids, max_new_tokens=2, num_steps=2, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="unsupported cache_lookup_strategy 'randomized'"):
        debug_model.generate(ids, cache_lookup_strategy="randomized", max_new_tokens=2)
    with pytest.raises(ValueError, match="multiple of the core's 2 layers"):
        debug_model.generate(ids, cache_lookup_strategy="latest-m4-compress-s3", max_new_tokens=2)


def test_default_kv_sharing_is_latest_under_an_exit_and_full_at_fixed_depth() -> None:
    from recurrent_depth.assets import default_model_path
    from recurrent_depth.data.tokenizer import encode_prompt, load_tokenizer

    path = default_model_path()
    model, tok = RecurrentDepthForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    ids = torch.tensor([encode_prompt(tok, "5+5*5-6+6*2-4=")])
    kw = dict(max_new_tokens=4, num_steps=32, exit_criterion="kl", exit_threshold=5e-4)
    auto, latest, full = (generate(model, ids, **kw, **extra) for extra in ({}, {"kv_sharing": "latest"},
                                                                             {"kv_sharing": "full"}))
    assert torch.equal(auto.sequences, latest.sequences) and torch.equal(auto.steps, latest.steps)
    assert tok.decode(auto.sequences[0, ids.shape[1]:][:2].tolist()) == "6<eos>"
    # under `full` early exits leave holes: past the answer (after <eos>, where exits vary most) the tokens differ
    assert not torch.equal(full.sequences, latest.sequences)
    fixed = [generate(model, ids, max_new_tokens=4, num_steps=4, **extra) for extra in ({}, {"kv_sharing": "full"})]
    assert torch.equal(fixed[0].sequences, fixed[1].sequences) and fixed[0].kv_cache_bytes == fixed[1].kv_cache_bytes


@pytest.mark.parametrize("kw, named", [
    ({"init_scale": float("nan")}, "init_scale"), ({"init_scale": -1.0}, "init_scale"),
    ({"init_scale": float("inf")}, "init_scale"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature"),
    ({"do_sample": True, "temperature": -0.5}, "temperature"),
])
def test_non_finite_or_negative_numbers_are_clear_errors(debug_model, kw: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        generate(debug_model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, num_steps=2, **kw)
