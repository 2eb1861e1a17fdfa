"""The per-row step engine, the library's one decoder: continuous batching at the granularity of one recurrence
step, which `generate()`, speculative decoding, evaluation, `rdepth chat` and the server all drive.

A `Row` is one generated continuation. Each advances through a small cycle per token: *embed* (prelude on the new
token, or on the whole prompt at first, and its initial state s0), *iterate* (core steps, its own exit criterion
checked after each), *finish* (coda + head, sample, emit). `RowEngine.step()` moves every live row by one
phase-step:

    1. rows with a token to embed run the prelude (rows batched) and draw s0 (or take the warm state);
    2. every row still iterating runs core steps (rows batched, each at its own recurrence step and cache slot):
       ONE, then its exit criterion decides, for rows that check one (and for every row with `chunk=1`, the
       server's setting); up to `chunk` (None: all that remain, in as few calls as the rows' depths allow) for rows
       that check none (`generate()`'s static batches);
    3. rows whose recurrence ended (depth reached or exited) run coda + head, sample a token and emit it.

With `chunk=1` one engine step costs one core step for the rows still iterating, and a row at r = 4 produces a token
every 4 engine steps whatever the others ask for; rows that finished their recurrence cost nothing until their next
token. Rows join (`add`) and leave (`remove`, or when done) between steps. Prompts are prefilled through the same
cycle; rows that feed the same number of tokens (all decoding rows; prompts of equal length) share each call.
`forward()` runs one fixed-depth forward of tokens the caller chose (speculative drafts and their verification),
`truncate()` forgets rejected positions.

Every row reads and writes only its own pages of the `RowKVCache`, its own RoPE positions and its own random
generator, so a row produces what it produces alone in a one-row batch (bit-for-bit apart from floating-point
reduction order; greedy tokens are tested equal). The request set-up (exit criterion, sharing policy, sampler,
warm start, min_steps) is `DepthParams` / `SamplingParams`'s, what an exited token leaves in the cache is its
policy's `fill_exited`, the head is `step.head_logits` (vocabulary ban included). On the CPU its prelude, core and
coda calls take the fused op (`recurrent_depth.inference.fused`), which reads and writes the bound rows' pages in
place through their page tables. The server (`recurrent_depth.serving.engine.BatchEngine`) adds text, stop strings
and events by overriding `_emit` and `_release`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from recurrent_depth.inference.cache import RowKVCache, SharingPolicy
from recurrent_depth.inference.exit import ExitCriterion, NoExit
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.sampling import Sampler
from recurrent_depth.inference.step import head_logits
from recurrent_depth.model.layers import AttentionContext

EMBED, ITERATE, DONE = "embed", "iterate", "done"
_ids = itertools.count()


@dataclass(eq=False)
class Row:
    """One continuation being generated: its request and tokens; the engine fills the private fields."""

    prompt: list[int]
    depth: DepthParams
    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    token_steps: list[int] = field(default_factory=list)
    finish_reason: str | None = None
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
    checks: bool = True  # whether this token's recurrence checks the exit criterion (not in a prefill without it)
    criterion: ExitCriterion | None = None
    sharing: SharingPolicy | None = None
    sampler: Sampler | None = None
    generator: torch.Generator | None = None

    @property
    def total_steps(self) -> int:
        return sum(self.token_steps)


class RowEngine:
    """Owns the model, the paged per-row KV cache and the live rows; `step()` advances them (module docstring).

    vocab_limit: vocabulary rows at or beyond it are never produced (the tokenizer's size; None: none banned).
    max_len: positions a row may reach (prompt + new tokens; None: the model's block_size). chunk: recurrences per
    engine step for rows that check no exit criterion (None: a token's whole recurrence, in one fused call where the
    rows' depths agree: static batches; 1: every row advances one recurrence per engine step, so a shallow row is
    not held to a deep row's pace: the server). page_size: positions per page of the store (`RowKVCache`).
    Not thread-safe: one thread calls `add`, `remove` and `step`.
    """

    def __init__(self, model: torch.nn.Module, max_rows: int = 8, vocab_limit: int | None = None,
                 max_len: int | None = None, chunk: int | None = 1, page_size: int = 16) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be an integer >= 1 or None, got {chunk!r}")
        self.chunk = chunk
        self.model, self.max_rows, self.vocab_limit = model.eval(), max_rows, vocab_limit
        self.t = model.transformer
        self.cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        layers = {"prelude": self.cfg.n_layers_in_prelude, "core": self.cfg.n_layers_in_recurrent_block,
                  "coda": self.cfg.n_layers_in_coda}
        self.max_len = self.cfg.block_size if max_len is None else min(max_len, self.cfg.block_size)
        self.store = RowKVCache(self.cfg.n_heads, self.cfg.n_embd // self.cfg.n_heads, layers, max_rows,
                                self.max_len, self.dtype, self.device, page_size)
        self.live: list[Row] = []
        self._free = list(range(max_rows))[::-1]
        self._scratch: dict = {}  # the fused op's per-stage weights, gathered once for the engine's life (a model
        #                           whose parameters are replaced, not updated in place, needs a new engine)

    # --------------------------------------------------------------------------------------- membership
    @property
    def free_rows(self) -> int:
        return len(self._free)

    def add(self, seq: Row) -> None:
        """Admit a row (raises if no row is free or its prompt does not fit the context)."""
        if not self._free:
            raise RuntimeError("no free row in the batch")
        if not seq.prompt:
            raise ValueError("empty prompt")
        if len(seq.prompt) + seq.sampling.max_tokens > self.max_len:
            raise ValueError(f"prompt ({len(seq.prompt)}) + max_tokens ({seq.sampling.max_tokens}) exceeds the "
                             f"context length {self.max_len}")
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
    def remove(self, seq: Row, reason: str = "abort") -> None:
        """Drop a row now (client gone); frees its row and pages, emits nothing."""
        if seq in self.live:
            self._free_row(seq, reason)

    def _free_row(self, seq: Row, reason: str) -> None:
        seq.finish_reason, seq.phase = reason, DONE
        self.live.remove(seq)
        self.store.release(seq.row)
        self._free.append(seq.row)
        seq.e = seq.state = seq.warm = seq.memory = seq.logits = None

    def _emit(self, s: Row, token: int) -> None:
        """After each token: end the row on a stop token id or at max_tokens (the server adds text)."""
        if token in s.sampling.stop_token_ids:
            self._free_row(s, "stop")
        elif len(s.tokens) >= s.sampling.max_tokens:
            self._free_row(s, "length")

    # ------------------------------------------------------------------------------------------- stepping
    @torch.inference_mode()
    def step(self) -> None:
        """Advance every live row by one phase-step: embed; the recurrence (all of it, in as few calls as the rows'
        depths allow, for rows that check no exit criterion; one core step for the others); finish."""
        for group in self._groups([s for s in self.live if s.phase == EMBED]):
            self._embed(group)
        iterating = [s for s in self.live if s.phase == ITERATE and not self._done_iterating(s)]
        if self.chunk != 1:
            for group in self._groups([s for s in iterating if not s.checks]):
                self._core_steps(group)
            iterating = [s for s in iterating if s.checks]
        for group in self._groups(iterating):
            self._core_step(group)
        for group in self._groups([s for s in self.live if s.phase == ITERATE and self._done_iterating(s)]):
            self._finish(group)

    def run(self, rows: list[Row]) -> list[Row]:
        """Serve `rows` to the end offline: each is admitted, in order, as a row frees (continuous batching without
        a server); returns them, every one finished."""
        waiting = list(rows)
        while waiting or self.live:
            while waiting and self.free_rows:
                self.add(waiting.pop(0))
            self.step()
        return rows

    @torch.inference_mode()
    def forward(self, rows: list[Row], tokens: list[list[int]], num_steps: int, all_logits: bool = False) -> Tensor:
        """One forward at the fixed depth `num_steps` of `tokens` (the same count T for each row) for admitted
        `rows`, committed to their cache positions: fp32 logits (n, V) of each row's last new position, or (n, T, V)
        with all_logits. The step for decoders that choose every row's tokens themselves (speculative drafts and
        their verification); it leaves the rows outside the `step()` cycle."""
        for s, ids in zip(rows, tokens):
            s.pending = list(ids)
        self._embed(rows)
        state = torch.cat([s.state for s in rows])
        if num_steps > 0:
            state = self.t.core_steps(state, torch.cat([s.e for s in rows]), 0, num_steps,
                                      self._context(rows, "core", num_steps=num_steps))
            for i, s in enumerate(rows):
                s.state = state[i:i + 1]
        logits = self._logits(rows, all_logits)
        for s in rows:
            s.length += len(s.pending)
            s.e = s.state = s.memory = None
            s.phase = DONE
        return logits

    @torch.inference_mode()  # the store's tensors are inference tensors
    def truncate(self, seq: Row, length: int) -> None:
        """Forget row `seq`'s positions at and after `length` (speculative decoding rejects drafted tokens)."""
        seq.length = min(seq.length, length)
        self.store.truncate(seq.row, length)

    @staticmethod
    def unpadded(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
        """Each row's tokens without its padding (mask 0): the prompts a left-padded batch stands for."""
        if attention_mask is None:
            return input_ids.tolist()
        return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]

    @staticmethod
    def _done_iterating(s: Row) -> bool:
        return s.exited or s.step_count >= s.depth.num_steps

    @staticmethod
    def _groups(seqs: list[Row]) -> list[list[Row]]:
        """Rows feeding the same number of tokens T share a call (decode rows T = 1; prompts of equal length).

        Rows may start at different positions: the store right-aligns every row's keys, so the causal mask for the
        last T keys is the same for all of them."""
        by_len: dict[int, list[Row]] = {}
        for s in seqs:
            by_len.setdefault(len(s.pending), []).append(s)
        return list(by_len.values())

    def _context(self, group: list[Row], part: str, steps: list[int] | None = None,
                 num_steps: int = 1) -> AttentionContext:
        """Bind the group's rows in the store for `part` (core: `num_steps` recurrences from `steps`, default each
        row's own next step) and build their RoPE rows (no host-device sync per layer)."""
        T = len(group[0].pending)
        starts = [s.length for s in group]
        if part == "core":
            steps = [s.step_count for s in group] if steps is None else steps
            self.store.bind([s.row for s in group], starts, T, part, steps, [s.sharing for s in group], num_steps)
        else:
            self.store.bind([s.row for s in group], starts, T, part)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        ctx = AttentionContext(rope=self.t.rope[0, positions], mask=None, cache=self.store)  # positions (n, T)
        ctx.fused = self._scratch
        return ctx

    def _embed(self, group: list[Row]) -> None:
        ids = torch.tensor([s.pending for s in group], device=self.device)  # (n, T)
        e = self.t.embed(ids, self._context(group, "prelude"))  # (n, T, d)
        for i, s in enumerate(group):
            s.e = e[i:i + 1]
            if s.depth.warm is not None and s.warm is not None:
                s.state = s.warm
            else:
                s.state = self.t.initial_state(s.e, s.depth.init_scale, s.generator)
            s.checks = not isinstance(s.criterion, NoExit) and (bool(s.tokens) or s.depth.exit_in_prefill)
            s.memory = s.criterion.init(s.state, self.cfg.vocab_size) if s.checks else None
            s.step_count, s.exited, s.logits, s.phase = 0, False, None, ITERATE

    def _core_steps(self, group: list[Row]) -> None:
        """Rows that check no exit criterion: up to `chunk` recurrences (None: all that remain) now, each call running
        the recurrences all its rows still need (one fused call where the rows share a depth)."""
        left = self.chunk
        while group and (left is None or left > 0):
            n = min(s.depth.num_steps - s.step_count for s in group)
            n = n if left is None else min(n, left)
            left = None if left is None else left - n
            ctx = self._context(group, "core", num_steps=n)
            new = self.t.core_steps(torch.cat([s.state for s in group]), torch.cat([s.e for s in group]), 0, n, ctx)
            for i, s in enumerate(group):
                s.state, s.step_count, s.logits = new[i:i + 1], s.step_count + n, None
            group = [s for s in group if not self._done_iterating(s)]

    def _core_step(self, group: list[Row]) -> None:
        ctx = self._context(group, "core")
        state = torch.cat([s.state for s in group])
        e = torch.cat([s.e for s in group])
        new = self.t.core_step(state, e, 0, ctx)  # the store picks each row's slot from its own step
        for i, s in enumerate(group):
            s.state, s.step_count, s.logits = new[i:i + 1], s.step_count + 1, None
        checked = [s for s in group if s.checks and s.step_count >= s.depth.min_steps]  # first: max(min_steps, 1)
        needs = [s for s in checked if s.criterion.needs_logits]
        if needs:
            logits = self._logits(needs)
            for i, s in enumerate(needs):
                s.logits = logits[i:i + 1]
        self._check_exits(checked)

    @staticmethod
    def _check_exits(group: list[Row]) -> None:
        """Each row's own criterion, evaluated once per (criterion, threshold) over the rows that share it."""
        by_criterion: dict[tuple, list[Row]] = {}
        for s in group:
            by_criterion.setdefault((type(s.criterion), s.criterion.threshold), []).append(s)
        for members in by_criterion.values():
            crit = members[0].criterion
            logits = torch.cat([s.logits for s in members]) if crit.needs_logits else None
            exit_now, memory, _ = crit.check(torch.cat([s.memory for s in members]),
                                             torch.cat([s.state for s in members]), logits)
            for i, (s, flag) in enumerate(zip(members, exit_now.tolist())):
                s.memory, s.exited = memory[i:i + 1], bool(flag)

    def _logits(self, group: list[Row], all_logits: bool = False) -> Tensor:
        """Coda + head on the rows' current states: (n, V) fp32 logits of each row's last position ((n, T, V) with
        all_logits)."""
        hidden, _ = self.t.decode(torch.cat([s.state for s in group]), self._context(group, "coda"))
        return head_logits(self.model, hidden, all_logits, self.vocab_limit)

    def _finish(self, group: list[Row]) -> None:
        todo = [s for s in group if s.logits is None]
        if todo:
            logits = self._logits(todo)
            for i, s in enumerate(todo):
                s.logits = logits[i:i + 1]
        greedy = [s for s in group if not s.sampler.do_sample]
        picked = dict(zip((s.id for s in greedy), torch.cat([s.logits for s in greedy]).argmax(-1).tolist())
                      if greedy else ())
        self._fill_exited([s for s in group if s.sharing.fills_exited and 0 < s.step_count < s.depth.num_steps])
        for s in group:
            T = len(s.pending)
            token = picked[s.id] if s.id in picked else int(s.sampler(s.logits)[0])  # own generator per row
            s.length += T
            if s.depth.warm is not None:
                s.warm = (s.state if s.depth.warm == "raw" else self.t.ln_f(s.state))[:, -1:]
            s.tokens.append(token)
            s.token_steps.append(s.step_count)
            s.pending, s.phase = [token], EMBED
            self._emit(s, token)  # s.logits still hold the token's logits here
            s.logits = None

    def _fill_exited(self, exited: list[Row]) -> None:
        """What tokens that exited early leave at their deeper steps: their policy's `fill_exited`, once for the
        rows that share a policy, a last step and a depth."""
        by_exit: dict[tuple, list[Row]] = {}
        for s in exited:
            by_exit.setdefault((s.sharing, s.step_count, s.depth.num_steps), []).append(s)
        for (policy, n, depth), rows in by_exit.items():
            self._context(rows, "core", [n - 1] * len(rows))
            policy.fill_exited(self.store, self.store.bound_rows, n - 1, depth, self.cfg.n_layers_in_recurrent_block,
                               len(rows[0].pending))
