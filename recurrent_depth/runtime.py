"""Device, dtype, seeding and distributed set-up, in one place and explicit: nothing here runs at import time.

    ctx = init_runtime(device="auto", dtype="auto")      # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    with ctx.autocast(): loss = ...
    ctx.close()

Policy: fp32 on CPU; bf16 autocast on CUDA (parameters and optimiser state stay fp32); gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# The one map from dtype names to torch dtypes: the CLI's --dtype, the training config's `runtime.dtype` and
# checkpoint loading all read it.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` / `cpu` / `cuda` / `cuda:N` -> a device; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = default_device().type
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype named `name` (a key of `DTYPES`) for autocast or for weights: `auto` is bf16 on CUDA and fp32
    elsewhere. ValueError naming the valid names otherwise."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the process instead of returning it to the OS (glibc malloc): large tensors
    (up to 32 MB) come from the heap rather than fresh mmaps, and the heap is not trimmed. A CPU training step frees
    and re-allocates the same activations every step; without this each step page-faults them in again (about
    40,000 faults and 0.1 s of system time per `small` step). Peak memory is unchanged: the kept pages are the ones
    the next step needs. Process-wide and one-way (glibc has no undo); a no-op (False) without glibc's mallopt."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        return bool(mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN's bf16 products need."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_fp32_matmul(precision: str, device_type: str) -> None:
    """ValueError naming `runtime.fp32_matmul` if `device_type` cannot run fp32 products at `precision`."""
    allowed = {"cpu": ("ieee", "bf16"), "cuda": ("ieee", "tf32")}.get(device_type, ("ieee",))
    if precision not in allowed:
        raise ValueError(f"`runtime.fp32_matmul` {precision!r} is not available on {device_type}; "
                         f"choose one of {list(allowed)}")
    if precision == "bf16" and not (torch.backends.mkldnn.is_available() and cpu_has_bf16()):
        raise ValueError("`runtime.fp32_matmul` 'bf16' needs a CPU with AVX512-BF16 or AMX (and oneDNN); "
                         "this machine has neither: use 'ieee'")


@contextlib.contextmanager
def fp32_matmul(precision: str, device: torch.device) -> Iterator[None]:
    """Within the block, fp32 matrix products on `device` use `precision`: "ieee" (exact), "bf16" (CPU: bf16
    inner products, fp32 accumulation, oneDNN) or "tf32" (CUDA). Restores the previous setting on exit; raises
    ValueError naming `runtime.fp32_matmul` for a precision the device does not have."""
    check_fp32_matmul(precision, device.type)
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = precision
    try:
        yield
    finally:
        backend.fp32_precision = previous


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, for exact resumption."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Runtime:
    """Where and how this process computes: device, autocast dtype, and its place in a distributed run."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to `dtype` when it is not fp32 (bf16 on GPU); a no-op in fp32."""
        if self.dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (returns it unchanged in a single process)."""
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Pick device and dtype; join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    # MKL's conditional numerical reproducibility: without it, CPU matmul results may depend on buffer alignment,
    # and a resumed run could drift from an uninterrupted one in the last bit. Read when MKL first runs.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda"
                                else None)
    return Runtime(device=dev, dtype=resolve_dtype(dtype, dev), rank=rank, world_size=world, local_rank=local_rank)
