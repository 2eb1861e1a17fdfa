"""Greedy decoding, accuracy / exit / perplexity sweeps: checked against direct computation with the model."""

from __future__ import annotations

import math

import pytest
import torch

from recurrent_depth.evaluation.decode import greedy_decode
from recurrent_depth.evaluation.sweeps import (
    default_max_new_tokens,
    depth_sweep,
    evaluate_accuracy,
    exit_sweep,
    perplexity_sweep,
    token_blocks,
)
from recurrent_depth.tasks import get_task

PROMPTS = ["12+34=", "7+1=", "a=3,b=a;b?", "9999+1=", "ab,bc;a>c?"]


def _naive_greedy(model, tokenizer, prompt: str, r: int, budget: int) -> list[int]:
    """Re-run the whole sequence without a cache at every step (zero initial state): the decoder's reference."""
    ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(budget):
            nxt = int(model(torch.tensor([ids]), num_steps=r, init_scale=0.0).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    return out


@pytest.mark.parametrize("r", [0, 1, 3])
def test_batched_cached_decode_equals_naive_recompute(model, tokenizer, r: int) -> None:
    out = greedy_decode(model, tokenizer, PROMPTS, num_steps=r, max_new_tokens=4, batch_size=2, init_scale=0.0)
    assert out.tokens == [_naive_greedy(model, tokenizer, p, r, 4) for p in PROMPTS]
    assert out.texts == [tokenizer.decode([t for t in row if t != tokenizer.eos_token_id], skip_special_tokens=True)
                         for row in out.tokens]
    assert all(steps == [r] * len(steps) and 1 <= len(steps) <= 4 for steps in out.token_steps)


def test_random_initial_state_is_seeded(model, tokenizer) -> None:
    a = greedy_decode(model, tokenizer, PROMPTS, num_steps=2, max_new_tokens=4, seed=5)
    b = greedy_decode(model, tokenizer, PROMPTS, num_steps=2, max_new_tokens=4, seed=5)
    assert a.tokens == b.tokens


def test_adaptive_exit_uses_fewer_steps_and_zero_threshold_never_exits(model, tokenizer) -> None:
    fixed = greedy_decode(model, tokenizer, PROMPTS, num_steps=12, max_new_tokens=4, init_scale=0.0)
    never = greedy_decode(model, tokenizer, PROMPTS, num_steps=12, max_new_tokens=4, init_scale=0.0,
                          exit_criterion="kl", exit_threshold=0.0)
    assert never.texts == fixed.texts and never.mean_steps() == 12
    eager = greedy_decode(model, tokenizer, PROMPTS, num_steps=12, max_new_tokens=4, init_scale=0.0,
                          exit_criterion="latent-diff", exit_threshold=10.0)  # fires at the first check
    assert all(s == 1 for row in eager.token_steps for s in row)


def test_bad_decode_arguments(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        greedy_decode(model, tokenizer, PROMPTS, num_steps=-1, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(model, tokenizer, PROMPTS, num_steps=1, max_new_tokens=0)
    with pytest.raises(ValueError, match="exit criterion"):
        greedy_decode(model, tokenizer, PROMPTS, num_steps=1, max_new_tokens=2, exit_criterion="bogus")


def test_accuracy_counts_exact_matches(model, tokenizer) -> None:
    preds = greedy_decode(model, tokenizer, PROMPTS, num_steps=2, max_new_tokens=4, init_scale=0.0).texts
    rows = [{"prompt": p, "answer": pred if i % 2 == 0 else pred + "x", "level": i % 2}
            for i, (p, pred) in enumerate(zip(PROMPTS, preds))]
    rec = evaluate_accuracy(model, tokenizer, rows, 2, max_new_tokens=4, init_scale=0.0, keep_predictions=True)
    assert rec["correct"] == 3 and rec["n"] == 5 and rec["accuracy"] == pytest.approx(0.6)
    assert rec["accuracy_by_level"] == {0: 1.0, 1: 0.0}
    assert rec["predictions"] == preds and rec["mean_steps"] == 2
    assert rec["mean_new_tokens"] == pytest.approx(sum(map(len, rec["token_steps"])) / 5)
    assert all(1 <= len(s) <= 4 for s in rec["token_steps"])


def test_depth_sweep_points_follow_the_requested_depths(model, tokenizer) -> None:
    rows = get_task("addition").generate(12, "test", seed=0)
    recs = depth_sweep(model, tokenizer, rows, [4, 1, 2], init_scale=0.0)
    assert [r["num_steps"] for r in recs] == [4, 1, 2]
    single = evaluate_accuracy(model, tokenizer, rows, 1, init_scale=0.0)
    assert recs[1]["accuracy"] == single["accuracy"]
    assert default_max_new_tokens(tokenizer, rows) == max(len(r["answer"]) for r in rows) + 3
    with pytest.raises(ValueError, match="steps"):
        depth_sweep(model, tokenizer, rows, [])
    with pytest.raises(ValueError, match="prompt"):
        depth_sweep(model, tokenizer, [{"prompt": 1}], [1])


def test_exit_sweep_records(model, tokenizer) -> None:
    rows = get_task("modular_chain").generate(10, "test", seed=0)
    recs = exit_sweep(model, tokenizer, rows, "kl", [0.0, 1e-2, 10.0], num_steps=8, init_scale=0.0)
    assert recs[0]["threshold"] is None and recs[0]["mean_steps"] == 8 and recs[0]["steps_saved"] == 0
    assert recs[1]["mean_steps"] == 8 and recs[1]["accuracy"] == recs[0]["accuracy"]  # threshold 0: never exits
    assert recs[3]["mean_steps"] <= recs[2]["mean_steps"] <= 8
    for rec in recs:
        assert rec["steps_saved"] == pytest.approx(1 - rec["mean_steps"] / 8)
        assert rec["accuracy_drop"] == pytest.approx(recs[0]["accuracy"] - rec["accuracy"])


def test_perplexity_matches_the_model_loss(model, tokenizer) -> None:
    texts = ["a=3,b=a;b? 12+34=46.\n" * 6, "ab,bc;a>c?bc\n" * 9]
    recs = perplexity_sweep(model, tokenizer, texts, [1, 3], seq_len=16, max_blocks=5, batch_size=2, init_scale=0.0)
    blocks = token_blocks(tokenizer, texts, 16, 5)
    assert blocks.shape == (5, 17)
    for rec in recs:
        with torch.no_grad():
            logits = model(blocks[:, :-1], num_steps=rec["num_steps"], init_scale=0.0).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
        assert rec["loss"] == pytest.approx(float(ref), rel=1e-5)
        assert rec["perplexity"] == pytest.approx(math.exp(rec["loss"]))
        assert rec["tokens"] == 5 * 16
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(tokenizer, ["ab"], 64)


def test_overlong_prompts_raise_or_truncate(model, tokenizer) -> None:
    long = "1+" * 200 + "1="  # 402 characters > block_size 256
    with pytest.raises(ValueError, match="block_size"):
        greedy_decode(model, tokenizer, [long], num_steps=1, max_new_tokens=3)
    out = greedy_decode(model, tokenizer, [long, "7+1="], num_steps=1, max_new_tokens=3, truncate=True,
                        init_scale=0.0)
    tail = greedy_decode(model, tokenizer, [long[-(256 - 3 - 1):]], num_steps=1, max_new_tokens=3, init_scale=0.0)
    assert out.tokens[0] == tail.tokens[0]


def test_teacher_forced_accuracy_equals_greedy_accuracy(trained_model, tokenizer) -> None:
    rows = get_task("modular_chain").generate(40, "test", seed=0)
    for r in (1, 3):
        out = greedy_decode(trained_model, tokenizer, [x["prompt"] for x in rows], r, 4, init_scale=0.0)
        assert sum(t[-1] == tokenizer.eos_token_id for t in out.tokens) >= 30  # it learnt to stop
        # half the answers are the model's own outputs: both methods must count those, and only those
        mixed = [{**x, "answer": p if i % 2 else x["answer"]} for i, (x, p) in enumerate(zip(rows, out.texts))]
        greedy = evaluate_accuracy(trained_model, tokenizer, mixed, r, max_new_tokens=4, init_scale=0.0)
        forced = evaluate_accuracy(trained_model, tokenizer, mixed, r, init_scale=0.0, method="teacher_forced",
                                   batch_size=7)
        assert greedy["correct"] >= 15
        assert forced["correct"] == greedy["correct"] and forced["mean_steps"] == r
    with pytest.raises(ValueError, match="method"):
        evaluate_accuracy(trained_model, tokenizer, rows, 1, method="beam")


def test_teacher_forced_predictions_and_progress(trained_model, tokenizer) -> None:
    rows = get_task("modular_chain").generate(30, "test", seed=1)
    messages: list[str] = []
    forced = evaluate_accuracy(trained_model, tokenizer, rows, 2, init_scale=0.0, method="teacher_forced",
                               batch_size=8, keep_predictions=True, progress=messages.append)
    greedy = greedy_decode(trained_model, tokenizer, [x["prompt"] for x in rows], 2, 1, init_scale=0.0)
    # one-token answers: the argmax at the first answer position is what greedy decoding writes first
    assert [p[:1] for p in forced["predictions"]] == [t[:1] for t in greedy.texts]
    assert forced["hits"] == [p == x["answer"] for p, x in zip(forced["predictions"], rows)]
    assert sum(forced["hits"]) == forced["correct"] and all(s == [2] * len(s) for s in forced["token_steps"])
    assert messages[:4] == ["r=2: 8/30 rows", "r=2: 16/30 rows", "r=2: 24/30 rows", "r=2: 30/30 rows"]
    assert messages[4].startswith(f"r=2: accuracy {forced['accuracy']:.4g} ({forced['correct']}/30")
    decoded: list[str] = []
    evaluate_accuracy(trained_model, tokenizer, rows, 1, max_new_tokens=3, init_scale=0.0, batch_size=16,
                      progress=decoded.append)
    assert decoded[:2] == ["r=1: 16/30 rows decoded", "r=1: 30/30 rows decoded"] and len(decoded) == 3


def test_library_defaults_are_the_inference_defaults(model, tokenizer) -> None:
    """Without init_scale, the evaluation functions use `inference.defaults.INIT_SCALE` (0: a zero initial state),
    as `generate()` and the CLI verbs do, so the seed cannot change a result (with the old 1.0 it did)."""
    from recurrent_depth.evaluation.sweeps import teacher_forced_hits

    texts = ["a=3,b=a;b? 12+34=46.\n" * 6]
    ppl = [perplexity_sweep(model, tokenizer, texts, [2], seq_len=16, max_blocks=3, seed=s)[0]["loss"] for s in (1, 2)]
    zero = perplexity_sweep(model, tokenizer, texts, [2], seq_len=16, max_blocks=3, init_scale=0.0)[0]["loss"]
    assert ppl[0] == ppl[1] == zero
    rows = [{"prompt": p, "answer": "1"} for p in PROMPTS]
    hits = [teacher_forced_hits(model, tokenizer, rows, 2, seed=s)[1] for s in (1, 2)]
    assert hits[0] == hits[1] == teacher_forced_hits(model, tokenizer, rows, 2, init_scale=0.0)[1]
    out = [greedy_decode(model, tokenizer, PROMPTS, num_steps=2, max_new_tokens=4, seed=s).tokens for s in (1, 2)]
    assert out[0] == out[1] == greedy_decode(model, tokenizer, PROMPTS, 2, 4, init_scale=0.0).tokens
