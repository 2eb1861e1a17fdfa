"""Batch-1 matrix-vector streaming, bf16 against fp32 weights, in interleaved passes; prints JSON.

    .venv/bin/python benchmarks/gemv.py [--threads 1,2] [--passes 7] [--shapes 35840x5280,5280x5280] [--total-gb 1.6]

Per thread count and shape (out x in; huginn-3.5b's mlp.fc and attn.proj by default), GB/s of weight bytes streamed
by x (1, in) @ W^T over distinct matrices (`--total-gb` per set, more than the caches hold, as decoding streams its
weights) for: ours (the fused op's kernel, `rdepth.linear`, fp32 x) on fp32 and on bf16 weights; ours on fp32
weights of half the rows (`fp32_same_bytes`: the bytes of one bf16 call, since a shorter call pays any fixed cost
per call, its fork and join, in a larger share); ours on fp32 weights of twice the rows and half the inputs
(`fp32_same_row_bytes`: a bf16 row's bytes, since a matrix of shorter rows starts more row streams per byte, each
paying the memory latency before the prefetchers run ahead); and torch's fp32 `F.linear`. One pass measures every
kind once, one after the other, in an order rotated from pass to pass (whatever runs first or after a given kind
gains or loses nothing systematically), so the per-pass ratios (bf16 over each fp32 kind) compare measurements
seconds apart: on a shared machine other jobs move the absolute rates by tens of percent within a minute. A first,
untimed pass touches every matrix once (fresh pages are slow the first time). Reports best, median and worst pass
and each pass's ratio, with the load average before and after (a memory-bound product is slowed by whatever else
runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recurrent_depth import kernels  # noqa: E402


def matrices(n_out: int, n_in: int, dtype: torch.dtype, total_bytes: int) -> list[torch.Tensor]:
    """Distinct (n_out, n_in) matrices of `dtype`, at least two and `total_bytes` in all."""
    first = torch.randn(n_out, n_in).to(dtype)
    count = max(2, -(-total_bytes // (first.numel() * first.element_size())))
    return [first] + [first.clone() for _ in range(count - 1)]


def rate(fn: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor]) -> float:
    """GB/s of weight bytes for one pass of `fn` over `weights`."""
    start = time.perf_counter()
    for w in weights:
        fn(w)
    return sum(w.numel() * w.element_size() for w in weights) / (time.perf_counter() - start) / 1e9


def shape_rates(n_out: int, n_in: int, passes: int, total_bytes: int) -> dict:
    """Interleaved passes over the five kinds of the module docstring for one shape."""
    x = torch.randn(1, n_in)
    x_half = torch.randn(1, max(1, n_in // 2))
    fp32 = matrices(n_out, n_in, torch.float32, total_bytes)
    ours = lambda w: torch.ops.rdepth.linear(x, w)  # noqa: E731
    ours_half = lambda w: torch.ops.rdepth.linear(x_half, w)  # noqa: E731
    kinds = {"ours_fp32": (ours, fp32), "ours_bf16": (ours, matrices(n_out, n_in, torch.bfloat16, total_bytes)),
             "ours_fp32_same_bytes": (ours, matrices(max(1, n_out // 2), n_in, torch.float32, total_bytes // 2)),
             "ours_fp32_same_row_bytes": (ours_half, matrices(2 * n_out, max(1, n_in // 2), torch.float32,
                                                              total_bytes)),
             "torch_fp32": (lambda w: F.linear(x, w), fp32)}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    names = list(kinds)
    for fn, ws in kinds.values():  # untimed: the first touch of fresh pages
        rate(fn, ws)
    for p in range(passes):
        for name in names[p % len(names):] + names[:p % len(names)]:
            fn, ws = kinds[name]
            rates[name].append(rate(fn, ws))
    out: dict = {name: {"best_GBps": max(r), "median_GBps": statistics.median(r), "worst_GBps": min(r)}
                 for name, r in rates.items()}
    for ref in ("ours_fp32", "ours_fp32_same_bytes", "ours_fp32_same_row_bytes"):
        ratios = [b / f for b, f in zip(rates["ours_bf16"], rates[ref], strict=True)]
        out[f"bf16_over_{ref.removeprefix('ours_')}"] = {"per_pass": [round(v, 3) for v in ratios],
                                                         "median": statistics.median(ratios)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--passes", type=int, default=7, help="interleaved passes per shape")
    parser.add_argument("--shapes", default="35840x5280,5280x5280", help="comma-separated OUTxIN")
    parser.add_argument("--total-gb", type=float, default=1.6, help="GB of distinct fp32 or bf16 matrices per set")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit(f"the fused op's kernel library is not available: {kernels.load_error()}")
    result: dict = {"vector_isa": kernels.vector_isa(), "load_average_before": os.getloadavg()}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes.split(","):
            n_out, n_in = (int(v) for v in shape.split("x"))
            result[f"threads_{threads}"] = {**result.get(f"threads_{threads}", {}),
                                            shape: shape_rates(n_out, n_in, args.passes, int(args.total_gb * 1e9))}
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
