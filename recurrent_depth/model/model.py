"""The recurrent-depth network (Huginn / Raven layout), as the paper writes it:

    e  = Prelude(wte(ids) * sqrt(d))
    s0 = TruncNormal(0, sqrt(2/(5d)); ±3σ) * sqrt(d) * init_scale        (or a given state)
    s_i = Core(Adapter(concat[s_{i-1}, e]))                               for i = 1..r
    z  = ln_f(s_r);  h = ln_f(Coda(z))                                     (forward returns h and z)
    logits = lm_head(h).float()                                           (the head, tied to wte: recurrent_depth.hf)

`RecurrentDepthModel` (the `transformer.*` parameters) runs them in that order in `forward`, and exposes the stages as
methods (`embed`, `initial_state`, `core_step`, `decode`) so that inference code can run them with its own exit and
cache policies. The network knows nothing of sampling, exit criteria or parallelism: how the core loop runs
(`Recurrence`) and a faster runner for cached calls (`StageRunner`) are objects handed in from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.model.layers import (
    AttentionContext,
    KVStore,
    LayerKey,
    RMSNorm,
    SandwichBlock,
    SequenceCache,
    rope_table,
)


class StageRunner(Protocol):
    """Runs a stage's blocks another way for the calls it takes (`recurrent_depth.inference.fused.FusedRunner`,
    handed in as `RecurrentDepthModel.stage_runner` by the code that wants it); same signature as the fused op."""

    def applicable(self, x: Tensor, ctx: AttentionContext, blocks: nn.ModuleList) -> bool: ...

    def run_blocks(self, blocks: nn.ModuleList, part: str, x: Tensor, ctx: AttentionContext, step: int,
                   n_heads: int, eps: float, e: Tensor | None = None, adapter: Tensor | None = None,
                   num_steps: int = 1) -> Tensor: ...


class Recurrence:
    """How the core recurrence runs: the eager loop of `core_step`. Training hands in subclasses as
    `model.recurrence` (activation checkpointing per step in `recurrent_depth.training.parallel`, the fused compiled
    step in `recurrent_depth.training.fused`) instead of patching the model."""

    checkpointed = False  # whether steps run with autograd are recomputed in backward (activation checkpointing)

    def step(self, model: RecurrentDepthModel, state: Tensor, e: Tensor, i: int, ctx: AttentionContext) -> Tensor:
        return model.core_step(state, e, i, ctx)

    def steps(self, model: RecurrentDepthModel, state: Tensor, e: Tensor, first_step: int, num_steps: int,
              ctx: AttentionContext) -> Tensor:
        """`num_steps` recurrences from `first_step` under the caller's grad mode."""
        for i in range(first_step, first_step + num_steps):
            state = self.step(model, state, e, i, ctx)
        return state

    def recur(self, model: RecurrentDepthModel, state: Tensor, e: Tensor, n_no_grad: int, n_grad: int,
              ctx: AttentionContext, first_step: int = 0) -> Tensor:
        """n_no_grad recurrences without autograd, then n_grad with it."""
        with torch.no_grad():
            state = model.core_steps(state, e, first_step, n_no_grad, ctx)
        return model.core_steps(state, e, first_step + n_no_grad, n_grad, ctx)


def _block(cfg: RecurrentDepthConfig, window: int = 0) -> SandwichBlock:
    return SandwichBlock(cfg.n_embd, cfg.n_heads, cfg.intermediate_size, cfg.norm_eps, cfg.qk_bias, window)


