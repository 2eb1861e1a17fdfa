"""What every decoder shares: the head (`head_logits`: the fused bf16 head where it applies, fp32 logits, the
vocabulary ban) and the result of a generation (`GenerateOutput`).

Every decoder runs on the per-row step engine (`recurrent_depth.inference.rows.RowEngine`): `generate()` (static
batches, and with it rdepth's evaluation sweeps), `generate_speculative()` (drafts and verification) and the
server's continuous batching.

vocab_limit: vocabulary rows at or beyond it (an embedding padded past the tokenizer) get probability 0, for the
exit criteria and the sampler alike (`recurrent_depth.inference.sampling.ban_beyond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from recurrent_depth.inference import fused
from recurrent_depth.inference.sampling import ban_beyond


@dataclass
class GenerateOutput:
    """sequences (B, prompt + new); steps (B, new) recurrences per generated token; kv_cache_bytes (peak)."""

    sequences: Tensor
    steps: Tensor
    kv_cache_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)


def head_logits(model: Any, hidden: Tensor, all_logits: bool, vocab_limit: int | None) -> Tensor:
    """fp32 next-token logits of the coda's output hidden (R, T, d): (R, V) at the last position, or (R, T, V) with
    all_logits; vocabulary rows at or beyond vocab_limit banned. Every decoder's head (`RowEngine`'s)."""
    last = hidden if all_logits else hidden[:, -1]
    logits = fused.head(model, last)  # a bf16 CPU decode's head on the fused op's kernel (None: the eager head)
    if logits is None:
        logits = model.lm_head(last).float()  # fp32 for softmax
    return ban_beyond(logits, vocab_limit)
