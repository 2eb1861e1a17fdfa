"""Batched greedy decoding for evaluation: strings in, strings and per-token recurrence steps out, over the
inference engine (`recurrent_depth.inference.generate.generate`: KV cache, per-row adaptive exit).

Each prompt is encoded as <bos> prompt (the layout training uses: <bos> prompt answer <eos>) and decoded greedily
until <eos> or `max_new_tokens`; stop strings cut the text afterwards. Prompts are sorted by length and batched
(left-padded with an attention mask), and results come back in the caller's order.

With an exit criterion (any name or object `recurrent_depth.inference.exit` knows), every forward, the prefill that
predicts the first answer token included, runs at most `num_steps` recurrences and each row stops when its
criterion fires; `token_steps` reports the recurrences each generated token used.

    out = greedy_decode(model, tok, ["12+34="], num_steps=8, max_new_tokens=4)
    out.texts, out.token_steps         # ["46"], [[8, 8, 8]]  (two digits and <eos>)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recurrent_depth.inference.defaults import INIT_SCALE


@dataclass
class DecodeOutput:
    """texts: the decoded continuations (eos and stop strings cut); token_steps: recurrence steps per generated token
    (eos included); tokens: the generated ids (eos included)."""

    texts: list[str]
    token_steps: list[list[int]]
    tokens: list[list[int]]

    def mean_steps(self) -> float:
        """Mean recurrence steps per generated token, over every token of every row."""
        flat = [s for row in self.token_steps for s in row]
        return sum(flat) / len(flat) if flat else 0.0


def _decode_batch(model, seqs: list[list[int]], pad_id: int, eos_id: int,
                  **engine: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Engine generation for one batch of token-id lists: (new tokens up to and with eos, steps per token)."""
    from recurrent_depth.data.tokenizer import left_pad
    from recurrent_depth.inference.generate import generate

    device = model.lm_head.weight.device
    ids, mask = left_pad(seqs, pad_id)
    L = ids.shape[1]
    out = generate(model, ids.to(device), mask.to(device), eos_token_id=eos_id, **engine)
    new = out.sequences[:, L:].tolist()
    steps = out.steps.tolist()
    tokens, used = [], []
    for row, st in zip(new, steps):
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        tokens.append(row[:n])
        used.append(st[:n])
    return tokens, used


def greedy_decode(model, tokenizer, prompts: Sequence[str], num_steps: int, max_new_tokens: int,
                  exit_criterion=None, exit_threshold: float | None = None, batch_size: int = 64,
                  add_bos: bool = True, stop: Sequence[str] = (), init_scale: float = INIT_SCALE, seed: int = 0,
                  truncate: bool = False, progress: Callable[[str], None] | None = None,
                  **engine: Any) -> DecodeOutput:
    """Greedy continuations of `prompts` at recurrence depth `num_steps` (the maximum, with an exit criterion).

    exit_criterion / exit_threshold: a criterion name (any key of `inference.exit.EXIT_CRITERIA`) and threshold, or
    an ExitCriterion. init_scale: scale of the random initial latent state (default `inference.defaults.INIT_SCALE`,
    0: zeros; 1.0 draws as in training); draws come from a generator seeded with `seed`, so a call is reproducible.
    stop: strings that end a continuation (cut from the text). truncate: cut prompts from the left (after <bos>) to
    fit block_size with the budget, instead of raising. progress: called with a one-line message after every batch.
    engine: further keywords for the engine's `generate` (min_steps, kv_sharing, warm_start, ...).
    kv_sharing defaults to the engine's "auto" (`recurrent_depth.inference.defaults`): "latest" under an exit (a
    token that exited early is read at deeper recurrence steps from its last computed step; "full" leaves holes
    there, which cost the `tiny` addition model half its accuracy under a KL exit, 0.62 -> 0.29 at threshold 1e-3),
    "full" at fixed depth, where the two give the same tokens.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prefix = [tokenizer.bos_token_id] if add_bos else []
    encoded = [prefix + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    if any(not ids for ids in encoded):
        raise ValueError("an empty prompt cannot be decoded without add_bos")
    room = model.config.block_size - max_new_tokens
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > room]
    if too_long and (not truncate or room <= len(prefix)):
        raise ValueError(f"prompt {too_long[0]} has {len(encoded[too_long[0]])} tokens; with max_new_tokens="
                         f"{max_new_tokens} it exceeds block_size {model.config.block_size}")
    for i in too_long:
        encoded[i] = prefix + encoded[i][len(encoded[i]) - room + len(prefix):]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    engine.update(max_new_tokens=max_new_tokens, num_steps=num_steps, exit_criterion=exit_criterion,
                  exit_threshold=exit_threshold, init_scale=init_scale, generator=generator)
    was_training = model.training
    model.eval()
    tokens: list[list[int]] = [[] for _ in encoded]
    steps: list[list[int]] = [[] for _ in encoded]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out_t, out_s = _decode_batch(model, [encoded[i] for i in chunk], pad_id, eos_id, **engine)
            for i, tk, st in zip(chunk, out_t, out_s):
                tokens[i], steps[i] = tk, st
            if progress is not None:
                progress(f"r={num_steps}: {min(start + batch_size, len(order))}/{len(order)} rows decoded")
    finally:
        model.train(was_training)
    texts = []
    for row in tokens:
        body = row[:-1] if row and row[-1] == eos_id else row
        text = tokenizer.decode(body, skip_special_tokens=True)
        for s in stop:
            if s:
                text = text.split(s, 1)[0]
        texts.append(text)
    return DecodeOutput(texts, steps, tokens)
