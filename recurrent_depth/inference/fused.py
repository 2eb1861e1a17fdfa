"""Fused CPU decode: one C++ call per stage (prelude, all core recurrences, coda) for a few new tokens per row.

Batch-1 decoding of a recurrent-depth model is a long chain of tiny operations: at r = 32 a token runs 128 core-layer
calls, each about forty small tensor ops whose dispatch costs more than their arithmetic. `torch.ops.rdepth.blocks`
(recurrent_depth/csrc/fused_blocks.cpp, built by `recurrent_depth.kernels`) runs a whole stage's sandwich blocks in
one call: matrix products of up to 16 rows (4 with bf16 weights) are its own loops over the weights (ATen's GEMM
above), the norms, RoPE, KV write, attention and gating are plain loops. It applies when:

    a stage with at least one block, at most MAX_TOKENS (64) new tokens per row, activations and weights on the CPU
    in fp32, or in bf16 where the library was built with AVX-512 (`kernels.vector_isa()`), no autograd, no module
    hooks, and either the row engine's paged `RowKVCache` (`recurrent_depth.inference.rows`: every decoder, i.e.
    decoding and short prefills, speculative drafting and verification, the rows still iterating under adaptive
    exit, the server), whose pages the op reads and writes in place through each row's page table
    (`torch.ops.rdepth.blocks_paged`), for one or several recurrences a call; or a dense `KVCache`
    (`model(ids, use_cache=True)`, HF `generate` with our cache: `torch.ops.rdepth.blocks`).

Attention windows (`core_attention_window`, `outer_attention_window`: each token sees the last w positions) are the
op's `window` argument, the eager network's band mask. Anything else runs the eager network. The library is built on
first use with the system C++ compiler (`torch.utils.cpp_extension`, cached under ~/.cache/torch_extensions); without
a compiler, or with RDEPTH_FUSED=0 in the environment, decoding stays eager. Results match the eager network to
float rounding (different summation order), not bit for bit; `model.transformer.fused_decode = False` turns the
path off per model.

bf16 models: the op reads the weight matrices and the KV cache as bf16 (widened to fp32 in registers, so they stream
half the bytes of fp32) and computes everything else in fp32: activations, accumulation, norms, RoPE, softmax, and the
state across a call's recurrences. Rounded to bf16 are only the stage's output and the cached keys and values (as the
eager bf16 network stores them), and the inputs of products of more than 4 rows (prompts, batches: ATen's bf16 GEMM,
memory-bound where ours would be FMA-bound). It is therefore closer to the fp32 network on the same (bf16-rounded)
weights than the eager bf16 network, which rounds every activation. Without AVX-512 (F, BW, VL) bf16
models run eagerly: the portable kernel has not been measured to beat PyTorch there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from recurrent_depth.inference.cache import KVCache, RowKVCache
from recurrent_depth.kernels import available, vector_isa
from recurrent_depth.model.layers import AttentionContext, LayerKey


def _weights(blocks: Any) -> list[Tensor]:
    """The op's 9 tensors per block: the matrices as stored (fp32 or bf16), the norm weights and q/k bias in fp32
    (`float()` is the tensor itself in an fp32 model, a copy of d floats per vector in a bf16 one)."""
    out: list[Tensor] = []
    for b in blocks:
        a = b.attn
        bias = a.qk_bias.reshape(2, -1).float() if a.qk_bias is not None else _EMPTY
        out += [b.norm_1.weight.float(), a.Wqkv.weight, bias, a.proj.weight, b.norm_2.weight.float(),
                b.norm_3.weight.float(), b.mlp.fc.weight, b.mlp.proj.weight, b.norm_4.weight.float()]
    return out


_EMPTY = torch.empty(0)


_DTYPES = (torch.float32, torch.bfloat16)
MAX_TOKENS = 64  # longer forwards (long prompts) run eagerly: their attention is better served by SDPA's kernels


def applicable(x: Tensor, ctx: AttentionContext, blocks: Any) -> bool:
    """Whether `run_blocks` may take this call (see the module docstring). Blocks with forward hooks (or global
    module hooks) run eagerly, so that hooks keep firing; an empty stage has nothing to fuse."""
    return (len(blocks) > 0 and x.shape[1] <= MAX_TOKENS and x.dtype in _DTYPES
            and x.device.type == "cpu"
            and blocks[0].attn.Wqkv.weight.dtype == x.dtype and not torch.is_grad_enabled()
            and _store_fits(ctx) and not _hooked(blocks) and available()
            and (x.dtype == torch.float32 or vector_isa() == "avx512"))


def _store_fits(ctx: AttentionContext) -> bool:
    """A `KVCache`, or a `RowKVCache` without a forward mask (the row engine's calls: its store masks each row)."""
    return isinstance(ctx.cache, KVCache) or (isinstance(ctx.cache, RowKVCache) and ctx.mask is None)


def _hooked(blocks: Any) -> bool:
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


def run_blocks(blocks: Any, part: str, x: Tensor, ctx: AttentionContext, step: int, n_heads: int, eps: float,
               e: Tensor | None = None, adapter: Tensor | None = None, num_steps: int = 1) -> Tensor:
    """Run `blocks` (one stage's sandwich blocks) on x (B, T, d) through the fused op; the caller checked
    `applicable`. With `adapter` (and `e`), x is the core's state and the op runs `num_steps` recurrences (steps
    step .. step + num_steps - 1), each the blocks on adapter([x, e]). Cache bookkeeping (slots, holes, validity) is
    the cache's own, as in `KVCache.update`; a `RowKVCache` lends the op its pages (`_run_paged`)."""
    B, T, d = x.shape
    D = d // n_heads
    scratch = ctx.fused
    weights = scratch.get(part)
    if weights is None:  # gathered once per scratch (a forward; a row-engine step): parameters may change between
        weights = scratch[part] = _weights(blocks)
    rope = ctx.rope.reshape(ctx.rope.shape[0], T, D // 2, 2).float().contiguous()
    x = x.contiguous()
    e = None if e is None else e.contiguous()
    if isinstance(ctx.cache, RowKVCache):
        return _run_paged(ctx.cache, blocks, part, x, e, adapter, weights, rope, step, n_heads, eps, num_steps,
                          blocks[0].attn.window)
    cache: KVCache = ctx.cache  # type: ignore[assignment]
    start = cache.seq_len
    S = start + T
    pad = None if ctx.mask is None else ctx.mask[:, 0, :, :S]  # the forward's own mask (padding; causal within the
    #                                                                 new tokens is the op's): (B, T, S)
    like = x.new_empty(()).expand(B, n_heads, T, D)  # the shape of one layer's new keys, for the cache's bookkeeping
    kslots, vslots, masks = [], [], []
    for i in range(step, step + num_steps):
        for j in range(len(blocks)):
            slot = cache.reserve(LayerKey(part, j, i), like)
            kslots.append(slot.k)
            vslots.append(slot.v)
            valid = slot.valid[:S].expand(B, S) if slot.holes else None  # (B, S): positions never written
            if pad is not None:
                valid = pad if valid is None else valid[:, None, :] & pad
            masks.append(_EMPTY if valid is None else valid.contiguous())
    return torch.ops.rdepth.blocks(x, e, adapter, num_steps, weights, kslots, vslots, start, masks, rope, eps,
                                   n_heads, blocks[0].attn.window)


def _run_paged(cache: RowKVCache, blocks: Any, part: str, x: Tensor, e: Tensor | None, adapter: Tensor | None,
               weights: list[Tensor], rope: Tensor, step: int, n_heads: int, eps: float, num_steps: int,
               window: int) -> Tensor:
    """The op over the rows bound in a paged store, reading and writing their pages in place through page tables
    (`RowKVCache.paged`): each row at its own position, recurrence steps and slots as the store bound them; `step` is
    the first bound recurrence this call runs (an offset into the bind, not a row's own step)."""
    kpools, vpools, tables, starts, valid = cache.paged(part, x.shape[0], x.shape[1], step, num_steps)
    return torch.ops.rdepth.blocks_paged(x, e, adapter, num_steps, weights, kpools, vpools, tables, starts, valid,
                                         rope, eps, n_heads, window)


def head(model: Any, hidden: Tensor) -> Tensor | None:
    """fp32 logits (R, V) of hidden (R, d) through the op's matrix-vector kernel for a bf16 CPU model's head and at
    most 4 rows (decoding), else None (the caller runs `model.lm_head`). Why: ATen's bf16 matrix-vector product
    streams about half the GB/s of ours (65536 x 5280, 2 threads: 47 ms against 79-94 ms a token, machine shared);
    the bf16 head is 0.7 GB of the 17 GB a huginn-3.5b token reads at r = 4. The products are exact fp32 sums of
    the bf16 weights times the (bf16) hidden state, where ATen rounds the logits to bf16. fp32 heads keep ATen's
    GEMV (already at the bandwidth bound); hooks on the head or `fused_decode = False` keep the eager head."""
    lm_head = model.lm_head
    weight = lm_head.weight
    if not (weight.dtype == torch.bfloat16 and hidden.dim() == 2 and hidden.shape[0] <= 4  # fp32 heads: first test
            and hidden.dtype == torch.bfloat16 and weight.device.type == "cpu" and hidden.device.type == "cpu"
            and weight.is_contiguous() and lm_head.bias is None and not torch.is_grad_enabled()
            and getattr(model.transformer, "fused_decode", False) and not (lm_head._forward_hooks
                                                                            or lm_head._forward_pre_hooks)
            and available() and vector_isa() == "avx512"):
        return None
    return torch.ops.rdepth.linear(hidden.float().contiguous(), weight)


class FusedRunner:
    """The fused op as a model's `stage_runner` (`RecurrentDepthModel.stage_runner`, a `StageRunner`): handed to the
    network by the code above it, so that the network never imports inference. Looks `applicable` and `run_blocks`
    up at each call (a patched module function is what runs)."""

    def applicable(self, x: Tensor, ctx: AttentionContext, blocks: Any) -> bool:
        return applicable(x, ctx, blocks)

    def run_blocks(self, *args: Any, **kwargs: Any) -> Tensor:
        return run_blocks(*args, **kwargs)
