"""Checkpoint loading: peak memory and time of `from_pretrained`, ours against the reference's; prints JSON.

    .venv/bin/python benchmarks/load.py [--preset medium] [--cases fp32-float32,bf16-float32,bf16-bfloat16]
    REFERENCE_DIR=/work/reference/recpre REFERENCE_PYTHON=.venv-tf4/bin/python .venv/bin/python benchmarks/load.py

A checkpoint of random `--preset` weights is written once, in fp32 and in bf16, under ~/.cache/rdepth-bench (never in
the repository; `huginn-3.5b` needs ~14 GB of memory to write and 21 GB of disk). Each case `SRC-DTYPE` loads the SRC
checkpoint as DTYPE in a fresh process and reports its peak RSS (`ru_maxrss`) over the model's bytes in DTYPE:
`peak_over_model` counts the whole process, `added_over_model` only what loading added to the RSS the process had
after importing torch and the model code and loading and running a tiny warm-up checkpoint (lazy imports, our C++
kernels' build or load, first-use allocations: the interpreter's own few hundred MB would otherwise dominate a small
model). `seconds` times the load alone, `first_forward_seconds` one no-grad forward of 16 tokens at num_steps=1 right
after it, `load_and_forward_seconds` their sum: a load that maps the file (same dtype, on both sides) reads its pages
on first use, so compare the sum too. The peak is taken after the forward; it counts mapped file pages resident (the
page cache, which the kernel may drop), not only private memory. A checkpoint already in the page cache loads faster
than one read from disk: run the sides one after the other on the same cache state.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "rdepth-bench"
DTYPES = ("float32", "bfloat16")  # the dtypes a case loads as (torch attribute names)


def _rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """Peak RSS of this process (bytes). Linux carries ru_maxrss across fork and exec, so the parent that spawns
    the workers must itself stay small: it never imports torch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def worker(spec: dict) -> dict:
    """Runs in a fresh process: load spec["checkpoint"] as spec["dtype"] with ours or the reference's code."""
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    dtype = getattr(torch, spec["dtype"])
    if spec["side"] == "reference":
        from reference_import import import_reference

        cls = import_reference(spec["reference_dir"])[0].RavenForCausalLM
        load = lambda path: cls.from_pretrained(path, torch_dtype=dtype)  # noqa: E731
    else:
        sys.path.insert(0, str(REPO))
        from recurrent_depth.hf import RecurrentDepthForCausalLM

        load = lambda path: RecurrentDepthForCausalLM.from_pretrained(path, dtype=dtype)  # noqa: E731
    _first_forward(load(spec["warmup"]), spec["side"])  # lazy imports, kernel builds, first-use allocations
    gc.collect()
    base = max(_rss_bytes(), _peak_bytes())
    start = time.perf_counter()
    model = load(spec["checkpoint"])
    seconds = time.perf_counter() - start
    forward_seconds = _first_forward(model, spec["side"])
    peak = _peak_bytes()
    params = {id(p): p for p in model.parameters()}.values()
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    assert all(p.dtype == dtype for p in params)
    return {"seconds": round(seconds, 3), "first_forward_seconds": round(forward_seconds, 3),
            "load_and_forward_seconds": round(seconds + forward_seconds, 3), "model_bytes": model_bytes,
            "peak_rss_bytes": peak, "base_rss_bytes": base,
            "peak_over_model": round(peak / model_bytes, 3),
            "added_over_model": round((peak - base) / model_bytes, 3)}


def _first_forward(model: Any, side: str) -> float:
    """Seconds for one no-grad forward of 16 tokens at one recurrence (where a mapped load reads its pages)."""
    import torch

    ids = torch.arange(16).unsqueeze(0) % model.config.vocab_size  # (B=1, T=16)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, num_steps=1) if side == "reference" else model(ids, num_steps=1, init_scale=0.0)
    assert bool(torch.isfinite(out.logits).all())
    return time.perf_counter() - start


def _checkpoint_folders(preset: str) -> dict[str, Path]:
    return {"fp32": CACHE / f"{preset}-fp32", "bf16": CACHE / f"{preset}-bf16",  # shared with generate.py
            "warmup": CACHE / "load-warmup"}


def make_checkpoints(preset: str) -> None:
    """fp32 and bf16 checkpoints of the preset with random weights in the cache: generate.py's builder (one set of
    benchmark checkpoints for both scripts), plus a tiny warm-up checkpoint."""
    import torch
    from generate import bench_checkpoints

    from recurrent_depth.config import RecurrentDepthConfig
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    folders = _checkpoint_folders(preset)
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).save_pretrained(folders["warmup"])
    built = bench_checkpoints(preset, ["fp32", "bf16"])
    assert built == {dt: folders[dt] for dt in built}, "load.py and generate.py must name the same folders"


def run_case(side: str, checkpoint: Path, dtype: str, args: argparse.Namespace) -> dict:
    python = args.reference_python if side == "reference" else sys.executable
    spec = {"side": side, "checkpoint": str(checkpoint), "dtype": dtype, "reference_dir": args.reference_dir,
            "warmup": str(_checkpoint_folders("debug")["warmup"]), "threads": args.threads}
    proc = subprocess.run([python, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed on {checkpoint} as {dtype}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="medium", help="model preset (huginn-3.5b allowed: ~14 GB in fp32)")
    parser.add_argument("--cases", default="fp32-float32,bf16-float32,bf16-bfloat16",
                        help="comma-separated SRC-DTYPE: stored fp32|bf16, loaded as float32|bfloat16")
    parser.add_argument("--sides", default="ours,reference",
                        help="comma-separated: ours, reference (the reference needs --reference-dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each worker, both sides (the conversion and first touch of a converting "
                             "load run on them)")
    parser.add_argument("--reference-dir", default=os.environ.get("REFERENCE_DIR"))
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON",
                                                                     str(REPO / ".venv-tf4" / "bin" / "python")))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.make:
        make_checkpoints(args.make)
        return
    folders = _checkpoint_folders(args.preset)
    if not all((f / "config.json").is_file() for f in folders.values()):  # in its own process: see `_peak_bytes`
        subprocess.run([sys.executable, __file__, "--make", args.preset], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    results = {"preset": args.preset, "cases": {}}
    sides = [side for side in args.sides.split(",") if side == "ours" or (side == "reference" and args.reference_dir)]
    for case in args.cases.split(","):
        src, dtype = case.split("-")
        if src not in ("fp32", "bf16") or dtype not in DTYPES:
            parser.error(f"case {case!r}: SRC must be fp32 or bf16, DTYPE float32 or bfloat16")
        results["cases"][case] = {side: run_case(side, folders[src], dtype, args) for side in sides}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
