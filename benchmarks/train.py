"""Training-step speed and memory, against the reference implementation in the same run; prints JSON.

    REFERENCE_DIR=/work/reference/recpre .venv/bin/python benchmarks/train.py [--repeats 5] [--threads 1]

speed   `small` preset, batch 4 x 256 tokens, num_steps = (24, 8) (24 recurrences without autograd, 8 with):
        tokens/s of our forward + backward and of our whole training step (+ gradient clipping and AdamW), eager and
        with `runtime.compile` (the fused core step of recurrent_depth/training/fused.py as one compiled graph, the
        other blocks compiled one by one), forward + backward also with torch.compile per sandwich block only (the
        earlier `runtime.compile`), and of the reference's forward + backward (its `RavenForCausalLM` in train mode
        with `num_steps=tensor([24, 8])` and labels). After a warm-up of each, the contenders take turns, one step
        each per round, for `--repeats` rounds (the reference in its own process, waiting while ours run): load
        from other jobs drifts slowly, so each round compares like with like. Reported: best step of each, and
        the median over rounds of the reference's step time over ours (`*_median_round_ratio`). The ceiling: the
        reference's worker records every matrix product its step runs (mm, addmm, bmm: 869 of them, forward and
        backward) and replays them alone on tensors of the same sizes and strides, as one more contender
        (`reference_products_only`); the reference's step over that (`speedup_ceiling_products_only_*`) bounds the
        speed-up of any exact-fp32 implementation that must do these products with this BLAS (attention's own
        products, inside SDPA, are not even counted, and replayed products find their inputs warmer in cache than
        a real step does, so the true ceiling is lower). `--fp32-matmul bf16` runs both sides with oneDNN's bf16
        inner products for fp32 matrix products (runtime.fp32_matmul=bf16).
        Our process keeps freed activation memory as `rdepth train` does on a CPU (runtime.tune_cpu_allocator: no
        page faults for re-allocated activations); `--plain-allocator` leaves malloc as it is.
memory  peak memory of our training step at 64 sampled recurrences (56 + 8) against 8 (0 + 8), same k = 8: each in a
        fresh process (one warm-up step, then the peak resident set of one measured step, via /proc clear_refs), and
        the bytes autograd saves for backward (exact, from saved-tensor hooks).

REFERENCE_DIR holds the reference's `raven_modeling_minimal.py` and `raven_config_minimal.py` (public repository
seal-rg/recurrent-pretraining, folder recpre/; never copied into this repo); it needs transformers 4.5x, so it runs in
its own process with REFERENCE_PYTHON (default .venv-tf4/bin/python) and the same thread count. Without REFERENCE_DIR
only our figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ, NUM_STEPS = 4, 256, (24, 8)
SMALL = dict(n_embd=256, n_heads=4, vocab_size=4096, intermediate_size=704, block_size=1024, n_layers_in_prelude=2,
             n_layers_in_recurrent_block=4, n_layers_in_coda=2, mean_recurrence=32, mean_backprop_depth=8)


def _ids(vocab: int):
    import torch

    return torch.randint(4, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ reference worker
def reference_worker(spec: dict) -> None:
    """Runs inside REFERENCE_PYTHON: one reference forward + backward at num_steps = (24, 8) per line on stdin,
    answering its seconds on stdout (the first line answered is `ready`, after a warm-up step)."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.backends.mkldnn.matmul.fp32_precision = spec["fp32_matmul"]
    from reference_import import import_reference

    modeling, config = import_reference(spec["reference_dir"])
    RavenForCausalLM, RavenConfig = modeling.RavenForCausalLM, config.RavenConfig

    torch.manual_seed(0)
    model = RavenForCausalLM(RavenConfig(**SMALL, padding_multiple=SMALL["vocab_size"])).train()
    ids = _ids(SMALL["vocab_size"])
    steps = torch.tensor(list(NUM_STEPS))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids, num_steps=steps).loss.backward()
        return time.perf_counter() - start

    step()  # warm-up
    products = _record_products(lambda: model(ids, labels=ids, num_steps=steps).loss.backward())
    model.zero_grad(set_to_none=True)
    products()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(json.dumps({"seconds": step()}), flush=True)
        elif line.strip() == "products":
            start = time.perf_counter()
            products()
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        else:
            break


