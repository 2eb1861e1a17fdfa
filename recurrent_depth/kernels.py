"""The package's C++ CPU kernels (csrc/), built on first use with the system compiler, and their Python faces.

    available()                      # builds (once per machine, cached under ~/.cache/torch_extensions) and loads
    causal_attention(q, k, v)        # (B, T, H, D) each -> (B, T, H, D); differentiable; torch.compile traces it
    rope_attention(qkv, bias, cos, sin)  # the same after RoPE on q and k, from the fused projection's output

Three ops live in the library: `rdepth::blocks`, the fused decode stage of `recurrent_depth.inference.fused` (fp32
or bf16 weights; `vector_isa()` says whether its matrix-vector kernel has the AVX-512 path that makes bf16 pay);
`rdepth::causal_attention` (+ its backward), the causal self-attention that the model's layers use on the CPU without
a cache or mask: exact softmax per block of 64 query rows against only the keys the block can see, products through
the BLAS that libtorch ships (csrc/causal_attention.cpp); and `rdepth::rope_attention` (+ its backward), the same
attention after the q/k bias and RoPE, on the fused projection, which the compiled training step uses
(`recurrent_depth.training.fused`). Without a compiler, or with RDEPTH_FUSED=0 in the environment, `available()`
is False (the reason in `load_error()`) and callers keep PyTorch's own kernels.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("fused_blocks.cpp", "causal_attention.cpp")]
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "error": None}

# -march=native: the library is built for the machine it runs on; the build folder's name carries a digest of the
# CPU's model and flags, so a home directory shared between different machines never loads a foreign build.
# -fopenmp: ATen's parallel_for is a header template over OpenMP, serial without it.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]


def available() -> bool:
    """Whether the kernel library is (or can be) loaded; builds it on the first call."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            _state["loaded"] = _load()
    return _state["loaded"]


def vector_isa() -> str | None:
    """The vector instruction set the fused op's matrix-vector kernel was built for (-march=native): "avx512"
    (AVX-512 F, BW and VL: bf16 weights widen in registers and stream as many GB/s as fp32) or "portable" (the
    compiler's own vectorisation); None when the library is not loaded."""
    if "isa" not in _state:
        _state["isa"] = str(torch.ops.rdepth.vector_isa()) if available() else None
    return _state["isa"]


def load_error() -> str | None:
    """Why the library could not be loaded (None if it loaded or was not tried)."""
    return _state["error"]


