"""Metric against compute: depth sweeps (accuracy or perplexity against the recurrence depth r) and exit-threshold
sweeps (accuracy against the mean number of steps an adaptive exit uses).

    recs = depth_sweep(model, tok, rows, num_steps=[1, 2, 4, 8, 16])         # exact-match accuracy per r
    recs = perplexity_sweep(model, tok, texts, num_steps=[1, 4, 8, 32])      # validation perplexity per r
    recs = exit_sweep(model, tok, rows, "kl", [1e-2, 1e-3, 1e-4], num_steps=32)  # cap 32, per threshold

Every function returns a list of flat-ish dicts (one per point) that `records.write_records` saves as JSON and CSV.
Rows are {"prompt", "answer"} dicts (an optional int "level" adds per-level accuracy); the scorer defaults to exact
match of the stripped strings (pass `task.score` for a task's chain-of-thought-aware scoring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recurrent_depth.evaluation.decode import greedy_decode
from recurrent_depth.inference.defaults import INIT_SCALE

Scorer = Callable[[str, str], bool]
OnProgress = Callable[[str], None]  # receives one-line progress messages (the CLI prints them on stderr)


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def _check_num_steps(num_steps: Sequence[int]) -> list[int]:
    out = list(num_steps)
    if not out or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in out):
        raise ValueError(f"num_steps must be a non-empty list of non-negative integers, got {num_steps!r}")
    return out


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise ValueError("no prompt/answer rows to evaluate")
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"row {i} must hold string `prompt` and `answer`, got {row!r:.120}")


def default_max_new_tokens(tokenizer, rows: Sequence[dict], margin: int = 2) -> int:
    """Budget for greedy decoding: the longest reference answer in tokens, plus <eos>, plus `margin`."""
    longest = max(len(ids) for ids in tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"])
    return longest + 1 + margin


@torch.no_grad()
def teacher_forced_hits(model, tokenizer, rows: Sequence[dict], num_steps: int, batch_size: int = 64,
                        add_bos: bool = True, init_scale: float = INIT_SCALE, seed: int = 0,
                        progress: OnProgress | None = None) -> tuple[list[bool], list[list[int]]]:
    """Per row: does greedy decoding reproduce the answer and then stop? Computed in one teacher-forced forward.

    Greedy decoding emits `answer <eos>` exactly when, given the true prefix, the argmax at every answer position
    is the next answer token and then <eos>; so this equals exact-match greedy accuracy at fixed depth (up to float
    rounding and the draw of the initial state) at a fraction of the cost: one pass per row, no cache. Exact for
    per-character tokenizers; with a BPE, greedy output that spells the answer with other tokens counts as a miss.
    Also returns, per row, the argmax token at each answer position (given the true prefix), cut after the first
    <eos>: for a one-token answer, exactly what greedy decoding writes first. progress: told after every batch."""
    device = model.lm_head.weight.device
    prefix = [tokenizer.bos_token_id] if add_bos else []
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    seqs = [(prefix + p + a + [tokenizer.eos_token_id], len(prefix) + len(p)) for p, a in zip(prompts, answers)]
    gen = torch.Generator(device=device).manual_seed(seed)
    hits: list[bool] = []
    argmax: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk) - 1
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            for i, (seq, _) in enumerate(chunk):  # right padding: causal attention keeps it out of real positions
                ids[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            s0 = model.transformer.initial_state(torch.zeros(*ids.shape, model.config.n_embd, device=device),
                                                 init_scale, gen)
            pred = model(ids.to(device), num_steps=num_steps, input_states=s0).logits.argmax(-1).cpu()
            for i, (seq, n_prompt) in enumerate(chunk):
                target = torch.tensor(seq[n_prompt:])  # answer tokens and <eos>
                got = pred[i, n_prompt - 1: len(seq) - 1]
                hits.append(bool((got == target).all()))
                argmax.append(_cut_after(got.tolist(), tokenizer.eos_token_id))
            if progress is not None:
                progress(f"r={num_steps}: {len(hits)}/{len(seqs)} rows")
    finally:
        model.train(was_training)
    return hits, argmax


def _cut_after(tokens: list[int], eos_id: int) -> list[int]:
    """`tokens` up to and with the first `eos_id`."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def evaluate_accuracy(model, tokenizer, rows: Sequence[dict], num_steps: int, scorer: Scorer = exact_match,
                      exit_criterion=None, max_new_tokens: int | None = None, batch_size: int = 64,
                      add_bos: bool = True, init_scale: float = INIT_SCALE, seed: int = 0,
                      keep_predictions: bool = False, method: str = "greedy", progress: OnProgress | None = None,
                      **engine: Any) -> dict[str, Any]:
    """Greedy exact-match accuracy on `rows` at depth `num_steps` (the cap, with an exit criterion).

    method: "greedy" decodes (any scorer, exit criteria); "teacher_forced" checks exact token match in one forward
    per row (`teacher_forced_hits`: same accuracy at fixed depth, several times faster; the scorer is not used).
    engine: keywords for the inference engine's `generate` (kv_sharing, min_steps, warm_start), greedy only.
    progress: called with one-line messages (after every batch, and the point's result), e.g. to print to stderr.
    Returns num_steps, accuracy, correct, n, mean_steps (per generated token), mean_new_tokens (generated tokens per
    row, <eos> included: the context a chain of thought spends), seconds, and accuracy_by_level (when rows carry a
    `level`); with keep_predictions, also predictions (list of str; teacher-forced: the argmax at each answer
    position), hits (list of bool) and token_steps (steps per generated token).
    The decoding budget defaults to the longest reference answer + 3 tokens, so evaluate a chain-of-thought model
    on chain-of-thought rows (`task.generate(..., cot=True)`) or pass max_new_tokens."""
    _check_rows(rows)
    start = time.perf_counter()
    if method == "teacher_forced":
        if exit_criterion is not None or engine:
            raise ValueError("method='teacher_forced' runs fixed depth without an exit or engine keywords; "
                             "use 'greedy'")
        hits, tokens = teacher_forced_hits(model, tokenizer, rows, num_steps, batch_size, add_bos, init_scale, seed,
                                           progress)
        eos = tokenizer.eos_token_id
        texts = [tokenizer.decode(t[:-1] if t and t[-1] == eos else t, skip_special_tokens=True) for t in tokens]
        token_steps = [[num_steps] * len(t) for t in tokens]
        mean_steps, new_tokens = float(num_steps), None
    elif method == "greedy":
        budget = max_new_tokens or default_max_new_tokens(tokenizer, rows)
        out = greedy_decode(model, tokenizer, [r["prompt"] for r in rows], num_steps, budget, exit_criterion,
                            batch_size=batch_size, add_bos=add_bos, init_scale=init_scale, seed=seed,
                            progress=progress, **engine)
        hits = [bool(scorer(pred, r["answer"])) for pred, r in zip(out.texts, rows)]
        texts, token_steps = out.texts, out.token_steps
        mean_steps, new_tokens = out.mean_steps(), sum(map(len, out.tokens)) / len(out.tokens)
    else:
        raise ValueError(f"unknown accuracy method {method!r}; choose 'greedy' or 'teacher_forced'")
    rec: dict[str, Any] = {"num_steps": num_steps, "accuracy": sum(hits) / len(hits), "correct": sum(hits),
                           "n": len(hits), "mean_steps": mean_steps, "mean_new_tokens": new_tokens,
                           "method": method, "seconds": round(time.perf_counter() - start, 3)}
    if all(isinstance(r.get("level"), int) for r in rows):
        by: dict[int, list[bool]] = {}
        for hit, r in zip(hits, rows):
            by.setdefault(r["level"], []).append(hit)
        rec["accuracy_by_level"] = {lvl: sum(v) / len(v) for lvl, v in sorted(by.items())}
    if progress is not None:
        progress(f"r={num_steps}: accuracy {rec['accuracy']:.4g} ({rec['correct']}/{rec['n']}, {method}) "
                 f"in {rec['seconds']:.1f} s")
    if keep_predictions:
        rec["predictions"] = texts
        rec["hits"] = hits
        rec["token_steps"] = token_steps
    return rec


