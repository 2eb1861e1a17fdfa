"""Truncated backprop through depth: gradients flow through the last k iterations only; activation memory does not
depend on the number of no-grad iterations; per-iteration activation checkpointing leaves gradients unchanged."""

from __future__ import annotations

import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.training.parallel import apply_activation_checkpointing


def _model(seed: int = 0) -> RecurrentDepthForCausalLM:
    torch.manual_seed(seed)
    return RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).train()


def _grads(model: RecurrentDepthForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _recorder(sizes: list[int]):
    """A saved-tensor pack hook that records the size of everything autograd keeps for backward."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    return pack


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    s0 = torch.randn(2, 12, 32, generator=g)
    return ids, s0


def test_gradients_only_through_the_last_k_iterations() -> None:
    """(n, k) from s0 equals k grad steps started from the (detached) state after n steps, and the no-grad steps
    leave no autograd history."""
    ids, s0 = _batch()
    model = _model()
    model(ids, num_steps=(5, 2), input_states=s0, labels=ids).loss.backward()
    truncated = _grads(model)

    model.zero_grad(set_to_none=True)
    t = model.transformer
    with torch.no_grad():
        ctx = t.attention_context(ids)
        e = t.embed(ids, ctx)
        mid = t.recur(s0, e, 5, 0, ctx)
    assert not mid.requires_grad
    # the cache-free core does not use the step index, so 2 steps from `mid` equal steps 6-7 of the long run
    model(ids, num_steps=(0, 2), input_states=mid, labels=ids).loss.backward()
    restarted = _grads(model)
    assert truncated.keys() == restarted.keys()
    for name in truncated:
        torch.testing.assert_close(truncated[name], restarted[name], rtol=1e-5, atol=1e-7, msg=name)


def test_more_no_grad_steps_change_the_result_but_not_the_graph() -> None:
    """The number of tensors autograd saves depends on k only: memory does not grow with the sampled depth."""
    ids, s0 = _batch()
    model = _model()
    counts, losses = [], []
    for n in (1, 20):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t):
            loss = model(ids, num_steps=(n, 3), input_states=s0, labels=ids).loss
        counts.append((len(saved), sum(saved)))
        losses.append(loss.item())
    assert counts[0] == counts[1]
    assert losses[0] != losses[1]


def test_activation_checkpointing_gives_the_same_gradients_and_saves_less() -> None:
    ids, s0 = _batch()
    plain, ckpt = _model(), _model()
    apply_activation_checkpointing(ckpt)
    apply_activation_checkpointing(ckpt)  # idempotent
    sizes = []
    for model in (plain, ckpt):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t):
            loss = model(ids, num_steps=(2, 4), input_states=s0, labels=ids).loss
        loss.backward()
        sizes.append(sum(saved))
    a, b = _grads(plain), _grads(ckpt)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert sizes[1] < sizes[0] / 2
