"""Next-token selection: greedy argmax, or sampling with temperature, top-k, top-p and min-p filters.

The filters apply in the reference's order (temperature -> softmax -> top-k -> top-p -> min-p -> renormalise) and
draw with an explicit `torch.Generator`, so a seeded generator reproduces a sample exactly. top-p keeps the smallest
set of most likely tokens whose mass reaches p (the token that crosses p stays in; the reference drops it).

    sampler = Sampler(do_sample=True, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    next_ids = sampler(logits)          # logits (B, V) fp32 -> (B,) long

`ban_beyond(logits, n)` gives vocabulary rows >= n probability 0: an embedding padded past its tokenizer
(Huginn's 65536 rows) has rows no tokenizer can decode; every engine applies it before exit criteria and sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def ban_beyond(logits: Tensor, vocab_limit: int | None) -> Tensor:
    """logits (..., V) with every entry at vocabulary index >= vocab_limit set to the dtype's lowest finite value
    (None, or >= V: unchanged). Its probability is exactly 0, as with -inf, but log-probabilities stay finite, so
    the KL exit criterion's 0 * (log p - log q) is 0, not NaN (which would never exit). Writes in place: callers
    pass freshly computed logits."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        if vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1 (the tokenizer's size), got {vocab_limit}")
        logits[..., vocab_limit:] = torch.finfo(logits.dtype).min
    return logits


@dataclass
class Sampler:
    """Greedy unless `do_sample`; top_k / top_p / min_p of None (or 0) are off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature is None or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 and finite (use do_sample=False for greedy), got "
                             f"{self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(-1)

    def probs(self, logits: Tensor) -> Tensor:
        """The filtered, renormalised distribution (B, V) that `__call__` samples from."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_k:
            kth = torch.topk(probs, min(self.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if self.top_p:
            sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
            remove = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p  # mass before this token already > p
            remove[:, 0] = False  # always keep the most likely token
            probs = probs.masked_fill(remove.scatter(-1, order, remove), 0.0)
        if self.min_p:
            probs = torch.where(probs < self.min_p * probs.max(dim=-1, keepdim=True).values,
                                torch.zeros_like(probs), probs)
        return probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-10)
