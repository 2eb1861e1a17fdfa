"""Self-speculative decoding: draft with few recurrences, verify with many, in one pass.

The same model drafts `lookahead` tokens greedily at `draft_steps` recurrences, the drafted positions are removed from
the cache, and one forward at `num_steps` over [last accepted token, draft_1 .. draft_{L-1}] checks them all. The
output is exactly plain greedy decoding at `num_steps`: every token kept was the verifier's argmax.

Batches stay rectangular: each round keeps the longest drafted prefix that every unfinished row's verifier agrees with,
plus the verifier's own next token (the correction for a row that disagreed there, the agreeing draft for the others).
A batch therefore accepts at the pace of its least lucky row; at batch 1 this is the reference's algorithm.

    out = generate(model, ids, max_new_tokens=64, num_steps=32, draft_steps=4, lookahead=8)
    out.stats["accepted_per_round"]   # mean drafted tokens kept per verification pass
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference.cache import SharingPolicy
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.rows import Row, RowEngine
from recurrent_depth.inference.step import GenerateOutput


def _check(draft_steps: int | None, lookahead: int | None, num_steps: int) -> tuple[int, int]:
    draft_steps = max(1, num_steps // 8) if draft_steps is None else draft_steps
    lookahead = 4 if lookahead is None else lookahead
    for name, value in (("draft_steps", draft_steps), ("lookahead", lookahead)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return draft_steps, lookahead


def _stream(streamer: Any, new: Tensor, finished: Tensor, eos: Tensor | None, num_steps: int) -> None:
    """Send the part of a round's accepted tokens (B, n) that the output keeps to the streamer: cut after the
    position where every row has emitted EOS, a row's tokens after its own EOS (or of a row already finished)
    replaced by the first EOS id with 0 steps, exactly as in the returned sequences and steps."""
    after = torch.zeros_like(new, dtype=torch.bool)
    if eos is not None:
        hit = torch.isin(new, eos)
        after = (hit.long().cumsum(dim=1) - hit.long() > 0) | finished[:, None]
        new = new.masked_fill(after, int(eos[0]))
        done = (hit | after).all(dim=0)  # (n,): every row has ended at or before this position
        if bool(done.any()):
            keep = int(done.long().argmax()) + 1
            new, after = new[:, :keep], after[:, :keep]
    if hasattr(streamer, "put_steps"):
        streamer.put_steps(torch.full_like(new, num_steps).masked_fill(after, 0).cpu())
    streamer.put(new.cpu())


def generate_speculative(model: Any, input_ids: Tensor, attention_mask: Tensor | None, *, max_new_tokens: int,
                         num_steps: int, draft_steps: int | None, lookahead: int | None, kv_sharing: SharingPolicy,
                         init_scale: float, eos: Tensor | None, streamer: Any = None,
                         vocab_limit: int | None = None) -> GenerateOutput:
    """Greedy self-speculative generation; see the module docstring. Runs on the row engine (`RowEngine.forward`
    and `truncate`), each row its own sequence (its prompt without the padding); vocab_limit: as in `generate`."""

    draft_steps, lookahead = _check(draft_steps, lookahead, num_steps)
    B, T0 = input_ids.shape
    device = input_ids.device
    prompts = RowEngine.unpadded(input_ids, attention_mask)
    max_len = max(len(p) for p in prompts) + max_new_tokens + lookahead + 1
    engine = RowEngine(model, max_rows=B, vocab_limit=vocab_limit, max_len=max_len, chunk=None, page_size=max_len)
    depth = DepthParams(num_steps, kv_sharing=kv_sharing, init_scale=init_scale)
    rows = [Row(p, depth, SamplingParams(max(max_new_tokens, 1), 0.0)) for p in prompts]
    for row in rows:
        engine.add(row)
        row.generator = None  # s0 draws (init_scale > 0) from torch's global generator, in row order

    def run(ids: Tensor, steps: int, all_logits: bool = False) -> Tensor:
        return engine.forward(rows, ids.tolist(), steps, all_logits)

    def first() -> Tensor:  # the prefill, rows of equal prompt length sharing a forward: (B,) first tokens
        tok = torch.empty(B, dtype=torch.long, device=device)
        by_len: dict[int, list[int]] = {}
        for b, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(b)
        for members in by_len.values():
            logits = engine.forward([rows[b] for b in members], [prompts[b] for b in members], num_steps)
            tok[torch.tensor(members, device=device)] = logits.argmax(-1).to(device)
        return tok

    if streamer is not None:
        streamer.put(input_ids.cpu())
    out: list[Tensor] = [first()[:, None]]  # (B, 1) first token from the prefill
    produced, rounds, kept = 1, 0, 0
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if streamer is not None:
        _stream(streamer, out[-1][:, :max_new_tokens], finished, None, num_steps)
    while produced < max_new_tokens:
        if eos is not None:
            finished |= torch.isin(out[-1], eos).any(dim=1)
            if bool(finished.all()):
                break
        last = out[-1][:, -1:]  # (B, 1): newest token, not yet in the cache
        starts = [row.length for row in rows]
        drafts = [last]
        for _ in range(lookahead):
            drafts.append(run(drafts[-1], draft_steps).argmax(-1)[:, None].to(device))
        for row, start in zip(rows, starts):
            engine.truncate(row, start)
        draft = torch.cat(drafts[1:], dim=1)  # (B, L)
        pred = run(torch.cat(drafts[:-1], dim=1), num_steps, all_logits=True).argmax(-1).to(device)  # (B, L)
        agree = (pred == draft) | finished[:, None]
        n = int(agree.long().cumprod(dim=1).sum(dim=1).min())  # drafted tokens every row keeps
        if n == lookahead:
            new = draft
        else:
            new = torch.cat([draft[:, :n], pred[:, n: n + 1]], dim=1)
            for row, start in zip(rows, starts):  # keep [last, draft_1 .. draft_n]; the correction is the new `last`
                engine.truncate(row, start + n + 1)
        rounds, kept = rounds + 1, kept + n
        out.append(new)
        if streamer is not None:
            _stream(streamer, new[:, : max_new_tokens - produced], finished, eos, num_steps)
        produced += new.shape[1]
    if streamer is not None:
        streamer.end()
    new_tokens = torch.cat(out, dim=1)[:, :max_new_tokens]
    if eos is not None:  # positions after a row's first EOS hold the first EOS id
        after = torch.isin(new_tokens, eos).long().cumsum(dim=1) - torch.isin(new_tokens, eos).long() > 0
        new_tokens = new_tokens.masked_fill(after, int(eos[0]))
    steps = torch.full_like(new_tokens, num_steps)
    if eos is not None:
        steps = steps.masked_fill(after, 0)
    store = engine.store
    stats = {"rounds": rounds, "accepted_per_round": kept / max(rounds, 1), "draft_steps": draft_steps,
             "lookahead": lookahead, "core_kv_bytes": store.peak_core_bytes}
    for row in rows:
        engine.remove(row, "stop")
    return GenerateOutput(torch.cat([input_ids, new_tokens], dim=1), steps, store.peak_bytes, stats)