def depth_sweep(model, tokenizer, rows: Sequence[dict], num_steps: Sequence[int],
                **kwargs: Any) -> list[dict[str, Any]]:
    """`evaluate_accuracy` at every recurrence count in `num_steps` (fixed depth, no exit); kwargs as for
    evaluate_accuracy."""
    if kwargs.get("exit_criterion") is not None:
        raise ValueError("depth_sweep runs fixed depths; use exit_sweep for an exit criterion")
    return [evaluate_accuracy(model, tokenizer, rows, r, **kwargs) for r in _check_num_steps(num_steps)]


def exit_sweep(model, tokenizer, rows: Sequence[dict], criterion: str, thresholds: Sequence[float],
               num_steps: int, **kwargs: Any) -> list[dict[str, Any]]:
    """Accuracy and mean steps per token for an adaptive exit criterion at each threshold, capped at `num_steps`
    recurrences per token.

    The first record is the fixed-depth reference at num_steps (threshold None); each record carries
    `steps_saved` (1 - mean_steps / num_steps) and `accuracy_drop` (reference accuracy minus its accuracy)."""
    from recurrent_depth.inference.exit import make_exit_criterion

    if not thresholds:
        raise ValueError("exit_sweep needs at least one threshold")
    base = evaluate_accuracy(model, tokenizer, rows, num_steps, **kwargs)
    base.update(criterion="none", threshold=None)
    records = [base]
    for thr in thresholds:
        crit = make_exit_criterion(criterion, thr)
        rec = evaluate_accuracy(model, tokenizer, rows, num_steps, exit_criterion=crit, **kwargs)
        rec.update(criterion=criterion, threshold=thr)
        records.append(rec)
    for rec in records:
        rec["steps_saved"] = 1 - rec["mean_steps"] / num_steps if num_steps else 0.0
        rec["accuracy_drop"] = base["accuracy"] - rec["accuracy"]
    return records


