"""The logit lens: what every intermediate latent state would predict if the recurrence stopped there.

The trace already holds, for every step and position, the top-k ids and probabilities decoded from s_t through
ln_f -> coda -> ln_f -> lm_head; this module turns them into readable records with a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recurrent_depth.inspection.trace import LatentTrace


@dataclass(frozen=True)
class LensEntry:
    """One candidate next token at one step: its id, its text and its probability."""

    token_id: int
    text: str
    prob: float


def token_texts(ids: Sequence[int], decode: Callable[[list[int]], str] | None = None) -> list[str]:
    """The text of each token on its own (`decode([id])`, e.g. a tokenizer's `decode`); `#id` without a decoder
    or where the decoder gives nothing (an id the tokenizer does not know)."""
    if decode is None:
        return [f"#{int(i)}" for i in ids]
    return [decode([int(i)]) or f"#{int(i)}" for i in ids]


def logit_lens(trace: LatentTrace, decode: Callable[[list[int]], str] | None = None) -> list[list[list[LensEntry]]]:
    """lens[position][step - 1] = the top-k next tokens decoded from that position's state after `step` steps."""
    ids = trace.top_ids.permute(1, 0, 2).tolist()  # (T, R, k)
    probs = trace.top_probs.permute(1, 0, 2).tolist()
    vocab = sorted({i for pos in ids for step in pos for i in step})
    text = dict(zip(vocab, token_texts(vocab, decode)))
    return [[[LensEntry(i, text[i], p) for i, p in zip(step_ids, step_probs)]
             for step_ids, step_probs in zip(pos_ids, pos_probs)]
            for pos_ids, pos_probs in zip(ids, probs)]
