"""Infrastructure applied TO the model from outside: activation checkpointing per recurrence, compile, DDP, FSDP2.

    apply_activation_checkpointing(model)          # model.transformer.recurrence: recompute each step in backward
    train_model = parallelize(model, "fsdp", rt)   # fully_shard per block, then the root
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from recurrent_depth.model.layers import AttentionContext
from recurrent_depth.model.model import Recurrence
from recurrent_depth.runtime import Runtime
from recurrent_depth.training.fused import FusedRecurrence, install_fused_recurrence


class CheckpointedRecurrence(Recurrence):
    """The eager core loop with each recurrence that runs with autograd checkpointed: only its input state is kept,
    the step is recomputed in backward (Huginn's `per-iteration`); no-grad iterations run unchanged."""

    checkpointed = True

    def step(self, model: nn.Module, state: Tensor, e: Tensor, i: int, ctx: AttentionContext) -> Tensor:
        if torch.is_grad_enabled():
            return checkpoint(model.core_step, state, e, i, ctx, use_reentrant=False)
        return model.core_step(state, e, i, ctx)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Hand the model a `CheckpointedRecurrence` (idempotent); a fused recurrence keeps its place and checkpoints
    its steps, with the checkpointed loop as its fallback."""
    t = model.transformer
    if isinstance(t.recurrence, FusedRecurrence):
        t.recurrence.checkpointed = True
        t.recurrence.fallback = CheckpointedRecurrence()
    elif not isinstance(t.recurrence, CheckpointedRecurrence):
        t.recurrence = CheckpointedRecurrence()


def compile_blocks(model: nn.Module, fuse_core: bool = True) -> None:
    """torch.compile every sandwich block in place (per block, as torchtitan does: the recurrence loop stays in
    Python, each block's kernels are fused; autograd and no-grad iterations get one graph each).

    With `fuse_core` (not for FSDP, whose sharded parameters only gather inside each block's own forward), the
    recurrence also runs the whole core step (adapter + all core blocks) as one compiled graph with the adapter's
    input half hoisted out of the loop and RoPE on contiguous halves (`recurrent_depth.training.fused`); the
    per-block graphs remain for what that path does not cover (masks, caches, autocast). Activation checkpointing,
    applied before or after, carries over to the fused steps."""
    t = model.transformer
    for block in [*t.prelude, *t.core_block, *t.coda]:
        block.compile()
    if fuse_core:
        install_fused_recurrence(model)


def parallelize(model: nn.Module, mode: str, rt: Runtime) -> nn.Module:
    """The module to call for training: the model itself (`none`, or a single process), DDP, or FSDP2 (in place:
    `fully_shard` on every sandwich block, then on the root for embedding, adapter, norm and head)."""
    if mode == "none" or not rt.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        t = model.transformer
        for block in [*t.prelude, *t.core_block, *t.coda]:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown runtime.parallel {mode!r}; choose none, ddp or fsdp")


@contextlib.contextmanager
def gradient_sync(train_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (DDP `no_sync`, FSDP2 requires_gradient_sync)."""
    if enabled:
        if hasattr(train_model, "set_requires_gradient_sync"):
            train_model.set_requires_gradient_sync(True)
        yield
        return
    if hasattr(train_model, "no_sync"):
        with train_model.no_sync():
            yield
    elif hasattr(train_model, "set_requires_gradient_sync"):
        train_model.set_requires_gradient_sync(False)
        yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (works for plain, DDP and FSDP2/DTensor parameters); returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
