"""Run a prompt through the recurrence one step at a time and keep what every intermediate state says.

`trace_latents(model, input_ids, num_steps)` calls the model's stages itself (attention context, prelude,
initial state, then `core_step` r times) and decodes every intermediate state s_t through
ln_f -> coda -> ln_f -> lm_head, as an early exit at step t would. Nothing is cached: each step is a full pass over
the prompt, which is what a prompt-sized inspection can afford, and every position's state at step t sees the
other positions' states at the same step (the model's own uncached forward).

The exit criteria are the shared strategy objects of `recurrent_depth.inference.exit` (the reference's definitions;
`CRITERIA` is its registry less `none`). They decide per batch row from the last position; here every prompt
position is given to them as a row of its own (state (T, 1, d), logits (T, V)), so each token gets the values
and the exit decision that the criterion would compute if that token were the one being generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from recurrent_depth.inference.exit import ADAPTIVE_CRITERIA, ExitCriterion, make_exit_criterion

CRITERIA: tuple[str, ...] = ADAPTIVE_CRITERIA  # every registered criterion that can exit (all but `none`)


@dataclass(frozen=True)
class LatentTrace:
    """What a prompt's latent states did over `num_steps` recurrences (all tensors on the CPU).

    R = num_steps, T = prompt length, d = width, k = top_k. Per-step tensors have R rows: row t-1 is step t
    (after t core applications); `states` has R+1 rows, row 0 being the initial state s_0.

    input_ids: (T,) the prompt.
    states: (R+1, T, d) fp32 raw core outputs s_0..s_R (before ln_f).
    top_ids, top_probs: (R, T, k) the logit lens: the k most likely next tokens decoded from s_t, and their
        probabilities.
    values: criterion name -> (R, T) the quantity it compares at step t (NaN where undefined, e.g. the cosine
        with a zero s_0).
    exits: criterion name -> (R, T) bool, whether it would stop at step t.
    thresholds: criterion name -> the threshold it used.
    init_scale: the scale of the random initial state (0: s_0 = 0).
    """

    input_ids: Tensor
    states: Tensor
    top_ids: Tensor
    top_probs: Tensor
    values: dict[str, Tensor]
    exits: dict[str, Tensor]
    thresholds: dict[str, float]
    init_scale: float

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.states.shape[1]


def default_criteria(thresholds: dict[str, float] | None = None) -> list[ExitCriterion]:
    """Every adaptive criterion (`CRITERIA`), with its default threshold unless `thresholds` names one."""
    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - set(CRITERIA)
    if unknown:
        raise ValueError(f"unknown exit criterion {sorted(unknown)[0]!r}; choose from {', '.join(CRITERIA)}")
    return [make_exit_criterion(name, thresholds.get(name)) for name in CRITERIA]


def _as_prompt(input_ids: Tensor) -> Tensor:
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be one prompt, shape (T,) or (1, T); got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("the prompt is empty: there is no token to inspect")
    return input_ids.long()


@torch.no_grad()
def trace_latents(model: torch.nn.Module, input_ids: Tensor, num_steps: int, init_scale: float = 1.0,
                  top_k: int = 5, generator: torch.Generator | None = None,
                  criteria: Sequence[ExitCriterion] | None = None) -> LatentTrace:
    """Iterate the core `num_steps` times on one prompt and record every intermediate state and its decoding.

    model: a `RecurrentDepthForCausalLM` (or any object with `.transformer` exposing `attention_context`, `embed`,
        `initial_state`, `core_step`, `decode`, and an `lm_head`).
    input_ids: (T,) or (1, T) token ids.
    num_steps: recurrence count r >= 1 (core applications).
    init_scale: scale of the random initial state s_0 (the reference's default 1.0; 0.0 gives s_0 = 0).
    top_k: how many tokens the logit lens keeps per step.
    generator: a seeded generator makes the random s_0 reproducible.
    criteria: exit criteria to evaluate at every step (default: `default_criteria()`).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1 (recurrence count), got {num_steps!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    prompt = _as_prompt(input_ids)
    limit = getattr(getattr(model, "config", None), "block_size", None)
    if limit is not None and prompt.numel() > limit:
        raise ValueError(f"the prompt has {prompt.numel()} tokens, more than the model's block_size of {limit}: "
                         "shorten it")
    criteria = list(criteria) if criteria is not None else default_criteria()
    t = model.transformer
    device = next(iter(model.parameters())).device
    ids = prompt.to(device)[None]  # (1, T)
    ctx = t.attention_context(ids)
    e = t.embed(ids, ctx)
    state = t.initial_state(e, init_scale, generator)
    states = [state[0].float().cpu()]
    memory: list[Tensor] | None = None
    top_ids, top_probs = [], []
    values: dict[str, list[Tensor]] = {c.name: [] for c in criteria}
    exits: dict[str, list[Tensor]] = {c.name: [] for c in criteria}
    for i in range(num_steps):
        prev_rows = state[0].float()[:, None]  # (T, 1, d): one row per position
        state = t.core_step(state, e, i, ctx)
        hidden, _ = t.decode(state, ctx)
        logits = model.lm_head(hidden).float()[0]  # (T, V)
        if memory is None:
            memory = [c.init(prev_rows, logits.shape[-1]) for c in criteria]
        rows = state[0].float()[:, None]  # (T, 1, d)
        for k, c in enumerate(criteria):
            exit_now, memory[k], value = c.check(memory[k], rows, logits if c.needs_logits else None)
            values[c.name].append(value.float().cpu())
            exits[c.name].append(exit_now.cpu())
        p_top, i_top = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        top_ids.append(i_top.cpu())
        top_probs.append(p_top.cpu())
        states.append(state[0].float().cpu())
    return LatentTrace(input_ids=prompt.cpu(), states=torch.stack(states), top_ids=torch.stack(top_ids),
                       top_probs=torch.stack(top_probs), values={k: torch.stack(v) for k, v in values.items()},
                       exits={k: torch.stack(v) for k, v in exits.items()},
                       thresholds={c.name: float(c.threshold) for c in criteria}, init_scale=float(init_scale))