def _load() -> bool:
    if os.environ.get("RDEPTH_FUSED", "1") == "0":
        _state["error"] = "disabled by RDEPTH_FUSED=0"
        return False
    if not (hasattr(torch.ops, "rdepth") and hasattr(torch.ops.rdepth, "causal_attention")):
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = f"rdepth_kernels_{build_tag()}"
            build_dir = Path(_get_build_directory(name, verbose=False))
            with _build_lock(build_dir):
                if not (build_dir / f"{name}.so").exists():
                    print("recurrent_depth: building the C++ CPU kernels (once per environment, about 20 s)",
                          file=sys.stderr)
                load(name=name, sources=[str(s) for s in _SOURCES], extra_cflags=_CFLAGS,
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            torch.ops.rdepth.blocks  # noqa: B018  (raise if an op did not register)
            torch.ops.rdepth.causal_attention  # noqa: B018
            torch.ops.rdepth.rope_attention  # noqa: B018
        except Exception as exc:  # no compiler, no ninja, a read-only cache: stay with PyTorch's kernels, say why once
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"recurrent_depth: C++ CPU kernels unavailable, using PyTorch's ({_state['error'][:300]})",
                          RuntimeWarning, stacklevel=3)
            return False
    _register_attention()
    return True


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold an flock on `build_dir`.rdepth-lock while torch builds or loads the library there.

    torch's own build lock is a plain file (`build_dir/lock`) that a builder killed mid-build (Ctrl-C, kill -9, a
    timeout) leaves behind, and every later first use then waits on it forever. An flock dies with its process: any
    `lock` file found while we hold ours was left by a dead builder, so it is removed (and said so)."""
    import fcntl

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.with_name(build_dir.name + ".rdepth-lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                print(f"recurrent_depth: removing {stale}, left by a kernel build that did not finish",
                      file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tag() -> str:
    """A digest of everything the built library depends on: the CPU (model and flags: -march=native), the Python
    environment (sys.prefix), the torch build it links against, the compiler flags and the sources' paths and bytes.

    Each distinct tag gets its own build folder, so two virtual environments (or two checkouts) on one machine keep
    their own library instead of rebuilding each other's on every first use. The paths count because torch writes
    them into the folder's build.ninja: two checkouts of the same sources in one folder rewrote it in turn, and ninja
    recompiled on every first use of each (20-50 s a process on a shared machine)."""
    import hashlib
    import platform

    info = platform.machine() + sys.prefix + torch.__version__ + str(torch.__file__) + " ".join(_CFLAGS)
    for src in _SOURCES:
        info += str(src.resolve()) + hashlib.sha256(src.read_bytes()).hexdigest()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ causal attention
@functools.cache
def _register_attention() -> None:
    """Shapes for tracing (torch.compile) and the autograd formulas of rdepth::causal_attention and
    rdepth::rope_attention, once."""

    @torch.library.register_fake("rdepth::causal_attention")
    def _fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        B, T, H, D = q.shape
        return q.new_empty(B, T, H, D), q.new_empty(B, H, T)

    @torch.library.register_fake("rdepth::causal_attention_backward")
    def _fake_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
        B, T, H, D = q.shape
        return q.new_empty(B, T, H, D), q.new_empty(B, T, H, D), q.new_empty(B, T, H, D)

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale

    def backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.rdepth.causal_attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd("rdepth::causal_attention", backward, setup_context=setup_context)

    @torch.library.register_fake("rdepth::rope_attention")
    def _fake_rope(qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        B, T, _, H, D = qkv.shape
        return qkv.new_empty(B, T, H, D), qkv.new_empty(B, H, T)

    @torch.library.register_fake("rdepth::rope_attention_backward")
    def _fake_rope_backward(grad_out: Tensor, qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor, out: Tensor,
                            lse: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        B, T, _, H, D = qkv.shape
        return qkv.new_empty(B, T, 3, H, D), qkv.new_empty(2, H, D)

    def setup_rope(ctx: Any, inputs: tuple, output: tuple) -> None:
        qkv, bias, cos, sin, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, bias, cos, sin, out, lse)
        ctx.scale = scale

    def backward_rope(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
        qkv, bias, cos, sin, out, lse = ctx.saved_tensors
        dqkv, dbias = torch.ops.rdepth.rope_attention_backward(grad_out, qkv, bias, cos, sin, out, lse, ctx.scale)
        return dqkv, (dbias if bias is not None and ctx.needs_input_grad[1] else None), None, None, None

    torch.library.register_autograd("rdepth::rope_attention", backward_rope, setup_context=setup_rope)


def attention_applies(q: Tensor) -> bool:
    """Whether `causal_attention` takes q (and k, v like it): fp32 CPU, at least two tokens, library loaded."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[1] > 1 and available()


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention, q, k, v (B, T, H, D) with a contiguous last dim -> (B, T, H, D) contiguous, scale
    1/sqrt(D); the caller checked `attention_applies`. Differentiable in q, k and v."""
    return torch.ops.rdepth.causal_attention(q, k, v, q.shape[-1] ** -0.5)[0]


def rope_attention(qkv: Tensor, bias: Tensor | None, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on q and k, then causal softmax attention, in one op: qkv (B, T, 3, H, D) (last dim contiguous) with q and
    k in pair order (each head's even dims, then its odd dims), bias (2, H, D) in that order or None, cos and sin
    (1 or B, T, D/2) contiguous -> (B, T, H, D) contiguous, scale 1/sqrt(D). The rotated q and k never leave the op
    (per head, in cache); backward writes the gradient of qkv in one piece. Differentiable in qkv and bias; the
    caller checked that the library is `available()` and qkv is fp32 on the CPU with at least two tokens."""
    return torch.ops.rdepth.rope_attention(qkv, bias, cos, sin, qkv.shape[-1] ** -0.5)[0]
