"""A faster training recurrence for `runtime.compile`: the whole core step (adapter + every core block) as one
torch.compile graph, with rearrangements that change no value beyond float reassociation.

    install_fused_recurrence(model)      # model.transformer.recurrence now runs the fused, compiled step

1. The adapter reads concat[s, e] (d + d -> d); its e half, e @ A_e^T, is the same at every recurrence, so it is
   computed once per forward (with autograd: its gradient is summed over the steps, then one product back) and each
   step only multiplies s by A_s. The concat copy disappears too.
2. RoPE rotates interleaved pairs (x[2i], x[2i+1]) of every head; a flip over pairs of two compiles to scalar code
   on CPU (the rotation's backward most of all). Here the rows of `Wqkv` (and the q/k bias) that produce q and k are
   read in the order [even dims | odd dims] of every head, so that RoPE works on two contiguous halves (vectorised)
   with the same products and sums. Attention scores are dot products over the head dim, and q and k share the
   order, so only the order of that sum changes. v and the output keep their layout.
3. On the CPU, the q/k bias, RoPE and attention are one op of the package's kernels
   (`recurrent_depth.kernels.rope_attention`) on the (B, T, 3, H, D) view of the projection: it rotates each
   head's q and k into a small buffer inside the op (no rotated copy of the whole q and k, no transposes), attends
   with only the keys each block of queries can see, and in backward writes the projection's gradient in one piece
   (the rotation undone, the bias gradient summed on the way). Elsewhere (a GPU, no compiler): bias and RoPE as
   tensor operations, then SDPA.

No parameter changes shape or layout: the permuted views are taken inside the graph's forward (once per forward, not
per step), and autograd routes their gradients back to the checkpoint's parameters.

The fused path covers what training runs: fp32, no KV cache, no padding mask, causal attention over the tokens
themselves, no autocast. Anything else (evaluation with padding, bf16 autocast on a GPU, a cache) falls back to
the model's own recurrence. Inference never goes through here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recurrent_depth import kernels
from recurrent_depth.model.model import Recurrence


def _pair_order(n_heads: int, head_dim: int) -> Tensor:
    """Row order of Wqkv's q and k parts that lists each head's even dims, then its odd dims."""
    half = torch.arange(0, head_dim, 2)
    per_head = torch.cat([half, half + 1])  # (D,)
    heads = (torch.arange(n_heads)[:, None] * head_dim + per_head).reshape(-1)  # (H*D,)
    n = n_heads * head_dim
    return torch.cat([heads, heads + n, torch.arange(2 * n, 3 * n)])  # q, k permuted; v as is


class FusedCore(nn.Module):
    """The core recurrence of a `RecurrentDepthModel`, computed from its own parameters (holds no state of its own
    beyond an index buffer): `forward(state, ep, cos, sin, weights)` is one recurrence."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.t = [transformer]  # a list: not a submodule (no parameters registered twice)
        cfg = transformer.cfg
        self.n_heads, self.head_dim, self.d = cfg.n_heads, cfg.head_dim, cfg.n_embd
        self.eps = cfg.norm_eps
        # fp32 on the CPU: bias, RoPE and attention as the package's one op (`kernels.rope_attention`); else SDPA
        self.cpu_attention = transformer.wte.weight.device.type == "cpu" and kernels.available()
        self.register_buffer("order", _pair_order(cfg.n_heads, cfg.head_dim), persistent=False)

    # ---------------------------------------------------------------------------------- once per forward
    def prepare(self, e: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor, list[tuple]]:
        """(ep = e A_e^T, cos, sin (1 or B, T, 1, D/2), per-block weights with Wqkv rows and qk bias in pair order)."""
        t = self.t[0]
        ep = F.linear(e, t.adapter.weight[:, self.d:])
        cos, sin = rope[..., 0].contiguous(), rope[..., 1].contiguous()  # (., T, 1, D/2); contiguous: vectorised
        weights = []
        for block in t.core_block:
            attn = block.attn
            wqkv = attn.Wqkv.weight.index_select(0, self.order.to(attn.Wqkv.weight.device))
            bias = None
            if attn.qk_bias is not None:  # (2, 1, H, D) -> pair order within every head
                b = attn.qk_bias
                bias = torch.cat([b[..., 0::2], b[..., 1::2]], dim=-1)[:, 0]  # (2, H, D)
            weights.append((block.norm_1.weight, wqkv, bias, attn.proj.weight, block.norm_2.weight,
                            block.norm_3.weight, block.mlp.fc.weight, block.mlp.proj.weight, block.norm_4.weight))
        return ep, cos, sin, weights

    # ------------------------------------------------------------------------------------- one recurrence
    def forward(self, state: Tensor, ep: Tensor, cos: Tensor, sin: Tensor, weights: list[tuple],
                adapter_s: Tensor) -> Tensor:
        x = F.linear(state, adapter_s) + ep
        for w in weights:
            x = self._block(x, cos, sin, *w)
        return x

    def _block(self, x: Tensor, cos: Tensor, sin: Tensor, n1: Tensor, wqkv: Tensor, bias: Tensor | None,
               wproj: Tensor, n2: Tensor, n3: Tensor, wfc: Tensor, wmlp: Tensor, n4: Tensor) -> Tensor:
        B, T, d = x.shape
        H, D, eps = self.n_heads, self.head_dim, self.eps
        h = F.rms_norm(x, (d,), n1, eps)
        qkv = F.linear(h, wqkv).view(B, T, 3, H, D)
        if self.cpu_attention:  # bias, RoPE and attention in one op: rotated q, k stay inside it
            y = kernels.rope_attention(qkv, bias, cos.squeeze(2), sin.squeeze(2)).view(B, T, d)
            return self._rest(x, y, wproj, n2, n3, wfc, wmlp, n4)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]
        if bias is not None:
            qk = qk + bias
        a, b = qk[..., : D // 2], qk[..., D // 2:]  # even dims, odd dims (B, T, 2, H, D/2)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (., T, 1, 1, D/2)
        qk = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
        q, k = qk.unbind(dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=T > 1).transpose(1, 2).reshape(B, T, d)
        return self._rest(x, y, wproj, n2, n3, wfc, wmlp, n4)

    def _rest(self, x: Tensor, y: Tensor, wproj: Tensor, n2: Tensor, n3: Tensor, wfc: Tensor, wmlp: Tensor,
              n4: Tensor) -> Tensor:
        """The block after attention: output projection, residual, norms, gated MLP."""
        d, eps = self.d, self.eps
        x = F.rms_norm(F.linear(y, wproj) + x, (d,), n2, eps)
        gate, up = F.linear(F.rms_norm(x, (d,), n3, eps), wfc).chunk(2, dim=-1)
        return F.rms_norm(F.linear(F.silu(gate) * up, wmlp) + x, (d,), n4, eps)


def _applies(state: Tensor, ctx) -> bool:
    """Whether the fused step computes what the model would: fp32, no cache, no mask, no autocast."""
    return (state.dtype == torch.float32 and ctx.mask is None and ctx.cache is None and state.shape[1] > 1
            and not torch.is_autocast_enabled(state.device.type))


class FusedRecurrence(Recurrence):
    """The model's `recurrence` when the fused step is installed: `step` is one FusedCore call (compiled or not) and
    `recur` runs the whole loop through it when `_applies`, else the `fallback` recurrence (which also runs
    `steps`, the path inference takes). `checkpointed` recomputes each step with autograd in backward."""

    def __init__(self, core: FusedCore, step: nn.Module, fallback: Recurrence, checkpoint_steps: bool) -> None:
        self.core, self.fused_step, self.fallback, self.checkpointed = core, step, fallback, checkpoint_steps

    def steps(self, model: nn.Module, state: Tensor, e: Tensor, first_step: int, num_steps: int, ctx) -> Tensor:
        return self.fallback.steps(model, state, e, first_step, num_steps, ctx)

    def recur(self, model: nn.Module, state: Tensor, e: Tensor, n_no_grad: int, n_grad: int, ctx,
              first_step: int = 0) -> Tensor:
        if not _applies(state, ctx):
            return self.fallback.recur(model, state, e, n_no_grad, n_grad, ctx, first_step)
        ep, cos, sin, weights = self.core.prepare(e, ctx.rope)
        args = (ep, cos, sin, weights, model.adapter.weight[:, : self.core.d])
        with torch.no_grad():
            for _ in range(n_no_grad):
                state = self.fused_step(state, *args)
        for _ in range(n_grad):
            if self.checkpointed and torch.is_grad_enabled():
                state = checkpoint(self.fused_step, state, *args, use_reentrant=False)
            else:
                state = self.fused_step(state, *args)
        return state


def install_fused_recurrence(model: nn.Module, compile: bool = True, checkpoint_steps: bool = False) -> FusedCore:
    """Hand `model.transformer` a `FusedRecurrence` (idempotent); `compile` wraps the step in torch.compile (one
    graph with autograd, one without), `checkpoint_steps` recomputes each step with autograd in backward, as it does
    when the model's recurrence was already checkpointed (which stays the fallback). Returns the FusedCore."""
    t = model.transformer
    if t.cfg.core_attention_window:
        raise ValueError("runtime.compile's fused core step attends to every earlier position; a model with "
                         "core_attention_window > 0 trains with runtime.compile: false")
    if isinstance(t.recurrence, FusedRecurrence):
        return t.recurrence.core
    core = FusedCore(t).to(t.wte.weight.device)
    # On CPU the graph's host code runs as C++ too (cpp_wrapper): measured about 2% off a `small` training step
    options = {"cpp_wrapper": True} if t.wte.weight.device.type == "cpu" else None
    step = torch.compile(core, dynamic=False, options=options) if compile else core
    t.recurrence = FusedRecurrence(core, step, t.recurrence, checkpoint_steps or t.recurrence.checkpointed)
    return core