def _record_products(fn):
    """Run fn once, recording every matrix product ATen executes (mm, addmm, bmm, baddbmm, forward and backward);
    return a function that runs the same products again, alone, on tensors of the same sizes and strides."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    calls: list = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in kinds:
                calls.append((func, [(a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args],
                              dict(kwargs)))
            return func(*args, **kwargs)

    with Recorder():
        fn()
    pool: dict = {}

    def tensor(shape, stride):
        if (shape, stride) not in pool:
            pool[shape, stride] = torch.empty_strided(shape, stride).normal_()
        return pool[shape, stride]

    replay = [(func, [tensor(*a) if isinstance(a, tuple) else a for a in args], kwargs) for func, args, kwargs in calls]

    def run() -> None:
        with torch.no_grad():
            for func, args, kwargs in replay:
                func(*args, **kwargs)

    return run


class Reference:
    """The reference worker process, one timed step per `step()` call."""

    def __init__(self, args: argparse.Namespace) -> None:
        spec = dict(reference_dir=args.reference_dir, threads=args.threads, fp32_matmul=args.fp32_matmul)
        self.proc = subprocess.Popen([args.reference_python, __file__, "--reference-worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, what: str | None = None) -> str:
        line = self.proc.stdout.readline()
        if not line or (what is not None and line.strip() != what):
            self.proc.kill()
            raise RuntimeError(f"reference worker failed:\n{line}{self.proc.stderr.read()[-3000:]}")
        return line

    def step(self, what: str = "step") -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect())["seconds"]

    def products(self) -> float:
        """Seconds of the reference step's matrix products alone (same shapes, same BLAS), replayed."""
        return self.step("products")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------------- ours
class Ours:
    """Our `small` model with the training loop's pieces: seeded s0, truncated forward/backward, clip, AdamW."""

    def __init__(self, compile: bool | str = False, tune_allocator: bool = True) -> None:
        import torch

        from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
        from recurrent_depth.training.config import OptimSection
        from recurrent_depth.training.optim import build_optimizer

        if tune_allocator:  # what `rdepth train` does on a CPU
            from recurrent_depth.runtime import tune_cpu_allocator

            tune_cpu_allocator()
        torch.manual_seed(0)
        self.model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("small")).train()
        self.optimizer = build_optimizer(self.model, OptimSection(lr=1e-4))
        self.ids = _ids(self.model.config.vocab_size)
        self.rows = torch.arange(BATCH)
        if compile:  # True: runtime.compile (fused core step); "blocks": each sandwich block compiled on its own
            from recurrent_depth.training.parallel import compile_blocks

            compile_blocks(self.model, fuse_core=compile != "blocks")

    def forward_backward(self, num_steps: tuple[int, int] = NUM_STEPS) -> None:
        import contextlib

        from recurrent_depth.training.step import forward_backward, initial_states

        self.model.zero_grad(set_to_none=True)
        s0 = initial_states(self.model.config, self.rows, SEQ, 0, 0, self.ids.device)
        forward_backward(self.model, self.ids, self.ids, s0, num_steps, 1.0 / self.ids.numel(),
                         contextlib.nullcontext)

    def train_step(self, num_steps: tuple[int, int] = NUM_STEPS) -> None:
        from recurrent_depth.training.parallel import clip_grad_norm

        self.forward_backward(num_steps)
        clip_grad_norm(self.model, 1.0)
        self.optimizer.step()


