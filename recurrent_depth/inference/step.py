"""One forward of T tokens for a subset of a batch's rows, with per-row adaptive exit: the static-batch decoders' step.

`generate()` (static batches, and with it rdepth's evaluation sweeps) and `generate_speculative()` (drafts and
verification) call `forward_rows(model, ids, cache, rows=..., ...)`; the server's continuous batching is the other
loop, `recurrent_depth.inference.rows.RowEngine` (one recurrence step per engine step over the paged `RowKVCache`),
which shares this module's `head_logits`, the sharing policies' `fill_exited` and the fused op. `forward_rows` runs
one forward (prefill of T tokens or one decode token) for the rows `rows` held in a shared `KVCache`. Rows that exit
stop costing compute; what their KV entries at deeper steps hold is the sharing policy's choice
(`SharingPolicy.fill_exited`: holes under `full`, the latest step under `latest`, whatever the cyclic slot holds
under an integer k). It returns the next-token logits, the steps each row used and its final state; it advances the
cache by T positions (`cache.commit`), so every call must feed the same number of tokens T to the rows it names, and
rows it does not name get holes at those positions. `attention_mask` covers those rows' whole cache (0 at positions
where a row has no token).

vocab_limit: vocabulary rows at or beyond it (an embedding padded past the tokenizer) get probability 0, for the
exit criteria and the sampler alike (`recurrent_depth.inference.sampling.ban_beyond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference import fused
from recurrent_depth.inference.cache import KVCache
from recurrent_depth.inference.exit import ExitCriterion, NoExit
from recurrent_depth.inference.sampling import ban_beyond
from recurrent_depth.model.layers import AttentionContext


@dataclass
class GenerateOutput:
    """sequences (B, prompt + new); steps (B, new) recurrences per generated token; kv_cache_bytes (peak)."""

    sequences: Tensor
    steps: Tensor
    kv_cache_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowsResult:
    """What one `forward_rows` call gives, for the R rows it ran.

    logits: (R, V) fp32 next-token logits (last position), or (R, T, V) with all_logits; steps: (R,) recurrences
    used; state: (R, T, d) final raw core output; latents: (R, T, d) ln_f(state)."""

    logits: Tensor
    steps: Tensor
    state: Tensor
    latents: Tensor


def _sub_context(ctx: AttentionContext, idx: Tensor) -> AttentionContext:
    rope = ctx.rope if ctx.rope.shape[0] == 1 else ctx.rope[idx]
    return AttentionContext(rope=rope, mask=None if ctx.mask is None else ctx.mask[idx], cache=ctx.cache)


def head_logits(model: Any, hidden: Tensor, all_logits: bool, vocab_limit: int | None) -> Tensor:
    """fp32 next-token logits of the coda's output hidden (R, T, d): (R, V) at the last position, or (R, T, V) with
    all_logits; vocabulary rows at or beyond vocab_limit banned. Every decoder's head (`forward_rows`, `RowEngine`)."""
    last = hidden if all_logits else hidden[:, -1]
    logits = fused.head(model, last)  # a bf16 CPU decode's head on the fused op's kernel (None: the eager head)
    if logits is None:
        logits = model.lm_head(last).float()  # fp32 for softmax
    return ban_beyond(logits, vocab_limit)


