"""Batched generation with left padding, per-row adaptive exit, KV-cache sharing, warm start and speculative drafts.

    from recurrent_depth.inference.generate import generate
    out = generate(model, ids, attention_mask, max_new_tokens=64, num_steps=32, exit_criterion="kl",
                   exit_threshold=5e-4, kv_sharing="latest")
    out.sequences   # (B, prompt + new) token ids; rows that stopped at EOS are padded with the (first) EOS id
    out.steps       # (B, new) recurrences each generated token used (0 after a row stopped)
    out.kv_cache_bytes  # peak bytes of keys and values held

Every forward is `recurrent_depth.inference.step.forward_rows` (one forward of T tokens for a subset of the rows, with
per-row adaptive exit), which speculative decoding drives too; the depth keywords are validated once, as a
`recurrent_depth.inference.params.DepthParams`.

A padded batch gives, row by row, what each row gives alone: positions count real tokens only and padding is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference.cache import KVCache, SharingPolicy
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO
from recurrent_depth.inference.exit import ExitCriterion, NoExit
from recurrent_depth.inference.params import DepthParams
from recurrent_depth.inference.sampling import Sampler
from recurrent_depth.inference.speculative import generate_speculative
from recurrent_depth.inference.step import GenerateOutput, RowsResult, forward_rows

__all__ = ["GenerateOutput", "RowsResult", "forward_rows", "generate"]


def _check_common(model: Any, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int) -> None:
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
             exit_in_prefill: bool = True, vocab_limit: int | None = None) -> GenerateOutput:
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
    vocab_limit: never produce (nor let exit criteria weigh) vocabulary rows at or beyond it: pass the tokenizer's
        size when the embedding is padded past it (the server does). None: every row of the model's vocabulary.
    """
    _check_common(model, input_ids, attention_mask, max_new_tokens)
    depth = DepthParams(num_steps, exit_criterion, exit_threshold, warm_start, kv_sharing, init_scale)
    policy, init_scale = depth.policy(), depth.init_scale
    criterion = depth.criterion()
    if isinstance(criterion, NoExit):
        criterion = None
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ValueError(f"min_steps must be an integer >= 0, got {min_steps!r}")
    sampler = Sampler(do_sample, temperature, top_k, top_p, min_p, generator)
    eos = _eos_ids(eos_token_id, input_ids.device)
    if draft_steps is not None or lookahead is not None:
        if criterion is not None or warm_start or do_sample:
            raise ValueError("speculative decoding (draft_steps / lookahead) is greedy at fixed depth: it cannot be "
                             "combined with an exit criterion, warm_start or do_sample")
        return generate_speculative(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                    num_steps=num_steps, draft_steps=draft_steps, lookahead=lookahead,
                                    kv_sharing=policy, init_scale=init_scale, eos=eos, streamer=streamer,
                                    vocab_limit=vocab_limit)
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
                           initial_state=state0, init_scale=init_scale, generator=generator,
                           vocab_limit=vocab_limit)
        tok = sampler(res.logits)  # (R,)
        idx = rows if rows is not None else slice(None)
        new_tokens[idx, pos] = tok
        steps[idx, pos] = res.steps
        if streamer is not None:
            if hasattr(streamer, "put_steps"):
                streamer.put_steps(steps[:, pos: pos + 1].cpu())
            streamer.put(new_tokens[:, pos: pos + 1].cpu())
        if depth.warm is not None:
            state0 = (res.state if depth.warm == "raw" else res.latents)[:, -1:]
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
