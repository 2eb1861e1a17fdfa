"""Continuous batching at the granularity of one recurrence step.

A `Sequence` is one generated continuation (one `choices[i]` of a request). Each advances through a small cycle per
token: *embed* (prelude on the new token, or on the whole prompt at first, and its initial state s0), *iterate* (core
steps, its own exit criterion checked after each), *finish* (coda + head, sample, emit). `BatchEngine.step()` moves
every live sequence by one phase-step:

    1. sequences with a token to embed run the prelude (rows batched) and draw s0 (or take the warm state);
    2. every sequence still iterating runs ONE core step (rows batched, each at its own recurrence step and cache
       slot), then its exit criterion decides;
    3. sequences whose recurrence ended (depth reached or exited) run coda + head, sample a token and emit it.

So one engine step costs one core step for the rows still iterating, and a sequence at r = 4 produces a token
every 4 engine steps whatever the others ask for; rows that finished their recurrence cost nothing until their next
token. Sequences join (`add`) and leave (`remove`, or when done) between steps. Prompts are prefilled through the
same cycle; rows that feed the same number of tokens (all decoding rows; prompts of equal length) share each call.

Every row reads and writes only its own cache row, its own RoPE positions and its own random generator, so a
sequence produces what it would produce alone (bit-for-bit apart from floating-point reduction order; greedy
tokens are tested equal).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from recurrent_depth.inference.cache import RowKVCache, SharingPolicy
from recurrent_depth.inference.exit import ExitCriterion, NoExit
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.sampling import Sampler, ban_beyond
from recurrent_depth.model.layers import AttentionContext

__all__ = ["BatchEngine", "DepthParams", "SamplingParams", "Sequence", "TokenEvent"]


@dataclass
class TokenEvent:
    """What a sequence emits after each token: the new text (held back while it may begin a stop string), the token
    id and the recurrence steps it took; `finish_reason` ("stop", "length", "abort", "error") on the last event."""

    text: str
    token_id: int | None
    steps: int | None
    finish_reason: str | None = None


EMBED, ITERATE, DONE = "embed", "iterate", "done"
_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One continuation being generated; the engine fills the private fields."""

    prompt: list[int]
    depth: DepthParams
    sampling: SamplingParams
    on_event: Callable[[TokenEvent], None] = lambda event: None
    tokens: list[int] = field(default_factory=list)
    token_steps: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    # engine state
    id: int = field(default_factory=lambda: next(_ids))
    row: int = -1
    phase: str = EMBED
    length: int = 0  # positions committed to the cache
    pending: list[int] = field(default_factory=list)  # token ids to feed next
    e: Tensor | None = None
    state: Tensor | None = None
    warm: Tensor | None = None
    memory: Tensor | None = None
    logits: Tensor | None = None  # last position's logits of the current state, if already computed
    step_count: int = 0
    exited: bool = False
    emitted: int = 0  # characters of text already sent
    criterion: ExitCriterion | None = None
    sharing: SharingPolicy | None = None
    sampler: Sampler | None = None
    generator: torch.Generator | None = None

    @property
    def total_steps(self) -> int:
        return sum(self.token_steps)


