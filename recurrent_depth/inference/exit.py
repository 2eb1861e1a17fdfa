"""Per-token adaptive exit: when to stop iterating the recurrent core for a token.

An exit criterion is a small strategy object (`ExitCriterion`). It holds no per-batch state: everything it remembers
between recurrence steps lives in a per-row `memory` tensor that the caller owns and can index by rows, so a
scheduler can evaluate any subset of rows, drop rows, or add rows from another batch at any time.

    crit = make_exit_criterion("kl", 5e-4)          # or parse_exit_spec("kl:5e-4")
    mem = crit.init(s0, vocab_size)                   # (B, ...) per-row memory
    for n in range(1, num_steps + 1):
        s = core_step(s, ...)                         # (B, T, d) raw core output after n steps
        logits = head(coda(s))[:, -1] if crit.needs_logits else None    # (B, V) fp32, last position
        exit_now, mem, values = crit.check(mem, s, logits)
        # exit_now: (B,) bool; mem: the new (B, ...) memory; values: (B,) the compared quantity

Row subsets: for rows `idx`, call `crit.check(mem[idx], s[idx], logits[idx])` and write the returned memory back
with `mem[idx] = new_mem` (memories are single tensors with rows first). `valid` (B, T) marks real (non-padding)
positions for criteria that average over positions (latent-diff, cosine), so a left-padded row decides as it would
alone.

Semantics follow the reference implementation's exit evaluators (`raven_modeling_minimal.py` of the Huginn
release): the quantity at step n is compared with the one at the previous *checked* step (the initial memory before
the first check); a row exits when the quantity is below the threshold (argmax-stability: at least the threshold).
A threshold of 0 never exits, for every criterion. Default thresholds (each class's `default_threshold`, collected in
`DEFAULT_THRESHOLDS`) are the reference's `"auto"` values except `kl`, which uses the paper's 5e-4 (the reference's
code later moved to 1e-3).

`EXIT_CRITERIA` is the one registry of names: every CLI flag, server field, help text and error message that lists
the criteria reads it (`ADAPTIVE_CRITERIA`: all but `none`). `parse_exit_spec` parses the one spelling the CLI uses,
`NAME[:THRESHOLD]`.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class ExitCriterion(Protocol):
    """Decides, row by row, whether a token's recurrence may stop after the current step.

    name: registry name; threshold: the exit threshold; needs_logits: whether `check` reads the logits of the last
    position (the caller must then run coda + head at every checked step).
    """

    name: str
    threshold: float
    needs_logits: bool

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        """Initial per-row memory (rows first) for initial states `state` (B, T, d)."""
        ...

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(exit (B,) bool, new memory (B, ...), compared values (B,)) for the current step.

        state: raw core output (B, T, d); logits: (B, V) fp32 at the last position (None unless needs_logits);
        valid: (B, T) bool of real positions (None: all)."""
        ...


def _masked_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over positions (B, T) -> (B,), counting only valid positions."""
    if valid is None:
        return x.mean(dim=-1)
    w = valid.to(x.dtype)
    return (x * w).sum(dim=-1) / w.sum(dim=-1).clamp(min=1)


class _Base:
    name = "base"
    needs_logits = False
    default_threshold: float = 0.0
    exits_at_least = False  # True: exits when the value reaches the threshold (a count), not when below it

    def __init__(self, threshold: float | None = None) -> None:
        value = self.default_threshold if threshold is None else threshold
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"exit threshold for {self.name!r} must be a finite number >= 0, got {threshold!r}")
        self.threshold = float(value)

    def _below(self, values: Tensor) -> Tensor:
        return values < self.threshold

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold:g})"


class NoExit(_Base):
    """Never exits: every token runs the full depth."""

    name = "none"

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        return state.new_zeros(state.shape[0])

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        zeros = state.new_zeros(state.shape[0])
        return zeros.bool(), memory, zeros


class LatentDiffExit(_Base):
    """||s_n - s_prev|| / ||s_n|| over the hidden dim, averaged over positions; exit when below the threshold."""

    name = "latent-diff"
    default_threshold = 0.03

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        return state.detach().clone()

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        values = _masked_mean((state - memory).norm(dim=-1) / state.norm(dim=-1), valid)
        return self._below(values), state.detach().clone(), values


class CosineExit(_Base):
    """1 - cos(s_n, s_prev), averaged over positions; exit when below the threshold."""

    name = "cosine"
    default_threshold = 1e-3

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        return state.detach().clone()

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        cos = (state * memory).sum(dim=-1) / state.norm(dim=-1) / memory.norm(dim=-1)
        values = (1 - _masked_mean(cos, valid)).clamp(min=0)  # rounding can push cos above 1
        return self._below(values), state.detach().clone(), values


class EntropyDiffExit(_Base):
    """|H(p_n) - H(p_prev)| of the next-token distribution (previous entropy starts at 100)."""

    name = "entropy-diff"
    default_threshold = 1e-3
    needs_logits = True

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        return torch.full((state.shape[0],), 100.0, device=state.device)

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        probs = F.softmax(_need(logits, self.name), dim=-1)
        entropy = -torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        values = (entropy - memory).abs()
        return self._below(values), entropy, values


class KLExit(_Base):
    """KL(p_prev || p_n) of the next-token distributions (previous starts uniform); the paper's criterion."""

    name = "kl"
    default_threshold = 5e-4
    needs_logits = True

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        return torch.full((state.shape[0], vocab_size), -math.log(vocab_size), device=state.device)

    def _log_probs(self, logits: Tensor) -> Tensor:
        return F.log_softmax(logits.float(), dim=-1)

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        log_probs = self._log_probs(_need(logits, self.name))
        values = F.kl_div(log_probs, memory, reduction="none", log_target=True).sum(dim=-1).clamp(min=0)
        return self._below(values), log_probs, values


