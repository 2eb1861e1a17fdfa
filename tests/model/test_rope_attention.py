"""The package's RoPE + causal attention op (`recurrent_depth.kernels.rope_attention`, csrc/causal_attention.cpp),
which the fused training step uses on the CPU: bias, rotation and attention against the same arithmetic written with
tensor operations and SDPA in float64; gradients of the projection and of the bias; per-row positions; strided
input; torch.compile; bad arguments; and that the fused step calls it once per core block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from recurrent_depth import kernels
from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.training.fused import install_fused_recurrence


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    assert kernels.available(), f"the kernel library did not build: {kernels.load_error()}"


def _inputs(B: int, T: int, H: int, D: int, rows: int, seed: int = 0):
    """qkv (B, T, 3, H, D), bias (2, H, D), cos and sin (rows, T, D/2) of arbitrary angles."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, generator=g) * 1.5
    bias = torch.randn(2, H, D, generator=g) * 0.5
    angle = torch.rand(rows, T, D // 2, generator=g) * 6.3
    return qkv, bias, angle.cos().contiguous(), angle.sin().contiguous()


def _reference(qkv, bias, cos, sin):
    """Bias, pair-order RoPE ([a c - b s, b c + a s] on each head's two halves) and causal SDPA, as tensor ops."""
    D = qkv.shape[-1]
    qk, v = qkv[:, :, :2], qkv[:, :, 2]
    if bias is not None:
        qk = qk + bias
    a, b = qk[..., : D // 2], qk[..., D // 2:]
    c, s = cos[:, :, None, None], sin[:, :, None, None]
    q, k = torch.cat([a * c - b * s, b * c + a * s], dim=-1).unbind(2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


def _run(fn, qkv, bias, cos, sin, grad):
    """fn's output and the gradients of qkv (and bias) for the upstream gradient `grad`."""
    qkv = qkv.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(qkv, bias, cos, sin)
    grads = torch.autograd.grad(out, [qkv] + ([] if bias is None else [bias]), grad)
    return [out, *grads]


@pytest.mark.parametrize("B,T,H,D,rows,with_bias", [(1, 2, 1, 8, 1, True), (2, 63, 3, 16, 1, True),
                                                    (2, 65, 2, 32, 2, True), (3, 130, 2, 64, 1, False),
                                                    (2, 200, 4, 64, 2, True)])
def test_matches_float64_tensor_ops_with_gradients(B, T, H, D, rows, with_bias) -> None:
    qkv, bias, cos, sin = _inputs(B, T, H, D, rows)
    bias = bias if with_bias else None
    grad = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    ours = _run(kernels.rope_attention, qkv, bias, cos, sin, grad)
    assert ours[0].shape == (B, T, H, D) and ours[0].is_contiguous()
    assert ours[1].shape == qkv.shape and (not with_bias or ours[2].shape == bias.shape)
    exact = _run(_reference, qkv.double(), None if bias is None else bias.double(), cos.double(), sin.double(),
                 grad.double())
    fp32 = _run(_reference, qkv, bias, cos, sin, grad)  # the same ops in fp32: the rounding error to expect
    for name, a, ref, f in zip(["out", "dqkv", "dbias"], ours, exact, fp32):
        err, expected = (a.double() - ref).abs().max().item(), (f.double() - ref).abs().max().item()
        assert err <= 2 * expected + 1e-6, (name, err, expected)
        assert err < 1e-3 * max(1.0, ref.abs().max().item()), (name, err)


def test_strided_projection_and_per_row_positions() -> None:
    """A view of a wider projection gives the contiguous input's result; each row uses its own cos/sin row."""
    qkv, bias, cos, sin = _inputs(2, 70, 2, 16, rows=2)
    wide = torch.randn(2, 70, 3 * 2 * 16 + 7)
    wide[..., : 3 * 2 * 16] = qkv.flatten(2)
    view = wide[..., : 3 * 2 * 16].unflatten(-1, (3, 2, 16))
    assert not view.is_contiguous()
    torch.testing.assert_close(kernels.rope_attention(view, bias, cos, sin),
                               kernels.rope_attention(qkv, bias, cos, sin), rtol=0, atol=1e-6)
    both = kernels.rope_attention(qkv, bias, cos, sin)
    for row in range(2):
        alone = kernels.rope_attention(qkv[row:row + 1], bias, cos[row:row + 1], sin[row:row + 1])
        torch.testing.assert_close(both[row:row + 1], alone, rtol=0, atol=1e-6)
    other = kernels.rope_attention(qkv, bias, cos[[1, 0]].contiguous(), sin[[1, 0]].contiguous())
    assert not torch.allclose(other, both)  # the rows' positions matter


@pytest.mark.parametrize("with_bias", [True, False])
def test_traced_by_torch_compile_with_its_gradients(with_bias) -> None:
    qkv, bias, cos, sin = _inputs(2, 40, 2, 16, rows=1)
    inputs = [qkv.requires_grad_()] + ([bias.requires_grad_()] if with_bias else [])

    def f(x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.rope_attention(x, b, cos, sin).sin().sum()

    eager = torch.autograd.grad(f(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(*inputs), inputs)
    for a, b in zip(compiled, eager):  # inductor's fused backward sums in another order: 1.3e-6 measured (AMD EPYC)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda x, b, c, s: (x[:, :, :2], b, c, s), "qkv must be \\(B, T, 3, H, D\\)"),
    (lambda x, b, c, s: (x.double(), b, c, s), "float32 CPU"),
    (lambda x, b, c, s: (x[..., :3], b, c[..., :1], s[..., :1]), "head dim must be even"),
    (lambda x, b, c, s: (x, b[:1], c, s), "bias must be"),
    (lambda x, b, c, s: (x, b, c[:, :-1], s), "cos and sin must be"),
    (lambda x, b, c, s: (x, b, c, s.repeat(3, 1, 1)), "cos and sin must be"),
])
def test_bad_arguments_are_named(change, message) -> None:
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rdepth.rope_attention(*change(*_inputs(2, 8, 2, 4, rows=1)), 0.5)


def test_fused_training_step_calls_it_once_per_core_block(monkeypatch) -> None:
    """The fused core step (runtime.compile's path, here uncompiled) takes the op in every core block of every
    recurrence, and gives the model's own loss."""
    torch.manual_seed(0)
    cfg = RecurrentDepthConfig.from_name("debug", n_embd=32, n_heads=2, intermediate_size=48)
    model = RecurrentDepthForCausalLM(cfg).train()
    fused = copy.deepcopy(model)
    install_fused_recurrence(fused, compile=False)
    calls = []
    real = kernels.rope_attention
    monkeypatch.setattr(kernels, "rope_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    a = model(ids, labels=ids, num_steps=(2, 1), init_scale=0.0).loss
    b = fused(ids, labels=ids, num_steps=(2, 1), init_scale=0.0).loss
    assert len(calls) == 3 * cfg.n_layers_in_recurrent_block
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
