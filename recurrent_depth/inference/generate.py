"""Batched generation with left padding, per-row adaptive exit, KV-cache sharing, warm start and speculative drafts.

    from recurrent_depth.inference.generate import generate
    out = generate(model, ids, attention_mask, max_new_tokens=64, num_steps=32, exit_criterion="kl",
                   exit_threshold=5e-4, kv_sharing="latest")
    out.sequences   # (B, prompt + new) token ids; rows that stopped at EOS are padded with the (first) EOS id
    out.steps       # (B, new) recurrences each generated token used (0 after a row stopped)
    out.kv_cache_bytes  # peak bytes of keys and values held

Building block for schedulers: `forward_rows(model, ids, cache, rows=..., ...)` runs one forward (prefill of T
tokens or one decode token) for a subset of the batch rows held in a shared `KVCache`, with per-row adaptive exit.
Rows that exit stop costing compute; their KV entries at deeper steps are holes (policy `full`), copied from their
latest step (`latest`) or whatever the cyclic slot holds (integer k). It returns the next-token logits, the steps each
row used and its final state; it advances the cache by T positions (`cache.commit`), so every call must feed the
same number of tokens T to the rows it names, and rows it does not name get holes at those positions. A continuous
batching server calls it with `rows` = the rows that are decoding and `attention_mask` covering those rows' whole
cache (0 at positions where a row has no token).

A padded batch gives, row by row, what each row gives alone: positions count real tokens only and padding is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference.cache import KVCache, SharingPolicy, make_kv_policy
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, check_init_scale, resolve_kv_sharing
from recurrent_depth.inference.exit import ExitCriterion, NoExit, make_exit_criterion
from recurrent_depth.inference.sampling import Sampler
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


def _head(model: Any, hidden: Tensor, all_logits: bool) -> Tensor:
    return model.lm_head(hidden if all_logits else hidden[:, -1]).float()  # fp32 for softmax


def forward_rows(model: Any, input_ids: Tensor, cache: KVCache, *, num_steps: int, rows: Tensor | None = None,
                 attention_mask: Tensor | None = None, criterion: ExitCriterion | None = None, min_steps: int = 0,
                 initial_state: Tensor | None = None, init_scale: float = 0.0,
                 generator: torch.Generator | None = None, all_logits: bool = False) -> RowsResult:
    """One forward of T tokens for rows `rows` (None: all rows of the cache) with per-row adaptive exit.

    input_ids: (R, T); attention_mask: (R, cache.seq_len + T) with 0 at padding (None: no padding);
    criterion: exit criterion (None / NoExit: fixed depth num_steps); min_steps: recurrences before the first
    exit check (at least 1); initial_state: s0 (R, T, d) (warm start), else drawn with init_scale (0: zeros).
    Exits are decided per row over the whole T tokens (the reference's prefill behaviour).
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
            result = RowsResult(_head(model, hidden, all_logits), steps, s, latents)
        else:
            if all_logits:
                raise ValueError("all_logits is only available at fixed depth (no exit criterion)")
            result = _adaptive(model, e, s, ctx, cache, rows, attention_mask, criterion, num_steps, min_steps)
    finally:
        cache.rows = saved_rows
    cache.commit(T)
    return result


def _adaptive(model: Any, e: Tensor, s: Tensor, ctx: AttentionContext, cache: KVCache, rows: Tensor | None,
              attention_mask: Tensor | None, criterion: ExitCriterion, num_steps: int, min_steps: int) -> RowsResult:
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
            logits = _head(model, hidden, False)
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
            out_logits[done] = _head(model, hidden, False)
        else:
            out_logits[done] = logits[exiting]
            latents = latents[exiting]
        out_latents[done] = latents
        out_state[done] = a_s[exiting]
        steps[done] = n
        if cache.policy.fills_exited:
            cache.fill_latest(global_rows[done], i, num_steps, len(t.core_block), T)
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
        logits = _head(model, hidden, False)
    out_logits[act], out_state[act], out_latents[act] = logits, a_s, latents
    return RowsResult(out_logits, steps, out_state, out_latents)


def _check_common(model: Any, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                  num_steps: int) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got {getattr(input_ids, 'shape', None)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    V = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        raise ValueError(f"input_ids must lie in [0, {V}) (the vocabulary)")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                             f"{tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("attention_mask: padding must be on the left (every row's last token must be real)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an integer >= 0 (recurrences per token), got {num_steps!r}")
    if input_ids.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"block_size {model.config.block_size}")


def _eos_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


@torch.inference_mode()
def generate(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             num_steps: int, exit_criterion: str | ExitCriterion | None = None, exit_threshold: float | None = None,
             min_steps: int = 0, warm_start: bool | str = False,
             kv_sharing: str | int | SharingPolicy = KV_SHARING_AUTO,
             draft_steps: int | None = None, lookahead: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, generator: torch.Generator | None = None, init_scale: float = INIT_SCALE,
             eos_token_id: int | Sequence[int] | None = None, streamer: Any = None,
             exit_in_prefill: bool = True) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each row of a (left-padded) batch.

    num_steps: recurrences per token (the maximum, with an exit criterion).
    exit_criterion / exit_threshold: per-token, per-row early exit (`recurrent_depth.inference.exit`: kl, minp-kl,
        entropy-diff, latent-diff, cosine, argmax-stability, none; threshold None = the criterion's default).
    min_steps: recurrences every token runs before its first exit check.
    warm_start: True (or "latent"): each new token starts from the previous token's final normalised state
        ln_f(s) (latent chain of thought); "raw": from the raw core output (the reference's adaptive path).
    kv_sharing: "auto" (default: "latest" with an exit criterion, else "full"; `recurrent_depth.inference.defaults`),
        "full", "latest" or an integer k (see `recurrent_depth.inference.cache`). Under "full" with an exit criterion
        a token that exited early is invisible at deeper recurrence steps.
    draft_steps / lookahead: self-speculative decoding (greedy): draft `lookahead` tokens with `draft_steps`
        recurrences, verify them in one pass at `num_steps` (`recurrent_depth.inference.speculative`).
    do_sample, temperature, top_k, top_p, min_p, generator: sampling (`Sampler`); greedy when do_sample is False.
    init_scale: scale of the random initial state, finite and >= 0 (default 0: zeros, deterministic).
    eos_token_id: a row stops after emitting one of these; later positions hold the first EOS id.
    streamer: an object with put(tokens) and end() (transformers' TextStreamer works, batch 1); it first receives
        the prompt, then each step's (B, 1) new tokens; a streamer with a `put_steps` method also receives each
        step's (B, 1) recurrence counts just before the tokens.
    exit_in_prefill: whether the prompt's forward (the first new token) may exit early (the reference's default:
        yes; its `do_not_exit_in_prefill=True` is False here).
    """
    _check_common(model, input_ids, attention_mask, max_new_tokens, num_steps)
    init_scale = check_init_scale(init_scale)
    policy = make_kv_policy(resolve_kv_sharing(kv_sharing, exit_criterion))
    if exit_criterion is None and exit_threshold is not None:
        raise ValueError("exit_threshold was given without an exit_criterion")
    criterion = None if exit_criterion is None else make_exit_criterion(exit_criterion, exit_threshold)
    if isinstance(criterion, NoExit):
        criterion = None
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be an integer >= 0, got {min_steps!r}")
    if warm_start not in (False, True, "latent", "raw"):
        raise ValueError(f"warm_start must be False, True, 'latent' or 'raw', got {warm_start!r}")
    sampler = Sampler(do_sample, temperature, top_k, top_p, min_p, generator)
    eos = _eos_ids(eos_token_id, input_ids.device)
    if draft_steps is not None or lookahead is not None:
        from recurrent_depth.inference.speculative import generate_speculative

        if criterion is not None or warm_start or do_sample:
            raise ValueError("speculative decoding (draft_steps / lookahead) is greedy at fixed depth: it cannot be "
                             "combined with an exit criterion, warm_start or do_sample")
        return generate_speculative(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    num_steps=num_steps, draft_steps=draft_steps, lookahead=lookahead,
                                    kv_sharing=policy, init_scale=init_scale, eos=eos, streamer=streamer)
    B, T0 = input_ids.shape
    device = input_ids.device
    cache = KVCache(policy, max_length=T0 + max_new_tokens, batch_size=B)
    full_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        full_mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.long, device=device)
        full_mask[:, :T0] = attention_mask
    new_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    steps = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows: Tensor | None = None  # rows still generating (None: all)
    ids, state0 = input_ids, None
    for pos in range(max_new_tokens):
        mask = None if full_mask is None else full_mask[:, : cache.seq_len + ids.shape[1]]
        if rows is not None and mask is not None:
            mask = mask[rows]
        res = forward_rows(model, ids, cache, num_steps=num_steps, rows=rows, attention_mask=mask,
                           criterion=criterion if pos > 0 or exit_in_prefill else None, min_steps=min_steps,
                           initial_state=state0, init_scale=init_scale,
                           generator=generator)
        tok = sampler(res.logits)  # (R,)
        idx = rows if rows is not None else slice(None)
        new_tokens[idx, pos] = tok
        steps[idx, pos] = res.steps
        if streamer is not None:
            if hasattr(streamer, "put_steps"):
                streamer.put_steps(steps[:, pos: pos + 1].cpu())
            streamer.put(new_tokens[:, pos: pos + 1].cpu())
        if warm_start:
            state0 = (res.state if warm_start == "raw" else res.latents)[:, -1:]
        ids = tok[:, None]
        if eos is not None:
            hit = torch.isin(tok, eos)
            if bool(hit.any()):
                live = rows if rows is not None else torch.arange(B, device=device)
                finished[live[hit]] = True
                keep = (~hit).nonzero().squeeze(1)
                if keep.numel() == 0:
                    new_tokens[:, pos + 1:] = eos[0]
                    break
                rows, ids = live[keep], ids[keep]
                if state0 is not None:
                    state0 = state0[keep]
                new_tokens[finished, pos + 1:] = eos[0]
    if streamer is not None:
        streamer.end()
    return GenerateOutput(torch.cat([input_ids, new_tokens], dim=1), steps, cache.peak_bytes,
                          {"core_kv_bytes": cache.core_nbytes()})