def _timed(fn):
    """fn as a function returning the seconds one call took."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def memory_worker(spec: dict) -> dict:
    """Fresh process: one warm-up step at (0, 8), then peak RSS of one step at `num_steps` (and saved bytes)."""
    import torch

    torch.set_num_threads(spec["threads"])
    ours = Ours(tune_allocator=spec["tune_allocator"])
    ours.train_step((0, 8))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
    before = _status_kb("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours.train_step(tuple(spec["num_steps"]))
    return {"peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_before_mb": before / 1024,
            "step_increase_mb": (_status_kb("VmHWM") - before) / 1024, "autograd_saved_mb": sum(saved) / 2**20}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_memory(args: argparse.Namespace, num_steps: tuple[int, int]) -> dict:
    spec = dict(threads=args.threads, num_steps=list(num_steps), tune_allocator=not args.plain_allocator)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one step of each contender per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32-matmul", choices=["ieee", "bf16"], default="ieee",
                        help="fp32 matrix products on both sides: exact (ieee) or oneDNN bf16 inner products (bf16, "
                             "our runtime.fp32_matmul=bf16; the speed figures only, memory stays ieee)")
    parser.add_argument("--plain-allocator", action="store_true",
                        help="leave glibc malloc as it is in our process (rdepth train tunes it on a CPU)")
    parser.add_argument("--reference-dir", default=os.environ.get("REFERENCE_DIR"))
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON",
                                                                     str(REPO / ".venv-tf4" / "bin" / "python")))
    parser.add_argument("--reference-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_worker:
        reference_worker(json.loads(args.reference_worker))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    import torch

    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.matmul.fp32_precision = args.fp32_matmul
    os.environ.setdefault("MKL_CBWR", "AUTO")
    tokens = BATCH * SEQ
    tune = not args.plain_allocator
    eager, compiled, blocks = (Ours(c, tune_allocator=tune) for c in (False, True, "blocks"))
    warm = time.perf_counter()
    compiled.forward_backward()
    compile_s = time.perf_counter() - warm
    ours = {"ours_fwd_bwd": eager.forward_backward, "ours_train_step": eager.train_step,
            "ours_compiled_fwd_bwd": compiled.forward_backward, "ours_compiled_train_step": compiled.train_step,
            "ours_compiled_per_block_fwd_bwd": blocks.forward_backward}
    for fn in ours.values():
        fn()  # warm-up
    contenders = {name: _timed(fn) for name, fn in ours.items()}  # each returns its step's seconds
    if args.reference_dir:
        reference = Reference(args)
        contenders = {"reference_fwd_bwd": reference.step, "reference_products_only": reference.products,
                      **contenders}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):  # rounds: each contender one step in turn
        for name, step in contenders.items():
            times[name].append(step())
    if args.reference_dir:
        reference.close()
    speed = {"preset": "small", "batch": BATCH, "seq_len": SEQ, "num_steps": list(NUM_STEPS), "threads": args.threads,
             "rounds": args.repeats, "fp32_matmul": args.fp32_matmul,
             "ours_allocator_tuned": not args.plain_allocator,
             "compile_warmup_s": compile_s}
    for name, ts in times.items():
        speed[f"{name}_tokens_per_s"] = tokens / min(ts)
    if args.reference_dir:
        ref = times["reference_fwd_bwd"]
        prod = times["reference_products_only"]
        # No exact-fp32 implementation that does these products with this BLAS beats the reference by more than its
        # step over its products alone (attention's own products, inside SDPA, are not even counted here)
        speed["reference_products_share"] = statistics.median(p / r for p, r in zip(prod, ref))
        speed["speedup_ceiling_products_only_median_round_ratio"] = statistics.median(r / p for r, p in zip(ref, prod))
        for name, ts in times.items():
            if name.startswith("ours"):
                speed[f"speedup_{name[5:]}"] = min(ref) / min(ts)
                speed[f"speedup_{name[5:]}_median_round_ratio"] = statistics.median(r / t for r, t in zip(ref, ts))
    m8, m64 = run_memory(args, (0, 8)), run_memory(args, (56, 8))
    memory = {"steps_8": m8, "steps_64": m64,
              "peak_rss_ratio_64_vs_8": m64["peak_rss_mb"] / m8["peak_rss_mb"],
              "step_increase_ratio_64_vs_8": m64["step_increase_mb"] / max(m8["step_increase_mb"], 1e-9),
              "autograd_saved_ratio_64_vs_8": m64["autograd_saved_mb"] / m8["autograd_saved_mb"]}
    print(json.dumps({"speed": speed, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
