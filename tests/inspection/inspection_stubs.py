"""Stub models whose latent states converge at steps the tests choose.

They expose the stage methods `trace_latents` calls (`attention_context`, `embed`, `initial_state`, `core_step`,
`decode`) and an identity `lm_head` (V = d), so the logits are the state itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAGE_PROMPT = "Hi <b>&</b>!\n2+2=4 </script>"  # what the end-to-end run inspects (HTML-hostile on purpose)
PAGE_STEPS = 8


class _Stages:
    """Stage methods over a state of width d; `step_fn(state, step)` is the core."""

    def __init__(self, T: int, d: int, step_fn) -> None:  # noqa: ANN001
        self.T, self.d, self.step_fn = T, d, step_fn

    def attention_context(self, input_ids: Tensor) -> None:
        return None

    def embed(self, input_ids: Tensor, ctx: None) -> Tensor:
        return torch.zeros(1, input_ids.shape[1], self.d)

    def initial_state(self, e: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        if init_scale == 0:
            return torch.zeros_like(e)
        return torch.randn(e.shape, generator=generator) * init_scale

    def core_step(self, state: Tensor, e: Tensor, step: int, ctx: None) -> Tensor:
        return self.step_fn(state, step)

    def decode(self, state: Tensor, ctx: None) -> tuple[Tensor, Tensor]:
        return state, state


class StubModel(nn.Module):
    """A 'model' with the stage methods and an identity head: logits = state."""

    def __init__(self, T: int, d: int, step_fn) -> None:  # noqa: ANN001
        super().__init__()
        self.transformer = _Stages(T, d, step_fn)
        self.lm_head = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(d))


def settling_stub(settle: list[int], d: int = 16) -> StubModel:
    """Position p jumps between one-hot states (a new argmax and entropy every step) until step settle[p], then
    stays exactly at its final state: every state/logit criterion stops at settle[p] + 1, argmax-stability (5)
    at settle[p] + 5."""
    T = len(settle)
    noise = 0.01 * torch.randn(T, d, generator=torch.Generator().manual_seed(1))

    def step_fn(state: Tensor, step: int) -> Tensor:
        t = step + 1
        rows = []
        for p, k in enumerate(settle):
            if t < k:
                rows.append((3 + t % 3) * nn.functional.one_hot(torch.tensor((p + 3 * t) % d), d).float())
            else:  # the final argmax differs from the one at step k - 1
                target = (p + 3 * (k - 1) + 1) % d
                rows.append(6 * nn.functional.one_hot(torch.tensor(target), d).float() + noise[p])
        return torch.stack(rows)[None]

    return StubModel(T, d, step_fn)


def contraction_stub(rates: list[float], d: int = 8) -> tuple[StubModel, Tensor]:
    """A core that contracts toward a fixed point f_p at rate rates[p]: s <- f + rate * (s - f)."""
    T = len(rates)
    fixed = torch.randn(T, d, generator=torch.Generator().manual_seed(2)) + 1.0
    rho = torch.tensor(rates)[:, None]

    def step_fn(state: Tensor, step: int) -> Tensor:
        return (fixed + rho * (state[0] - fixed))[None]

    return StubModel(T, d, step_fn), fixed
