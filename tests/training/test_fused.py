"""The fused training recurrence (`runtime.compile`'s core path) computes what the model's own recurrence computes:
same loss and gradients up to float reassociation, truncated backprop and activation checkpointing kept, and the
model's own path (bit for bit) wherever the fused one does not apply."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.training.fused import _pair_order, install_fused_recurrence
from recurrent_depth.training.parallel import apply_activation_checkpointing, compile_blocks


def _model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    cfg = RecurrentDepthConfig.from_name("debug", n_embd=32, n_heads=2, intermediate_size=48,
                                         n_layers_in_recurrent_block=2)
    model = RecurrentDepthForCausalLM(cfg).train()
    with torch.no_grad():  # a non-zero q/k bias, so that its reordering is exercised
        for block in model.transformer.core_block:
            block.attn.qk_bias.normal_(std=0.5)
    return model


def _batch(model: RecurrentDepthForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    return ids, torch.randn(2, 12, model.config.n_embd, generator=g)


def _run(model: RecurrentDepthForCausalLM, num_steps=(3, 2)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, s0 = _batch(model)
    model.zero_grad(set_to_none=True)
    loss = model(ids, num_steps=num_steps, input_states=s0, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_pair_order_lists_even_then_odd_dims_of_each_head() -> None:
    order = _pair_order(n_heads=2, head_dim=4).tolist()
    assert order == [0, 2, 1, 3, 4, 6, 5, 7,  # q: head 0 (even, odd), head 1
                     8, 10, 9, 11, 12, 14, 13, 15,  # k
                     16, 17, 18, 19, 20, 21, 22, 23]  # v unchanged


@pytest.mark.parametrize("num_steps", [(3, 2), (0, 3), (4, 0)])
def test_fused_step_matches_the_model_recurrence(num_steps) -> None:
    """Loss and every gradient (uncompiled fused step) against the model's own truncated recurrence."""
    model = _model()
    fused = copy.deepcopy(model)
    install_fused_recurrence(fused, compile=False)
    if num_steps[1] == 0:  # no recurrence with autograd: compare the forward (evaluation-style, no grad)
        ids, s0 = _batch(model)
        with torch.no_grad():
            a = model(ids, num_steps=num_steps, input_states=s0, labels=ids).loss
            b = fused(ids, num_steps=num_steps, input_states=s0, labels=ids).loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    _assert_same(_run(model, num_steps), _run(fused, num_steps))


def test_fused_step_keeps_truncation_and_activation_checkpointing() -> None:
    """With per-recurrence checkpointing the fused path recomputes each step in backward (autograd keeps only the
    step inputs) and still gives the model's gradients; the no-grad steps add nothing to what autograd saves."""
    model = _model()
    fused = copy.deepcopy(model)
    apply_activation_checkpointing(fused)
    install_fused_recurrence(fused, compile=False, checkpoint_steps=True)
    reference = _run(model, (2, 2))
    _assert_same(reference, _run(fused, (2, 2)))

    sizes: dict[int, int] = {}
    for n in (0, 6):
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel())  # noqa: B023
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _run(fused, (n, 2))
        sizes[n] = sum(saved)
    assert sizes[0] == sizes[6]


def _saved_numel(model: RecurrentDepthForCausalLM) -> int:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(model, (1, 4))
    return sum(saved)


def test_activation_checkpointing_composes_with_the_fused_step_in_either_order() -> None:
    """The recurrence is an object the model holds: checkpointing applied after the fused step is installed
    checkpoints the fused steps just as when applied before (what autograd saves is the same, and less than
    without checkpointing); the gradients stay the model's."""
    model = _model()
    before, after, plain = (copy.deepcopy(model) for _ in range(3))
    apply_activation_checkpointing(before)
    install_fused_recurrence(before, compile=False)
    install_fused_recurrence(after, compile=False)
    apply_activation_checkpointing(after)
    install_fused_recurrence(plain, compile=False)
    assert _saved_numel(before) == _saved_numel(after) < _saved_numel(plain)
    _assert_same(_run(model, (1, 4)), _run(after, (1, 4)))


def test_fused_path_falls_back_where_it_does_not_apply() -> None:
    """A padding mask (evaluation batches) runs the model's own recurrence: bit-identical logits."""
    model = _model().eval()
    fused = copy.deepcopy(model)
    install_fused_recurrence(fused, compile=False)
    ids, _ = _batch(model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        a = model(ids, num_steps=3, attention_mask=mask, init_scale=0.0).logits
        b = fused(ids, num_steps=3, attention_mask=mask, init_scale=0.0).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_training_path_matches_eager() -> None:
    """`runtime.compile` (compile_blocks with the fused core, torch.compile'd) against the eager model."""
    model = _model()
    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    start = time.perf_counter()
    _assert_same(_run(model), _run(compiled), rtol=1e-4, atol=1e-5)
    _assert_same(_run(model), _run(compiled), rtol=1e-4, atol=1e-5)  # second step: the warm graphs
    print(f"compiled path: {time.perf_counter() - start:.1f}s including compilation")