def token_blocks(tokenizer, texts: Sequence[str], seq_len: int, max_blocks: int = 0) -> torch.Tensor:
    """Documents joined by <eos> into one stream, cut into non-overlapping (N, seq_len + 1) blocks (last dropped)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    ids: list[int] = []
    for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // (seq_len + 1)
    if max_blocks:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one block of seq_len + 1 = {seq_len + 1}")
    return torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


@torch.no_grad()
def perplexity_sweep(model, tokenizer, texts: Sequence[str], num_steps: Sequence[int], seq_len: int = 128,
                     max_blocks: int = 64, batch_size: int = 16, init_scale: float = INIT_SCALE,
                     seed: int = 0, progress: OnProgress | None = None) -> list[dict[str, Any]]:
    """Mean next-token loss and perplexity on `texts` at every recurrence count in `num_steps`.

    The same blocks and the same seeded initial states are used at every depth, so the points differ only in r.
    progress: told one line per depth."""
    depths = _check_num_steps(num_steps)
    blocks = token_blocks(tokenizer, texts, seq_len, max_blocks)
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    records = []
    try:
        for r in depths:
            start = time.perf_counter()
            gen = torch.Generator(device=device).manual_seed(seed)
            total, count = 0.0, 0
            for i in range(0, len(blocks), batch_size):
                chunk = blocks[i:i + batch_size].to(device)
                inputs, labels = chunk[:, :-1], chunk[:, 1:]
                s0 = model.transformer.initial_state(
                    torch.zeros(*inputs.shape, model.config.n_embd, device=device), init_scale, gen)
                logits = model(inputs, num_steps=r, input_states=s0).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                         reduction="sum")
                total, count = total + float(loss), count + labels.numel()
            mean = total / count
            records.append({"num_steps": r, "loss": mean, "perplexity": math.exp(mean), "tokens": count,
                            "seconds": round(time.perf_counter() - start, 3)})
            if progress is not None:
                progress(f"r={r}: perplexity {records[-1]['perplexity']:.4g} over {count} tokens "
                         f"in {records[-1]['seconds']:.1f} s")
    finally:
        model.train(was_training)
    return records
