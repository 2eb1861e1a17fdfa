"""Batched generation with left padding, per-row adaptive exit, KV-cache sharing, warm start and speculative drafts.

    from recurrent_depth.inference.generate import generate
    out = generate(model, ids, attention_mask, max_new_tokens=64, num_steps=32, exit_criterion="kl",
                   exit_threshold=5e-4, kv_sharing="latest")
    out.sequences   # (B, prompt + new) token ids; rows that stopped at EOS are padded with the (first) EOS id
    out.steps       # (B, new) recurrences each generated token used (0 after a row stopped)
    out.kv_cache_bytes  # peak bytes of keys and values held

The batch runs on the per-row step engine (`recurrent_depth.inference.rows.RowEngine`, the server's engine too) over
the paged `RowKVCache`: each row is its own sequence (its prompt without the padding, its own positions and exits), and
a token's whole recurrence runs in one fused call where the rows' depths agree. The depth keywords are validated
once, as a `recurrent_depth.inference.params.DepthParams`.

A padded batch gives, row by row, what each row gives alone: positions count real tokens only and padding is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference.cache import SharingPolicy
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO
from recurrent_depth.inference.exit import ExitCriterion, NoExit
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.rows import Row, RowEngine
from recurrent_depth.inference.sampling import Sampler
from recurrent_depth.inference.speculative import generate_speculative
from recurrent_depth.inference.step import GenerateOutput

__all__ = ["GenerateOutput", "generate"]


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
    depth = DepthParams(num_steps, exit_criterion, exit_threshold, warm_start, kv_sharing, init_scale, min_steps,
                        exit_in_prefill)
    policy, init_scale = depth.policy(), depth.init_scale
    criterion = depth.criterion()
    if isinstance(criterion, NoExit):
        criterion = None
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
    new_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    steps = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return GenerateOutput(input_ids.clone(), steps, 0, {"core_kv_bytes": 0})
    sampling = SamplingParams(max_new_tokens, sampler.temperature if do_sample else 0.0, top_p or 1.0,
                              stop_token_ids=tuple(eos.tolist()) if eos is not None else (), top_k=top_k, min_p=min_p)
    rows = [Row(p, depth, sampling) for p in RowEngine.unpadded(input_ids, attention_mask)]
    max_len = max(len(r.prompt) for r in rows) + max_new_tokens
    engine = _StaticBatch(model, rows, max_len, vocab_limit, streamer, new_tokens, steps, eos, generator)
    engine.run(rows)
    if streamer is not None:
        streamer.end()
    store = engine.store
    return GenerateOutput(torch.cat([input_ids, new_tokens], dim=1), steps, store.peak_bytes,
                          {"core_kv_bytes": store.peak_core_bytes})


class _StaticBatch(RowEngine):
    """`generate()`'s batch on the row engine: every row admitted at once, each token's whole recurrence in one
    call where the rows' depths agree (`chunk=None`), one page per row and slot (the batch's length is known), new
    tokens written into the output by position and streamed a column at a time, once every unfinished row has it.
    Every row draws its s0 and samples from the caller's generator (None: torch's global one), in row order: a
    one-row batch draws exactly what a server row seeded like that generator draws."""

    def __init__(self, model: Any, rows: list[Row], max_len: int, vocab_limit: int | None, streamer: Any,
                 new_tokens: Tensor, token_steps: Tensor, eos: Tensor | None,
                 generator: torch.Generator | None) -> None:
        super().__init__(model, max_rows=len(rows), vocab_limit=vocab_limit, max_len=max_len, chunk=None,
                         page_size=max_len)
        self.index = {row.id: b for b, row in enumerate(rows)}
        self.rows, self.streamer, self.new_tokens, self.eos = rows, streamer, new_tokens, eos
        self.token_steps = token_steps
        self.generator, self.streamed = generator, 0

    def add(self, seq: Row) -> None:
        super().add(seq)
        seq.generator, seq.sampler = self.generator, seq.sampling.sampler(self.generator)

    def step(self) -> None:
        super().step()
        if self.streamer is None:
            return
        done = min((len(r.tokens) for r in self.rows if r.finish_reason is None),  # once all ended: their last
                   default=max(len(r.tokens) for r in self.rows))
        for pos in range(self.streamed, done):
            if hasattr(self.streamer, "put_steps"):
                self.streamer.put_steps(self.token_steps[:, pos: pos + 1].cpu())
            self.streamer.put(self.new_tokens[:, pos: pos + 1].cpu())
        self.streamed = max(self.streamed, done)

    def _emit(self, s: Row, token: int) -> None:
        b, pos = self.index[s.id], len(s.tokens) - 1
        self.new_tokens[b, pos], self.token_steps[b, pos] = token, s.token_steps[-1]
        super()._emit(s, token)
        if s.finish_reason == "stop":  # later positions hold the first EOS id, with 0 steps
            self.new_tokens[b, pos + 1:] = int(self.eos[0])