def forward_rows(model: Any, input_ids: Tensor, cache: KVCache, *, num_steps: int, rows: Tensor | None = None,
                 attention_mask: Tensor | None = None, criterion: ExitCriterion | None = None, min_steps: int = 0,
                 initial_state: Tensor | None = None, init_scale: float = 0.0,
                 generator: torch.Generator | None = None, all_logits: bool = False,
                 vocab_limit: int | None = None) -> RowsResult:
    """One forward of T tokens for rows `rows` (None: all rows of the cache) with per-row adaptive exit.

    input_ids: (R, T); attention_mask: (R, cache.seq_len + T) with 0 at padding (None: no padding);
    criterion: exit criterion (None / NoExit: fixed depth num_steps); min_steps: recurrences before the first
    exit check (at least 1); initial_state: s0 (R, T, d) (warm start), else drawn with init_scale (0: zeros).
    Exits are decided per row over the whole T tokens (the reference's prefill behaviour). vocab_limit: vocabulary
    rows at or beyond it get probability 0 (module docstring; None: none banned).
    """
    t = model.transformer
    R, T = input_ids.shape
    saved_rows, cache.rows = cache.rows, rows
    try:
        ctx = t.attention_context(input_ids, attention_mask, None, cache, cache.seq_len)
        e = t.embed(input_ids, ctx)
        s = initial_state.to(e.dtype) if initial_state is not None else t.initial_state(e, init_scale, generator)
        if criterion is None or isinstance(criterion, NoExit) or num_steps == 0:
            s = t.core_steps(s, e, 0, num_steps, ctx)
            hidden, latents = t.decode(s, ctx)
            steps = torch.full((R,), num_steps, dtype=torch.long, device=e.device)
            result = RowsResult(head_logits(model, hidden, all_logits, vocab_limit), steps, s, latents)
        else:
            if all_logits:
                raise ValueError("all_logits is only available at fixed depth (no exit criterion)")
            result = _adaptive(model, e, s, ctx, cache, rows, attention_mask, criterion, num_steps, min_steps,
                                vocab_limit)
    finally:
        cache.rows = saved_rows
    cache.commit(T)
    return result


def _adaptive(model: Any, e: Tensor, s: Tensor, ctx: AttentionContext, cache: KVCache, rows: Tensor | None,
              attention_mask: Tensor | None, criterion: ExitCriterion, num_steps: int, min_steps: int,
              vocab_limit: int | None) -> RowsResult:
    """The recurrence with exit checks after each step; rows that exit leave the active set."""
    t = model.transformer
    R, T, _ = e.shape
    device = e.device
    global_rows = rows if rows is not None else torch.arange(R, device=device)
    valid = attention_mask[:, -T:].bool() if attention_mask is not None else None
    mem = criterion.init(s, model.config.vocab_size)
    steps = torch.full((R,), num_steps, dtype=torch.long, device=device)
    out_logits = torch.empty(R, model.config.vocab_size, device=device)
    out_state = torch.empty_like(s)
    out_latents = torch.empty_like(s)
    act = torch.arange(R, device=device)  # local indices of the rows still iterating
    a_ctx, a_e, a_s, a_valid = ctx, e, s, valid
    first_check = max(min_steps, 1)
    logits = None
    n = 0
    for i in range(num_steps):
        n = i + 1
        a_s = t.core_step(a_s, a_e, i, a_ctx)
        logits = None
        if n < first_check:
            continue
        if criterion.needs_logits:
            hidden, latents = t.decode(a_s, a_ctx)
            logits = head_logits(model, hidden, False, vocab_limit)
        exit_now, mem_a, _ = criterion.check(mem[act], a_s, logits, a_valid)
        mem[act] = mem_a
        if n == num_steps:
            break
        exiting = exit_now.nonzero().squeeze(1)
        if exiting.numel() == 0:
            continue
        done = act[exiting]
        if logits is None:  # latent criteria: decode the exiting rows now (writes their coda KV entries)
            cache.rows = global_rows[done]
            hidden, latents = t.decode(a_s[exiting], _sub_context(ctx, done))
            out_logits[done] = head_logits(model, hidden, False, vocab_limit)
        else:
            out_logits[done] = logits[exiting]
            latents = latents[exiting]
        out_latents[done] = latents
        out_state[done] = a_s[exiting]
        steps[done] = n
        if cache.policy.fills_exited:
            cache.policy.fill_exited(cache, global_rows[done], i, num_steps, len(t.core_block), T)
        keep = (~exit_now).nonzero().squeeze(1)
        if keep.numel() == 0:
            return RowsResult(out_logits, steps, out_state, out_latents)
        act, a_s, a_e = act[keep], a_s[keep], a_e[keep]
        a_valid = None if a_valid is None else a_valid[keep]
        a_ctx = _sub_context(ctx, act)
        cache.rows = global_rows[act]
    # rows that ran the full depth (or every row, if num_steps < first_check)
    if logits is None:
        hidden, latents = t.decode(a_s, a_ctx)
        logits = head_logits(model, hidden, False, vocab_limit)
    out_logits[act], out_state[act], out_latents[act] = logits, a_s, latents
    return RowsResult(out_logits, steps, out_state, out_latents)
