"""The server's continuous batching: `inference.rows.RowEngine` (the per-row step engine) plus text.

A `Sequence` is one generated continuation (one `choices[i]` of a request), a `Row` with an event callback.
`BatchEngine` decodes it with the library's row engine (one recurrence step per engine step, each row with its own
depth, exit criterion, cache sharing and positions, on the fused CPU op where it applies; see
`recurrent_depth.inference.rows`) and adds what only a server needs: detokenized text, held back while it may begin
a stop string, stop strings, and a `TokenEvent` per token. Every sequence produces what `inference.generate`
produces for it alone (greedy tokens tested equal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.rows import Row, RowEngine

__all__ = ["BatchEngine", "DepthParams", "SamplingParams", "Sequence", "TokenEvent"]


@dataclass
class TokenEvent:
    """What a sequence emits after each token: the new text (held back while it may begin a stop string), the token
    id and the recurrence steps it took; `finish_reason` ("stop", "length", "abort", "error") on the last event."""

    text: str
    token_id: int | None
    steps: int | None
    finish_reason: str | None = None


@dataclass(eq=False)
class Sequence(Row):
    """One continuation of a request: a `Row` whose tokens go to `on_event` as text."""

    on_event: Callable[[TokenEvent], None] = lambda event: None
    cancelled: bool = False
    emitted: int = 0  # characters of text already sent


class BatchEngine(RowEngine):
    """The row engine with a tokenizer: text, stop strings and events (module docstring). Vocabulary rows beyond
    the tokenizer are never produced. Not thread-safe: one thread calls `add`, `remove` and `step` (the
    `Scheduler` does)."""

    def __init__(self, model: Any, tokenizer: Any, max_rows: int = 8) -> None:
        super().__init__(model, max_rows, len(tokenizer) if tokenizer is not None else None)
        self.tokenizer = tokenizer

    def _release(self, seq: Sequence, reason: str, text: str = "", token: int | None = None,
                 steps: int | None = None) -> None:
        self._free_row(seq, reason)
        seq.on_event(TokenEvent(text, token, steps, reason))

    # ----------------------------------------------------------------------------------------------- text
    def _emit(self, s: Sequence, token: int) -> None:
        """Send the token's text; end the sequence on EOS, a stop string or max_tokens."""
        steps = s.token_steps[-1]
        if token in s.sampling.stop_token_ids:  # EOS: counted as a token, not part of the text
            self._release(s, "stop", text=self._flush(s, drop_last=True), token=token, steps=steps)
            return
        text, stopped = self._text(s)
        if stopped:
            self._release(s, "stop", text=text, token=token, steps=steps)
        elif len(s.tokens) >= s.sampling.max_tokens:
            self._release(s, "length", text=text + self._flush(s), token=token, steps=steps)
        else:
            s.on_event(TokenEvent(text, token, steps))

    def decoded(self, s: Sequence, drop_last: bool = False) -> str:
        """The sequence's text so far ("" without a tokenizer: token ids only)."""
        if self.tokenizer is None:
            return ""
        tokens = s.tokens[:-1] if drop_last else s.tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _text(self, s: Sequence) -> tuple[str, bool]:
        """New text to send, and whether a stop string ended it (then the text stops before it)."""
        full = self.decoded(s)
        cut = min((i for i in (full.find(stop) for stop in s.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta = full[s.emitted:cut] if cut > s.emitted else ""
            s.emitted = max(s.emitted, cut)
            return delta, True
        hold = 0
        for stop in s.sampling.stop:  # keep back a tail that may be the start of a stop string
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        while hold < len(full) and full[len(full) - hold - 1:len(full) - hold] == "\ufffd":
            hold += 1  # an incomplete multi-byte character
        end = max(s.emitted, len(full) - hold)
        delta, s.emitted = full[s.emitted:end], end
        return delta, False

    def _flush(self, s: Sequence, drop_last: bool = False) -> str:
        """Everything not yet sent (the held-back tail), at the end of a sequence."""
        full = self.decoded(s, drop_last)
        delta = full[s.emitted:]
        s.emitted = max(s.emitted, len(full))
        return delta
