"""Building blocks of the network: RMSNorm, interleaved-pair RoPE, attention with `qk_bias`, gated MLP, and the
sandwich block. Shapes: B batch, T query tokens, S key tokens, H heads, D head dim, d model width.

Attention reads its keys and values through an optional `KVStore` (a Protocol; the caches that implement it live in
`recurrent_depth.inference.cache`, above this layer): the network does not know how caches share or compress slots,
it only names the layer invocation it is computing.
Without a cache or mask, fp32 attention on the CPU runs the package's causal kernel (`recurrent_depth.kernels`:
exact, about twice as fast as SDPA's CPU kernel forward and backward at a few hundred tokens); elsewhere SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recurrent_depth import kernels


class LayerKey(NamedTuple):
    """One attention-layer invocation: `part` in {"prelude", "core", "coda"}, physical `layer` index within the part,
    and recurrence `step` (0-based; always 0 outside the core)."""

    part: str
    layer: int
    step: int = 0


class KVStore(Protocol):
    """What attention needs from a KV cache."""

    def update(self, key: LayerKey, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k, v (B, H, T, D) for the current positions; return all keys and values (B, H, S, D) visible at this
        invocation and a bool validity mask (B, 1, 1, S) of stored positions (None: all valid)."""
        ...


class SequenceCache(KVStore, Protocol):
    """A KV store that also counts the positions it holds: what a whole forward reads and extends."""

    def get_seq_length(self) -> int:
        """How many positions are stored (the new tokens' positions start there)."""
        ...

    def commit(self, n_tokens: int) -> None:
        """Record that the forward which just ran stored `n_tokens` new positions."""
        ...


@dataclass
class AttentionContext:
    """Per-forward attention inputs shared by every layer.

    rope: (B or 1, T, 1, D/2, 2) cos/sin rows for the query positions.
    mask: (B, 1, T, S) bool (True = attend) or None, meaning plain causal attention over the T tokens themselves.
    cache: where keys and values are read and written, or None.
    """

    rope: Tensor
    mask: Tensor | None = None
    cache: KVStore | None = None
    _factors: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)
    fused: dict = field(default_factory=dict, init=False, repr=False)  # per-forward scratch of the fused decode

    def rope_factors(self) -> tuple[Tensor, Tensor]:
        """(C, S), each (B or 1, T, 1, 1, D/2, 2), so that pairs rotate as x * C + x.flip(-1) * S: the same
        products and sums as rotating each pair (x0 cos - x1 sin, x1 cos + x0 sin) (bit-identical), computed once per
        forward instead of once per layer."""
        if self._factors is None:
            cos, sin = self.rope[..., 0], self.rope[..., 1]  # (., T, 1, D/2)
            self._factors = (torch.stack([cos, cos], dim=-1).unsqueeze(2),
                             torch.stack([-sin, sin], dim=-1).unsqueeze(2))
        return self._factors


def rope_table(head_dim: int, length: int, base: float) -> Tensor:
    """cos/sin table (1, length, 1, head_dim/2, 2) for interleaved-pair rotary embeddings (Huginn's `freqs_cis`).

    Always fp32 and always computed on the CPU (whatever the default device), so every model, device and saved
    checkpoint holds bit-for-bit the table the reference computes."""
    cpu = torch.device("cpu")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=cpu)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=cpu), inv_freq)  # (length, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]  # (1, length, 1, D/2, 2)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), in fp32 and cast back before the weight multiply (as the reference)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the fused kernel gives the same bits in fp32 (one op instead of seven)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head causal attention with a fused `Wqkv`, a learned bias on q and k added before RoPE."""

    def __init__(self, n_embd: int, n_heads: int, qk_bias: bool = True, window: int = 0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, n_embd // n_heads
        self.window = window  # 0: every earlier position; w > 0: the last w positions only (own included)
        self.Wqkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, n_heads, self.head_dim)) if qk_bias else None

    def forward(self, x: Tensor, key: LayerKey, ctx: AttentionContext) -> Tensor:
        B, T, _ = x.shape
        qkv = self.Wqkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # (B, T, 2, H, D), (B, T, H, D)
        if self.qk_bias is not None:
            qk = qk + self.qk_bias[:, 0]  # (2, H, D): q and k biases, before RoPE
        rot_c, rot_s = ctx.rope_factors()
        pairs = qk.float().unflatten(-1, (-1, 2))  # (B, T, 2, H, D/2, 2), RoPE in fp32
        q, k = (pairs * rot_c + pairs.flip(-1) * rot_s).flatten(-2).type_as(x).unbind(dim=2)
        # CPU fp32 q, k and v (under bf16 autocast v stays bf16 while RoPE made q, k fp32): our causal kernel
        if (ctx.mask is None and ctx.cache is None and not self.window and v.dtype == q.dtype
                and kernels.attention_applies(q)):
            return self.proj(kernels.causal_attention(q, k, v).view(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = ctx.mask
        if ctx.cache is not None:
            k, v, valid = ctx.cache.update(key, k, v)  # (B, H, S, D)
            if valid is not None:
                if mask is None and T > 1:
                    mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
                mask = valid if mask is None else mask & valid
                mask = _keep_diagonal(mask, T)
        if self.window:
            band = _band(T, k.shape[2], self.window, x.device)
            mask = band if mask is None else mask & band
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1 and k.shape[2] == T)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)


def _band(T: int, S: int, window: int, device: torch.device) -> Tensor:
    """(T, S) bool: the T queries are the last T of S positions; each sees the keys at most window - 1 before it
    and none after it (the causal mask, cut to a window)."""
    q = torch.arange(S - T, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _keep_diagonal(mask: Tensor, T: int) -> Tensor:
    """Let each query see its own key (the last T keys), so that no row is fully masked (NaN in softmax)."""
    S = mask.shape[-1]
    eye = torch.zeros(T, S, dtype=torch.bool, device=mask.device)
    eye[:, S - T:] = torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask | eye


class GatedMLP(nn.Module):
    """proj(SiLU(gate) * up) with a fused `fc` producing [gate | up]."""

    def __init__(self, n_embd: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * intermediate_size, bias=False)
        self.proj = nn.Linear(intermediate_size, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = norm_2(attn(norm_1(x)) + x); x = norm_4(mlp(norm_3(x)) + x): the residual stream is re-normalised."""

    def __init__(self, n_embd: int, n_heads: int, intermediate_size: int, eps: float, qk_bias: bool,
                 window: int = 0) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(n_embd, eps)
        self.attn = Attention(n_embd, n_heads, qk_bias, window)
        self.norm_2 = RMSNorm(n_embd, eps)
        self.norm_3 = RMSNorm(n_embd, eps)
        self.mlp = GatedMLP(n_embd, intermediate_size)
        self.norm_4 = RMSNorm(n_embd, eps)

    def forward(self, x: Tensor, key: LayerKey, ctx: AttentionContext) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), key, ctx) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)
