"""Per-token convergence: how far each latent state moves per step, and when each exit criterion would stop.

The criteria are those of `recurrent_depth.inference.exit` (the reference implementation's), evaluated
for every prompt position on its own by `trace_latents`. For each position and step t = 1..R they compare:

| criterion | value at step t | exits when |
|---|---|---|
| `kl` | KL(p_{t-1} ‖ p_t), p_0 uniform | value < thr |
| `minp-kl` | the same after min-p filtering (p < 0.1·max -> 1/V, renormalised) | value < thr |
| `entropy-diff` | abs(H(p_t) − H(p_{t-1})), H_0 = 100 | value < thr |
| `latent-diff` | ‖s_t − s_{t-1}‖ / ‖s_t‖ (raw core states) | value < thr |
| `cosine` | 1 − cos(s_t, s_{t-1}) | value < thr |
| `argmax-stability` | consecutive steps with the same argmax (0 at step 1) | value >= thr |

The exit step of a position is the first step at which its criterion says stop; a position that never stops is
given R (all the compute there was) and `exited = False`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from recurrent_depth.inference.exit import EXIT_CRITERIA
from recurrent_depth.inspection.trace import CRITERIA, LatentTrace

# criteria whose values are step counts, exiting when they reach the threshold (the others: when below it)
COUNT_CRITERIA = frozenset(name for name, c in EXIT_CRITERIA.items() if c.exits_at_least)


@dataclass(frozen=True)
class Convergence:
    """Per-token distances and exit steps for one trace (R steps, T positions).

    distance: (R, T) ‖s_t − s_{t-1}‖, the plain step length of the latent state.
    relative: (R, T) ‖s_t − s_{t-1}‖ / ‖s_t‖, the step length relative to the state's size.
    values: criterion -> (R, T) the compared quantity at step t (row t-1); NaN where undefined (a zero state).
    thresholds: criterion -> the threshold used.
    exit_step: criterion -> (T,) int64, the first step in 1..R at which the criterion would stop, R if none.
    exited: criterion -> (T,) bool, whether it stopped within R steps.
    """

    distance: Tensor
    relative: Tensor
    values: dict[str, Tensor]
    thresholds: dict[str, float]
    exit_step: dict[str, Tensor]
    exited: dict[str, Tensor]

    @property
    def num_steps(self) -> int:
        return self.distance.shape[0]

    @property
    def criteria(self) -> list[str]:
        return list(self.values)


def first_exit(fires: Tensor) -> tuple[Tensor, Tensor]:
    """(R, T) bool 'stop at step t' -> ((T,) first such step in 1..R, R where none; (T,) whether there was one)."""
    exited = fires.any(0)
    step = fires.int().argmax(0) + 1  # argmax returns the first maximum, i.e. the first True
    R = fires.shape[0]
    return torch.where(exited, step, torch.full_like(step, R)).long(), exited


def convergence(trace: LatentTrace) -> Convergence:
    """Distances between consecutive states and the step at which each traced exit criterion would stop, per token."""
    exit_step, exited = {}, {}
    for name, fires in trace.exits.items():
        exit_step[name], exited[name] = first_exit(fires)
    distance = (trace.states[1:] - trace.states[:-1]).norm(dim=-1)
    return Convergence(distance=distance, relative=relative_step_length(trace), values=dict(trace.values),
                       thresholds=dict(trace.thresholds), exit_step=exit_step, exited=exited)


def relative_step_length(trace: LatentTrace) -> Tensor:
    """(R, T) ‖s_t − s_{t-1}‖ / ‖s_t‖ per position (the latent-diff quantity), from the states alone."""
    s = trace.states
    return (s[1:] - s[:-1]).norm(dim=-1) / s[1:].norm(dim=-1)


def select_positions(trace: LatentTrace, count: int = 2) -> list[int]:
    """The `count` most and `count` least converged positions, most converged first.

    Converged means a small last relative step ‖s_R − s_{R-1}‖ / ‖s_R‖. Positions where it is undefined are
    skipped; a short prompt gives fewer positions (never duplicates).
    """
    last = relative_step_length(trace)[-1]
    order = [int(i) for i in torch.argsort(last) if torch.isfinite(last[i])]
    return list(dict.fromkeys(order[:count] + order[::-1][:count]))


def resolve_positions(picks: Sequence[int | str], token_texts: Sequence[str]) -> list[int]:
    """User picks -> positions: an int (negative counts from the end) or a token's text (first match, stripped)."""
    T = len(token_texts)
    positions = []
    for pick in picks:
        if isinstance(pick, int) or pick.lstrip("-").isdigit():
            i = int(pick)
            if not -T <= i < T:
                raise ValueError(f"token position {i} is outside the prompt's {T} tokens")
            positions.append(i % T)
            continue
        matches = [i for i, text in enumerate(token_texts) if text == pick or text.strip() == pick.strip()]
        if not matches:
            shown = ", ".join(repr(t) for t in token_texts[:40])
            raise ValueError(f"no token {pick!r} in the prompt; its tokens are: {shown}")
        positions.append(matches[0])
    return list(dict.fromkeys(positions))


__all__ = ["CRITERIA", "COUNT_CRITERIA", "Convergence", "convergence", "first_exit", "relative_step_length",
           "resolve_positions", "select_positions"]
