"""The package's causal attention kernel (`recurrent_depth.kernels`, csrc/causal_attention.cpp) against PyTorch's
scaled-dot-product attention in float64: outputs and gradients, block edges, strided views, threads, torch.compile,
bad arguments, and which calls of the model take it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recurrent_depth import kernels
from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.hf import RecurrentDepthForCausalLM


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    assert kernels.available(), f"the kernel library did not build: {kernels.load_error()}"


def _qkv(B: int, T: int, H: int, D: int, seed: int = 0) -> torch.Tensor:
    """(B, T, 3, H, D): q, k, v as strided views of one tensor, as the model's fused projection gives them."""
    return torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(seed)) * 1.5


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) in, (B, T, H, D) out, PyTorch's causal attention."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("B,T,H,D", [(1, 2, 1, 16), (2, 63, 3, 16), (2, 64, 2, 32), (1, 65, 2, 64),
                                     (2, 200, 4, 64), (1, 129, 1, 8)])
def test_forward_and_gradients_match_float64_sdpa(B, T, H, D) -> None:
    qkv = _qkv(B, T, H, D).requires_grad_()
    out = kernels.causal_attention(*qkv.unbind(2))
    assert out.shape == (B, T, H, D) and out.is_contiguous()
    grad = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    (dqkv,) = torch.autograd.grad(out, qkv, grad)

    ref_in = qkv.detach().double().requires_grad_()
    ref = _sdpa(*ref_in.unbind(2))
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.double())
    fp32_in = qkv.detach().clone().requires_grad_()  # PyTorch's own fp32 kernel: the rounding error to expect
    fp32 = _sdpa(*fp32_in.unbind(2))
    (fp32_grad,) = torch.autograd.grad(fp32, fp32_in, grad)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b).abs().max().item()

    assert err(out, ref) <= 2 * err(fp32, ref) + 1e-6, (err(out, ref), err(fp32, ref))
    assert err(dqkv, ref_grad) <= 2 * err(fp32_grad, ref_grad) + 1e-6, (err(dqkv, ref_grad), err(fp32_grad, ref_grad))
    assert err(out, ref) < 1e-4 and err(dqkv, ref_grad) < 1e-4


def test_future_keys_do_not_reach_a_query() -> None:
    """Changing keys and values after position t changes nothing at or before t (forward and q's gradient)."""
    qkv = _qkv(2, 100, 2, 16)
    changed = qkv.clone()
    changed[:, 70:, 1:] += 5.0  # keys and values of positions 70..99
    a, b = kernels.causal_attention(*qkv.unbind(2)), kernels.causal_attention(*changed.unbind(2))
    assert torch.equal(a[:, :70], b[:, :70])
    assert not torch.allclose(a[:, 70:], b[:, 70:])


def test_contiguous_and_strided_inputs_agree_and_threads_agree() -> None:
    qkv = _qkv(2, 150, 4, 32)
    q, k, v = qkv.unbind(2)
    strided = kernels.causal_attention(q, k, v)
    assert torch.equal(strided, kernels.causal_attention(q.contiguous(), k.contiguous(), v.contiguous()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = kernels.causal_attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(strided, two)  # each (batch, head) is computed whole by one thread


def test_traced_by_torch_compile_with_its_gradient() -> None:
    qkv = _qkv(2, 40, 2, 16).requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        return kernels.causal_attention(*x.unbind(2)).sin().sum()

    (eager,) = torch.autograd.grad(f(qkv), qkv)
    (compiled,) = torch.autograd.grad(torch.compile(f, fullgraph=True)(qkv), qkv)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q[0], k[0], v[0]), "must be \\(B, T, H, D\\)"),
    (lambda q, k, v: (q, k[:, :-1], v), "shapes differ"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "float32 CPU"),
    (lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), "last dim"),
])
def test_bad_arguments_are_named(change, message) -> None:
    q, k, v = _qkv(1, 8, 2, 4).unbind(2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rdepth.causal_attention(*change(q, k, v), 0.5)


def _model() -> RecurrentDepthForCausalLM:
    torch.manual_seed(0)
    cfg = RecurrentDepthConfig.from_name("debug", n_embd=32, n_heads=2, intermediate_size=48)
    model = RecurrentDepthForCausalLM(cfg).train()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "qk_bias") and module.qk_bias is not None:
                module.qk_bias.normal_(std=0.5)
    return model


def test_model_training_forward_takes_the_kernel_and_matches_sdpa(monkeypatch) -> None:
    """A training forward (no cache, no mask, fp32 CPU) runs the kernel in every block; with the kernel switched
    off the model computes the same loss and gradients through SDPA."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(2))
    calls = []
    real = kernels.causal_attention
    monkeypatch.setattr(kernels, "causal_attention", lambda *a: calls.append(1) or real(*a))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, num_steps=(2, 2), init_scale=0.0).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    cfg = model.config
    assert len(calls) == cfg.n_layers_in_prelude + 4 * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
    monkeypatch.setattr(kernels, "attention_applies", lambda q: False)
    calls.clear()
    ref_loss, ref_grads = loss_and_grads()
    assert not calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cached_and_masked_attention_keep_sdpa(monkeypatch) -> None:
    """Decoding with a cache and padded (masked) batches do not go through the kernel."""
    model = _model().eval()
    monkeypatch.setattr(kernels, "causal_attention", lambda *a: pytest.fail("kernel called"))
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        model(ids, num_steps=2, use_cache=True)
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]), num_steps=2)


def test_build_tag_names_environment_and_sources(monkeypatch, tmp_path):
    """Two environments (or two checkouts with other sources) on one machine get separate build folders."""
    import sys

    from recurrent_depth import kernels

    base = kernels.build_tag()
    assert base == kernels.build_tag()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert kernels.build_tag() != base
    monkeypatch.undo()
    src = tmp_path / "fused_blocks.cpp"
    src.write_text(kernels._SOURCES[0].read_text() + "\n// edited\n")
    monkeypatch.setattr(kernels, "_SOURCES", [src, *kernels._SOURCES[1:]])
    assert kernels.build_tag() != base


def test_build_tag_names_the_sources_paths(monkeypatch, tmp_path):
    """Two checkouts of the same sources get separate build folders: torch writes the source paths into the folder's
    build.ninja, so sharing one folder made ninja recompile on every first use of each checkout in turn."""
    from recurrent_depth import kernels

    base = kernels.build_tag()
    copies = []
    for src in kernels._SOURCES:
        copy = tmp_path / src.name
        copy.write_bytes(src.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(kernels, "_SOURCES", copies)
    assert kernels.build_tag() != base


def test_cpu_bf16_autocast_forward_and_backward_run() -> None:
    """Under CPU bf16 autocast the projections give bf16 v while RoPE gives fp32 q and k: the layer must not hand
    that mix to the fp32-only kernel (it raised 'q, k, v must be float32')."""
    from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM

    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, num_steps=2, labels=ids, init_scale=0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_use() -> None:
    """A builder killed mid-build leaves torch's plain `lock` file; the next first use must not wait on it forever."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import _get_build_directory

    from recurrent_depth import kernels

    if not kernels.available():
        pytest.skip(f"kernel library unavailable: {kernels.load_error()}")
    build_dir = Path(_get_build_directory(f"rdepth_kernels_{kernels.build_tag()}", verbose=False))
    (build_dir / "lock").write_text("")  # what a killed build leaves
    repo = Path(__file__).resolve().parents[2]
    code = "from recurrent_depth import kernels; print(kernels.available())"
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    finally:
        (build_dir / "lock").unlink(missing_ok=True)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
    assert "left by a kernel build that did not finish" in result.stderr
