"""Training depth samplers: how many recurrences a training step runs, and how many of them get gradients.

A sampler returns (n_no_grad, n_grad): the model runs n_no_grad iterations without autograd, then n_grad with it
(truncated backprop through depth). Draws are seeded by the training step, so every rank of a distributed run
draws the same depth (FSDP deadlocks when ranks run different depths) and a resumed run redraws the same depths.

    sampler = PoissonLogNormalFilling(mean_recurrence=32, backprop_depth=8)
    n, k = sampler.sample(step=1000)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch

SEED_N = 514229  # Huginn's per-step seed offset for the depth draw


class DepthSampler(Protocol):
    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(n_no_grad, n_grad) for a training step; `step` seeds the draw, else `generator` or the global RNG."""
        ...


def _generator(step: int | None, generator: torch.Generator | None, seed: int) -> torch.Generator | None:
    if step is not None:
        return torch.Generator().manual_seed(seed + step)
    return generator


@dataclass(frozen=True)
class PoissonLogNormalFilling:
    """Huginn's `poisson-lognormal-filling`: total steps p = Poisson(tau) + 1, tau ~ LogNormal(ln(mean) - s^2/2, s),
    the last min(p, backprop_depth) with gradients. E[p] = mean_recurrence + 1."""

    mean_recurrence: int = 32
    backprop_depth: int = 8
    sigma: float = 0.5
    seed: int = SEED_N

    def __post_init__(self) -> None:
        if self.mean_recurrence < 1:
            raise ValueError(f"mean_recurrence must be >= 1, got {self.mean_recurrence}")
        if self.backprop_depth < 1:
            raise ValueError(f"backprop_depth must be >= 1, got {self.backprop_depth}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        g = _generator(step, generator, self.seed)
        mu = math.log(self.mean_recurrence) - self.sigma**2 / 2
        tau = torch.exp(mu + self.sigma * torch.randn(1, generator=g))
        p = int(torch.poisson(tau, generator=g).item()) + 1
        k = min(self.backprop_depth, p)
        return p - k, k


@dataclass(frozen=True)
class FixedDepth:
    """Always `num_steps` recurrences, the last min(num_steps, backprop_depth) with gradients (an ablation)."""

    num_steps: int = 32
    backprop_depth: int = 8

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.backprop_depth < 1:
            raise ValueError(f"num_steps and backprop_depth must be >= 1, got {self.num_steps}, {self.backprop_depth}")

    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        k = min(self.num_steps, self.backprop_depth)
        return self.num_steps - k, k


@dataclass(frozen=True)
class NonRecurrent:
    """The core runs once, with gradients: a plain (non-recurrent) transformer baseline."""

    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        return 0, 1


@dataclass(frozen=True)
class DepthWarmup:
    """A depth curriculum around another sampler: during the first `warmup_steps` steps, step t runs at most
    1 + floor(t * mean_recurrence / warmup_steps) recurrences in all (r = 1 at the start, the sampler's mean at the
    end of the ramp), its last min(total, backprop_depth) with gradients; afterwards the sampler's own draw. A pure
    function of the step, like every draw here (resumed and distributed runs agree)."""

    inner: DepthSampler
    warmup_steps: int
    mean_recurrence: int
    backprop_depth: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 1 or self.mean_recurrence < 1 or self.backprop_depth < 1:
            raise ValueError(f"warmup_steps, mean_recurrence and backprop_depth must be >= 1, got "
                             f"{self.warmup_steps}, {self.mean_recurrence}, {self.backprop_depth}")

    def sample(self, step: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        n, k = self.inner.sample(step, generator)
        if step is None or step >= self.warmup_steps:
            return n, k
        total = min(n + k, 1 + step * self.mean_recurrence // self.warmup_steps)
        k = min(total, self.backprop_depth)
        return total - k, k


# The one list of sampler names: the training config's `depth.sampler` is typed with it, make_sampler maps it.
SamplerName = Literal["poisson-lognormal-filling", "fixed", "non-recurrent"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)


def make_sampler(name: str, mean_recurrence: int, backprop_depth: int, num_steps: int = 0,
                 warmup_steps: int = 0) -> DepthSampler:
    """The sampler called `name` (one of SAMPLERS); `num_steps` is the fixed sampler's total recurrence count (0:
    mean_recurrence); warmup_steps > 0 wraps it in a `DepthWarmup` ramp (a no-op for non-recurrent, always r = 1)."""
    if warmup_steps:
        inner = make_sampler(name, mean_recurrence, backprop_depth, num_steps)
        return DepthWarmup(inner, warmup_steps, num_steps or mean_recurrence, backprop_depth)
    if name == "poisson-lognormal-filling":
        return PoissonLogNormalFilling(mean_recurrence, backprop_depth)
    if name == "fixed":
        return FixedDepth(num_steps or mean_recurrence, backprop_depth)
    if name == "non-recurrent":
        return NonRecurrent()
    raise ValueError(f"unknown depth sampler {name!r}; choose one of {list(SAMPLERS)}")