class BatchEngine:
    """Owns the model, the per-row KV store and the live sequences; `step()` advances them (see module docstring).

    Not thread-safe: one thread calls `add`, `remove` and `step` (the `Scheduler` does).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_rows: int = 8) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model, self.tokenizer, self.max_rows = model.eval(), tokenizer, max_rows
        self.t = model.transformer
        self.cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers = {"prelude": self.cfg.n_layers_in_prelude, "core": self.cfg.n_layers_in_recurrent_block,
                  "coda": self.cfg.n_layers_in_coda}
        self.store = RowKVCache(self.cfg.n_heads, self.cfg.n_embd // self.cfg.n_heads, layers, max_rows,
                                self.cfg.block_size, self.dtype, self.device)
        self.live: list[Sequence] = []
        self._free = list(range(max_rows))[::-1]
        # padded vocabulary rows beyond the tokenizer are never sampled (`generate(vocab_limit=...)` alike)
        self.vocab_limit = len(tokenizer) if tokenizer is not None else None

    # --------------------------------------------------------------------------------------- membership
    @property
    def free_rows(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        """Admit a sequence (raises if no row is free or its prompt does not fit the context)."""
        if not self._free:
            raise RuntimeError("no free row in the batch")
        if not seq.prompt:
            raise ValueError("empty prompt")
        if len(seq.prompt) + seq.sampling.max_tokens > self.cfg.block_size:
            raise ValueError(f"prompt ({len(seq.prompt)}) + max_tokens ({seq.sampling.max_tokens}) exceeds the "
                             f"context length {self.cfg.block_size}")
        seq.criterion, seq.sharing = seq.depth.criterion(), seq.depth.policy()  # validated by DepthParams
        seq.generator = torch.Generator(device=self.device)
        if seq.sampling.seed is None:
            seq.generator.seed()
        else:
            seq.generator.manual_seed(seq.sampling.seed % 2**64)
        seq.sampler = seq.sampling.sampler(seq.generator)
        seq.row = self._free.pop()
        seq.phase, seq.length, seq.pending = EMBED, 0, list(seq.prompt)
        self.live.append(seq)

    @torch.inference_mode()  # the store's tensors are inference tensors
    def remove(self, seq: Sequence, reason: str = "abort") -> None:
        """Drop a sequence now (client gone); frees its row."""
        if seq in self.live:
            self._release(seq, reason, emit=False)

    def _release(self, seq: Sequence, reason: str, emit: bool = True, text: str = "", token: int | None = None,
                 steps: int | None = None) -> None:
        seq.finish_reason, seq.phase = reason, DONE
        self.live.remove(seq)
        self.store.release(seq.row)
        self._free.append(seq.row)
        seq.e = seq.state = seq.warm = seq.memory = seq.logits = None
        if emit:
            seq.on_event(TokenEvent(text, token, steps, reason))

    # ------------------------------------------------------------------------------------------- stepping
    @torch.inference_mode()
    def step(self) -> None:
        """Advance every live sequence by one phase-step (embed / one core step / finish)."""
        for group in self._groups([s for s in self.live if s.phase == EMBED]):
            self._embed(group)
        for group in self._groups([s for s in self.live if s.phase == ITERATE and not self._done_iterating(s)]):
            self._core_step(group)
        for group in self._groups([s for s in self.live if s.phase == ITERATE and self._done_iterating(s)]):
            self._finish(group)

    @staticmethod
    def _done_iterating(s: Sequence) -> bool:
        return s.exited or s.step_count >= s.depth.num_steps

    @staticmethod
    def _groups(seqs: list[Sequence]) -> list[list[Sequence]]:
        """Rows feeding the same number of tokens T share a call (decode rows T = 1; prompts of equal length).

        Rows may start at different positions: the store right-aligns every row's keys, so the causal mask for the
        last T keys is the same for all of them."""
        by_len: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_len.setdefault(len(s.pending), []).append(s)
        return list(by_len.values())

    def _context(self, group: list[Sequence], part: str, steps: list[int] | None = None) -> AttentionContext:
        """Bind the group's rows in the store for `part` (core: at `steps`, default each row's own next step) and
        build their RoPE rows (no host-device sync per layer)."""
        T = len(group[0].pending)
        starts = [s.length for s in group]
        if part == "core":
            steps = [s.step_count for s in group] if steps is None else steps
            self.store.bind([s.row for s in group], starts, T, part, steps, [s.sharing for s in group])
        else:
            self.store.bind([s.row for s in group], starts, T, part)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        return AttentionContext(rope=self.t.rope[0, positions], mask=None, cache=self.store)  # positions (n, T)

    def _embed(self, group: list[Sequence]) -> None:
        ids = torch.tensor([s.pending for s in group], device=self.device)  # (n, T)
        e = self.t.embed(ids, self._context(group, "prelude"))  # (n, T, d)
        for i, s in enumerate(group):
            s.e = e[i:i + 1]
            if s.depth.warm is not None and s.warm is not None:
                s.state = s.warm
            else:
                s.state = self.t.initial_state(s.e, s.depth.init_scale, s.generator)
            s.memory = s.criterion.init(s.state, self.cfg.vocab_size)
            s.step_count, s.exited, s.logits, s.phase = 0, False, None, ITERATE

    def _core_step(self, group: list[Sequence]) -> None:
        ctx = self._context(group, "core")
        state = torch.cat([s.state for s in group])
        e = torch.cat([s.e for s in group])
        new = self.t.core_step(state, e, 0, ctx)  # the store picks each row's slot from its own step
        for i, s in enumerate(group):
            s.state, s.step_count, s.logits = new[i:i + 1], s.step_count + 1, None
        needs = [s for s in group if s.criterion.needs_logits]
        if needs:
            logits = self._logits(needs)
            for i, s in enumerate(needs):
                s.logits = logits[i:i + 1]
        self._check_exits(group)

    @staticmethod
    def _check_exits(group: list[Sequence]) -> None:
        """Each row's own criterion, evaluated once per (criterion, threshold) over the rows that share it."""
        by_criterion: dict[tuple, list[Sequence]] = {}
        for s in group:
            if not isinstance(s.criterion, NoExit):  # never exits: nothing to evaluate
                by_criterion.setdefault((type(s.criterion), s.criterion.threshold), []).append(s)
        for members in by_criterion.values():
            crit = members[0].criterion
            logits = torch.cat([s.logits for s in members]) if crit.needs_logits else None
            exit_now, memory, _ = crit.check(torch.cat([s.memory for s in members]),
                                             torch.cat([s.state for s in members]), logits)
            for i, (s, flag) in enumerate(zip(members, exit_now.tolist())):
                s.memory, s.exited = memory[i:i + 1], bool(flag)

    def _logits(self, group: list[Sequence]) -> Tensor:
        """Coda + head on the rows' current states: (n, V) fp32 logits of each row's last position."""
        hidden, _ = self.t.decode(torch.cat([s.state for s in group]), self._context(group, "coda"))
        return ban_beyond(self.model.lm_head(hidden[:, -1:]).float()[:, 0], self.vocab_limit)  # (n, V)

    def _finish(self, group: list[Sequence]) -> None:
        todo = [s for s in group if s.logits is None]
        if todo:
            logits = self._logits(todo)
            for i, s in enumerate(todo):
                s.logits = logits[i:i + 1]
        greedy = [s for s in group if not s.sampler.do_sample]
        picked = dict(zip((s.id for s in greedy), torch.cat([s.logits for s in greedy]).argmax(-1).tolist())
                      if greedy else ())
        for s in group:
            T = len(s.pending)
            if s.sharing.fills_exited and 0 < s.step_count < s.depth.num_steps:  # exited early
                self._context([s], "core", [s.step_count - 1])
                s.sharing.fill_exited(self.store, self.store.bound_rows, s.step_count - 1, s.depth.num_steps,
                                      self.cfg.n_layers_in_recurrent_block, T)
            token = picked[s.id] if s.id in picked else int(s.sampler(s.logits)[0])  # own generator per row
            s.length += T
            if s.depth.warm is not None:
                s.warm = (s.state if s.depth.warm == "raw" else self.t.ln_f(s.state))[:, -1:]
            s.tokens.append(token)
            s.token_steps.append(s.step_count)
            s.pending, s.phase, s.logits = [token], EMBED, None
            self._emit(s, token)

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