class RecurrentDepthModel(nn.Module):
    """Embedding, prelude, adapter, core block, coda and final norm (Huginn's `transformer.*`)."""

    def __init__(self, cfg: RecurrentDepthConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.prelude = nn.ModuleList(_block(cfg, cfg.outer_attention_window) for _ in range(cfg.n_layers_in_prelude))
        self.adapter = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.core_block = nn.ModuleList(_block(cfg, cfg.core_attention_window)
                                        for _ in range(cfg.n_layers_in_recurrent_block))
        self.coda = nn.ModuleList(_block(cfg, cfg.outer_attention_window) for _ in range(cfg.n_layers_in_coda))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.emb_scale = math.sqrt(cfg.n_embd)
        # RoPE cos/sin (1, block_size, 1, D/2, 2), fp32 on every device and under every cast (see `_apply`).
        self.register_buffer("rope", self._exact_rope(self.wte.weight.device), persistent=False)
        # Hook points, handed in from outside (the network imports neither inference nor training):
        self.stage_runner: StageRunner | None = None  # a faster runner for some cached calls (the fused CPU decode)
        self.fused_decode = True  # offer cached calls to `stage_runner` (False: always the eager modules)
        self.recurrence = Recurrence()  # how the core loop runs (training hands in checkpointed / fused ones)
        self.stage_observer: Callable[[str], None] | None = None  # told "prelude", "core", "coda" as each stage runs,
        #                                                            by any path (the first-use weight check)

    def _exact_rope(self, device: torch.device) -> Tensor:
        return rope_table(self.cfg.head_dim, self.cfg.block_size, self.cfg.rope_base).to(device)

    def reset_rope(self) -> None:
        """Recompute the exact fp32 RoPE table on the embedding's device (e.g. after loading weights on meta)."""
        self.rope = self._exact_rope(self.wte.weight.device)

    def _apply(self, fn: Any, recurse: bool = True) -> RecurrentDepthModel:
        """Every `.to()`, `.bfloat16()`, `.half()`, `.cuda()` and `to_empty()` runs through here: the RoPE table
        follows the move but is recomputed in fp32, so a cast never rounds cos/sin (bf16 would be off by ~2e-3) and
        `to_empty` never leaves it uninitialised."""
        super()._apply(fn, recurse)
        if self.rope.device.type != "meta":
            self.rope = self._exact_rope(self.rope.device)
        return self

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, num_steps: int | Sequence[int] | Tensor | None = None,
                input_states: Tensor | None = None, init_scale: float = 1.0, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: SequenceCache | None = None) -> tuple[Tensor, Tensor]:
        """The paper's order: e = Prelude(embed(x)); s = Core^r(s0, e); (hidden, latents) = decode(s).

        num_steps: recurrence count r, or (n_no_grad, n_grad) (see `parse_num_steps`); None: `mean_recurrence`.
        input_states: s0 (B, T, d), else drawn with std scaled by `init_scale`. cache: read after its stored
        positions and extended by these T tokens. Returns hidden (B, T, d) for the LM head and latents ln_f(s_r).
        """
        n_no_grad, n_grad = parse_num_steps(num_steps, self.cfg.mean_recurrence)
        past = cache.get_seq_length() if cache is not None else 0
        ctx = self.attention_context(input_ids, attention_mask, position_ids, cache, past)
        e = self.embed(input_ids, ctx)
        state = self.initial_state(e, init_scale) if input_states is None else _given_state(input_states, e)
        state = self.recur(state, e, n_no_grad, n_grad, ctx)
        hidden, latents = self.decode(state, ctx)
        if cache is not None:
            cache.commit(input_ids.shape[1])
        return hidden, latents

    # ------------------------------------------------------------------------------------------------ stages
    def embed(self, input_ids: Tensor, ctx: AttentionContext) -> Tensor:
        """Token ids (B, T) -> prelude output e (B, T, d), the input re-injected at every recurrence."""
        x = self.wte(input_ids) * self.emb_scale
        return self._blocks(self.prelude, "prelude", x, ctx)

    def initial_state(self, e: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """s0 like e: truncated normal (std sqrt(2/(5d)) * init_scale, cut at ±3σ) times sqrt(d); zeros if scale 0."""
        std = self.cfg.init_values["std"] * init_scale
        if std <= 0:
            return torch.zeros_like(e)
        x = torch.empty_like(e)
        nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return x * self.emb_scale

    def core_step(self, state: Tensor, e: Tensor, step: int, ctx: AttentionContext) -> Tensor:
        """One recurrence: s_{i+1} = Core(Adapter(concat[s_i, e])); `step` is i (0-based), naming cache slots."""
        if self.stage_observer is not None:
            self.stage_observer("core")
        if self._runner_takes(state, ctx, self.core_block):
            return self._run_core(state, e, step, 1, ctx)
        x = self.adapter(torch.cat([state, e], dim=-1))
        return self._eager_blocks(self.core_block, "core", x, ctx, step)

    def core_steps(self, state: Tensor, e: Tensor, first_step: int, num_steps: int, ctx: AttentionContext) -> Tensor:
        """`num_steps` recurrences from step `first_step`, under the caller's grad mode: one call of the stage runner
        when it takes them (cached CPU inference), else the steps of `self.recurrence`."""
        if num_steps > 0 and self._runner_takes(state, ctx, self.core_block):
            if self.stage_observer is not None:
                self.stage_observer("core")
            return self._run_core(state, e, first_step, num_steps, ctx)
        return self.recurrence.steps(self, state, e, first_step, num_steps, ctx)

    def recur(self, state: Tensor, e: Tensor, n_no_grad: int, n_grad: int, ctx: AttentionContext,
              first_step: int = 0) -> Tensor:
        """n_no_grad recurrences without autograd, then n_grad with it (truncated backprop through depth), as
        `self.recurrence` runs them."""
        return self.recurrence.recur(self, state, e, n_no_grad, n_grad, ctx, first_step)

    def decode(self, state: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        """Final state s_r -> (hidden y = ln_f(Coda(ln_f(s_r))), latents z = ln_f(s_r))."""
        z = self.ln_f(state)
        return self.ln_f(self._blocks(self.coda, "coda", z, ctx)), z

    # ------------------------------------------------------------------------------------------ stage runners
    def _runner_takes(self, x: Tensor, ctx: AttentionContext, blocks: nn.ModuleList) -> bool:
        """Whether the handed-in stage runner takes this stage's call (only cached calls are offered to it)."""
        runner = self.stage_runner
        return runner is not None and self.fused_decode and ctx.cache is not None and runner.applicable(x, ctx, blocks)

    def _run_core(self, state: Tensor, e: Tensor, first_step: int, num_steps: int, ctx: AttentionContext) -> Tensor:
        assert self.stage_runner is not None  # checked by _runner_takes
        return self.stage_runner.run_blocks(self.core_block, "core", state, ctx, first_step, self.cfg.n_heads,
                                            self.cfg.norm_eps, e=e, adapter=self.adapter.weight, num_steps=num_steps)

    def _blocks(self, blocks: nn.ModuleList, part: str, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Run the prelude's or the coda's blocks: by the stage runner when it takes the call, else eagerly."""
        if self.stage_observer is not None:
            self.stage_observer(part)
        if self._runner_takes(x, ctx, blocks):
            assert self.stage_runner is not None
            return self.stage_runner.run_blocks(blocks, part, x, ctx, 0, self.cfg.n_heads, self.cfg.norm_eps)
        return self._eager_blocks(blocks, part, x, ctx)

    @staticmethod
    def _eager_blocks(blocks: nn.ModuleList, part: str, x: Tensor, ctx: AttentionContext, step: int = 0) -> Tensor:
        for j, block in enumerate(blocks):
            x = block(x, LayerKey(part, j, step), ctx)
        return x

    # ------------------------------------------------------------------------------------------ attention
    def attention_context(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                          position_ids: Tensor | None = None, cache: KVStore | None = None,
                          past_length: int = 0) -> AttentionContext:
        """RoPE rows and mask for T new tokens after `past_length` cached ones.

        attention_mask: (B, past_length + T) with 1 for real tokens, 0 for padding (left padding expected).
        Positions count real tokens only, so a left-padded row sees the positions it would see alone.
        """
        B, T = input_ids.shape
        S = past_length + T
        device = input_ids.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_length, S, device=device)[None]
        if int(position_ids.max()) >= self.cfg.block_size:
            raise ValueError(f"position {int(position_ids.max())} exceeds block_size {self.cfg.block_size}")
        rope = self.rope[0, position_ids]  # (B or 1, T, 1, D/2, 2)
        mask = None
        if padded or (T > 1 and past_length > 0):
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past_length)  # (T, S)
            mask = causal[None, None].expand(B, 1, T, S)
            if padded:
                if attention_mask.shape != (B, S):
                    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
                mask = mask & attention_mask.bool()[:, None, None, :]
                eye = torch.zeros(T, S, dtype=torch.bool, device=device)
                eye[:, past_length:] = torch.eye(T, dtype=torch.bool, device=device)
                mask = mask | eye  # padded queries see themselves: no fully-masked row
        ctx = AttentionContext(rope=rope, mask=mask, cache=cache)
        if cache is None:  # uncached forwards (training) run the eager blocks, which all read the factors: make them
            ctx.rope_factors()  # here, before a compiled block asks (no recompile when they appear); decode: lazily
        return ctx


def _given_state(input_states: Tensor, e: Tensor) -> Tensor:
    """A caller's s0, checked against e's shape and copied in e's dtype (the recurrence never writes into it)."""
    if input_states.shape != e.shape:
        raise ValueError(f"input_states has shape {tuple(input_states.shape)}, expected {tuple(e.shape)}")
    return input_states.to(e.dtype).clone()


def parse_num_steps(num_steps: int | Sequence[int] | Tensor | None, default: int) -> tuple[int, int]:
    """Map the reference's `num_steps` forms onto (no-grad steps, grad steps).

    None -> (0, default); int r -> (0, r): r recurrences under the caller's grad mode; (n, k) -> n without
    autograd then k with it (truncated backprop). Negative or non-integer depths raise ValueError.
    """
    if num_steps is None:
        return 0, default
    if isinstance(num_steps, Tensor):
        num_steps = num_steps.reshape(-1).tolist()
    if isinstance(num_steps, Sequence) and not isinstance(num_steps, str):
        values = list(num_steps)
        if len(values) == 1:
            values = [0, values[0]]
        if len(values) != 2:
            raise ValueError(f"num_steps must be an int or a pair (n_no_grad, n_grad), got {num_steps!r}")
    else:
        values = [0, num_steps]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
            raise ValueError(f"num_steps must hold integers, got {num_steps!r}")
        if v < 0:
            raise ValueError(f"num_steps must be non-negative (recurrence depth), got {num_steps!r}")
    return int(values[0]), int(values[1])