class MinPKLExit(KLExit):
    """KL after min-p filtering: probabilities below 0.1 * max are set to 1/V, then renormalised."""

    name = "minp-kl"
    default_threshold = 1e-5

    def _log_probs(self, logits: Tensor) -> Tensor:
        probs = F.softmax(logits.float(), dim=-1)
        small = probs < 0.1 * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(small, torch.full_like(probs, 1.0 / probs.shape[-1]), probs)
        return (probs / probs.sum(dim=-1, keepdim=True)).log()


class ArgmaxStabilityExit(_Base):
    """Number of consecutive checked steps with an unchanged argmax; exit when it reaches the threshold (0: never)."""

    name = "argmax-stability"
    default_threshold = 5
    exits_at_least = True
    needs_logits = True

    def init(self, state: Tensor, vocab_size: int) -> Tensor:
        mem = torch.zeros(state.shape[0], 2, dtype=torch.long, device=state.device)  # (previous argmax, count)
        mem[:, 0] = -1
        return mem

    def check(self, memory: Tensor, state: Tensor, logits: Tensor | None,
              valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        current = _need(logits, self.name).argmax(dim=-1)
        count = torch.where(current == memory[:, 0], memory[:, 1] + 1, torch.zeros_like(memory[:, 1]))
        exit_now = count >= self.threshold if self.threshold > 0 else torch.zeros_like(count, dtype=torch.bool)
        return exit_now, torch.stack([current, count], dim=1), count.float()


def _need(logits: Tensor | None, name: str) -> Tensor:
    if logits is None:
        raise ValueError(f"exit criterion {name!r} needs the logits of the current step (needs_logits=True)")
    return logits


EXIT_CRITERIA: dict[str, type[_Base]] = {c.name: c for c in (
    KLExit, MinPKLExit, EntropyDiffExit, LatentDiffExit, CosineExit, ArgmaxStabilityExit, NoExit)}
ADAPTIVE_CRITERIA: tuple[str, ...] = tuple(name for name in EXIT_CRITERIA if name != NoExit.name)
DEFAULT_THRESHOLDS: dict[str, float] = {name: c.default_threshold for name, c in EXIT_CRITERIA.items()}


def make_exit_criterion(name: str | ExitCriterion | None, threshold: float | None = None) -> ExitCriterion:
    """The criterion registered under `name` with `threshold` (None: its documented default).

    An object that already implements `ExitCriterion` is returned as is. Unknown names raise ValueError naming the
    valid ones."""
    if name is None:
        return NoExit()
    if not isinstance(name, str):
        if isinstance(name, ExitCriterion):
            return name
        raise TypeError(f"exit criterion must be a name or an ExitCriterion, got {type(name).__name__}")
    if name not in EXIT_CRITERIA:
        raise ValueError(f"unknown exit criterion {name!r}; valid: {', '.join(EXIT_CRITERIA)}")
    return EXIT_CRITERIA[name](threshold)


def parse_exit_spec(spec: str) -> ExitCriterion:
    """'kl:5e-4' -> KLExit(5e-4); 'kl' -> KLExit with its default threshold; 'none' -> NoExit.

    The one parser of the `NAME[:THRESHOLD]` spelling; a ValueError names the spec, the problem and the valid names."""
    name, sep, value = spec.strip().partition(":")
    expected = f"expected NAME[:THRESHOLD] with NAME one of {', '.join(EXIT_CRITERIA)}"
    if name not in EXIT_CRITERIA:
        raise ValueError(f"exit {spec!r}: unknown exit criterion {name!r}; {expected}")
    if not sep:
        return make_exit_criterion(name)
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"exit {spec!r}: threshold {value!r} is not a number ({expected})") from None
    return make_exit_criterion(name, threshold)
