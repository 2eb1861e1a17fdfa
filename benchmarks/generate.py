"""Generation speed and memory against the reference implementation, in one run; prints JSON.

    REFERENCE_DIR=/work/reference .venv/bin/python benchmarks/generate.py [--quick] [--threads 1]

REFERENCE_DIR holds the reference's `raven_modeling_minimal.py` and `raven_config_minimal.py` (public repository
seal-rg/recurrent-pretraining, folder recpre/; never copied into this repo). The reference needs transformers 4.5x, so
it runs in its own process with REFERENCE_PYTHON (default: .venv-tf4/bin/python), alternating with ours; both load
the same checkpoint (random weights, written here in Huginn's layout), use a zero initial state, fp32, greedy, and the
same number of threads. Without REFERENCE_DIR only our figures are printed.

Scenarios (each a key of the JSON output):
  small      `small` preset, r = 32, batch 1, 32-token prompt, 64 new tokens: tokens/s ours vs reference (HF generate).
  medium     `medium` preset, r = 32, batch 1: tokens/s ours vs reference, and our decode weight traffic as a fraction
             of the memory bandwidth measured here (a large tensor copy).
  batch16    `medium`, batch 16: our decode FLOP/s as a fraction of a plain matmul's FLOP/s measured here (a 2048^3
             product, and the model's own (16, d) x (d, 2I) shape streaming distinct weights from memory).
  kv         KV-cache bytes per sharing policy at r = 32 (`small`, 32 + 64 tokens).
  adaptive   a converging stub (`small` with a contracting recurrence): fixed depth vs KL exit vs self-speculative
             decoding: tokens/s, mean steps per token, agreement with fixed-depth greedy.
  adaptive_batch  the stub with 8 prompts at once: fixed depth and per-row exit, fused CPU path against the eager
             modules in the same run (tokens/s, and whether tokens and steps agree).
  trained    the bundled trained checkpoint on its task, one prompt at a time: fixed depth vs exit criteria vs
             speculative decoding (tokens/s, steps per token, accuracy, agreement with fixed depth).
  gemv       the matrix-vector product that bounds batch-1 decoding, on huginn-3.5b's shapes (35840 x 5280: mlp.fc,
             5280 x 5280: attn.proj), fp32 and bf16 weights, at 1 and --threads threads: GB/s of weights streamed by
             the fused op's kernel (rdepth.linear, fp32 x) and by torch's F.linear (x in the weights' dtype), and each
             as a share of the bound: torch's fp32 GB/s on 35840 x 5280 at the same thread count.
  huginn-3.5b  not in the default list (it needs ~14 GB of memory and the machine to itself): Huginn-0125's shape
             with random weights (our init; built once and cached in ~/.cache/rdepth-bench/{preset}-{dtype}/,
             sharded at 2 GB; the bf16 one is the fp32 one rounded), batch 1, a 16-token prompt + 8 new tokens,
             r = 4, zero initial state, greedy, in fp32 and bf16, ours and the reference each in a fresh process
             (one model in memory at a time), alternating: tokens/s (prompt included, both sides), decode tokens/s
             (after the prompt's forward), and our decode rate as a share of the bound (the GEMV bandwidth measured
             here over the weight bytes a token reads). --huginn-preset runs it at another preset's shape (a quick
             check of the scenario itself), --huginn-* set the dtypes, r, tokens and device (benchmarks/gpu.sh).
             The measurement asked for, on an otherwise idle machine, with REFERENCE_DIR and REFERENCE_PYTHON set:
               .venv/bin/python benchmarks/generate.py --scenarios gemv,huginn-3.5b --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ reference worker
def reference_worker(spec: dict) -> dict:
    """Runs inside REFERENCE_PYTHON: load the reference from REFERENCE_DIR, time its generate on the checkpoint (and,
    with spec["prefill"], a one-token generate: the prompt's forward)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from reference_import import import_reference
    from transformers import GenerationConfig

    RavenForCausalLM = import_reference(spec["reference_dir"])[0].RavenForCausalLM

    device = spec.get("device", "cpu")
    model = RavenForCausalLM.from_pretrained(spec["checkpoint"], torch_dtype=torch_dtype(spec.get("dtype", "fp32")))
    model = model.to(device).eval()
    ids = torch.tensor(spec["prompt"], device=device)
    kwargs = dict(num_steps=spec["num_steps"], init_scale=0.0)

    def run(new_tokens: int):
        config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, return_dict_in_generate=True,
                                  eos_token_id=None, pad_token_id=0)
        return model.generate(ids, config, **kwargs)

    with torch.no_grad():
        run(2)  # warm-up
        prefill = _timed(lambda: run(1), device)[0] if spec.get("prefill") else None
        start, cpu = time.perf_counter(), time.process_time()
        out = run(spec["max_new_tokens"])
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    cache = out.past_key_values
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "prefill_seconds": prefill,
            "sequences": out.sequences.tolist(),
            "kv_cache_mb": cache.get_memory_usage() if hasattr(cache, "get_memory_usage") else None}


def torch_dtype(name: str):
    """"fp32" or "bf16" as a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str = "cpu") -> tuple[float, object]:
    """(wall seconds, result) of fn(), the device synchronised at the end."""
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def run_worker(python: str, flag: str, spec: dict) -> dict:
    """Run this file as `python this-file flag JSON` (a worker, one model in its own process); its last stdout line."""
    proc = subprocess.run([python, __file__, flag, json.dumps(spec)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_reference(args: argparse.Namespace, checkpoint: Path, prompt: list, max_new_tokens: int,
                  num_steps: int, **extra) -> dict | None:
    """The reference's timing on `checkpoint` (None without REFERENCE_DIR); `extra`: dtype, device, prefill."""
    if not args.reference_dir:
        return None
    spec = dict(reference_dir=args.reference_dir, checkpoint=str(checkpoint), prompt=prompt,
                max_new_tokens=max_new_tokens, num_steps=num_steps, threads=args.threads, **extra)
    return run_worker(args.reference_python, "--reference-worker", spec)


# ------------------------------------------------------------------------------------------------- ours
def build(preset: str, seed: int = 0, converging: bool = False):
    import torch

    from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM

    torch.manual_seed(seed)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name(preset)).eval()
    if converging:  # the adapter's state half scaled down: the recurrence contracts to a fixed point per token
        d = model.config.n_embd
        with torch.no_grad():
            model.transformer.adapter.weight[:, :d] *= 0.3
    return model


CPU_SECONDS: list[float] = []  # process time of the last `time_ours` call


def time_ours(model, ids, repeats: int = 1, warm_up: bool = True, **kwargs) -> tuple[float, object]:
    """Best wall-clock seconds of `generate` over `repeats` runs (process time of that run in CPU_SECONDS)."""
    from recurrent_depth.inference.generate import generate

    if warm_up:
        generate(model, ids, **{**kwargs, "max_new_tokens": 2})
    best, out = float("inf"), None
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        out = generate(model, ids, **kwargs)
        seconds = time.perf_counter() - start
        if seconds < best:
            best, CPU_SECONDS[:] = seconds, [time.process_time() - cpu]
    return best, out


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0):
    import torch

    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def weight_bytes_per_token(model, num_steps: int) -> int:
    """Bytes of weights a decode token reads: prelude, r x (adapter + core), coda, head."""
    t = model.transformer
    size = lambda mods: sum(p.numel() * p.element_size() for m in mods for p in m.parameters())  # noqa: E731
    return (size(t.prelude) + size(t.coda) + num_steps * (size([t.adapter]) + size(t.core_block))
            + model.lm_head.weight.numel() * model.lm_head.weight.element_size())


def flops_per_token(model, num_steps: int, context: int) -> float:
    """Matmul FLOPs of one decode token: 2 x weights used + attention (QK and AV) over `context` keys."""
    cfg = model.config
    params = weight_bytes_per_token(model, num_steps) / 4
    layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda + num_steps * cfg.n_layers_in_recurrent_block
    return 2 * params + layers * 4 * context * cfg.n_embd


def memory_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of a large tensor copy (read + write)."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def streaming_matmul_flops(m: int, k: int, n: int, total_bytes: int = 512 * 2**20) -> float:
    """FLOP/s of (m, k) @ (k, n) products over distinct weight matrices totalling `total_bytes` (more than the
    caches hold), the way decoding streams its weights: the roofline for the model's own shape at this batch."""
    import torch

    ws = [torch.randn(k, n) for _ in range(max(2, total_bytes // (4 * k * n)))]
    a = torch.randn(m, k)
    for w in ws:
        a @ w
    start = time.perf_counter()
    for w in ws:
        a @ w
    return 2 * m * k * n * len(ws) / (time.perf_counter() - start)


def matmul_flops(m: int, k: int, n: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def ours_worker(spec: dict) -> dict:
    """Our side of the `huginn-3.5b` scenario, in its own process: load the checkpoint in spec["dtype"], time a
    one-token generate (the prompt's forward) and the full one after a warm-up; count the fused op's calls."""
    import torch

    torch.set_num_threads(spec["threads"])
    from recurrent_depth.hf import RecurrentDepthForCausalLM
    from recurrent_depth.inference import fused
    from recurrent_depth.inference.generate import generate

    device = spec["device"]
    model = RecurrentDepthForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch_dtype(spec["dtype"]),
                                                      device=device)
    ids = torch.tensor(spec["prompt"], device=device)
    calls = []
    run_blocks = fused.run_blocks
    fused.run_blocks = lambda *a, **k: calls.append(1) or run_blocks(*a, **k)
    run = lambda n: generate(model, ids, max_new_tokens=n, num_steps=spec["num_steps"])  # noqa: E731
    with torch.inference_mode():
        run(2)  # warm-up (and the fused op's build)
        prefill, _ = _timed(lambda: run(1), device)
        seconds, out = _timed(lambda: run(spec["max_new_tokens"]), device)
    return {"seconds": seconds, "prefill_seconds": prefill, "sequences": out.sequences.tolist(),
            "fused_calls": len(calls), "weight_bytes_per_token": weight_bytes_per_token(model, spec["num_steps"])}


BENCH_CACHE = Path.home() / ".cache" / "rdepth-bench"


def bench_checkpoints(preset: str, dtypes: list[str]) -> dict[str, Path]:
    """Random-weight checkpoints of `preset` (our init, seed 0), one folder per dtype,
    ~/.cache/rdepth-bench/{preset}-{dtype}/, sharded at 2 GB; built once (a folder exists only once complete: the
    save is atomic). The bf16 weights are the fp32 ones rounded (the model converted in place: one copy in memory)."""
    import gc

    paths = {dt: BENCH_CACHE / f"{preset}-{dt}" for dt in dtypes}
    missing = [dt for dt in DTYPE_NAMES if dt in dtypes and not (paths[dt] / "config.json").is_file()]
    if missing:
        print(f"building the {preset} benchmark checkpoints {missing} under {BENCH_CACHE}", file=sys.stderr)
        model = build(preset)
        for dt in missing:
            model = model.to(torch_dtype(dt))
            model.save_pretrained(paths[dt], max_shard_size="2GB")
        del model
        gc.collect()
    return paths


DTYPE_NAMES = ("fp32", "bf16")  # in building order: bf16 rounds the fp32 weights
GEMV_SHAPES = ((35840, 5280), (5280, 5280))  # huginn-3.5b's mlp.fc and attn.proj weights (out, in)


def gemv_rates(n_out: int, n_in: int, dtype: str, repeats: int = 5, total_bytes: int = 1_200_000_000) -> dict:
    """GB/s of weights streamed by a batch-1 product x (1, n_in) @ W^T over distinct (n_out, n_in) matrices of
    `dtype`, at least two and `total_bytes` in all (more than the caches hold), the way decoding streams its
    weights: ours (rdepth.linear, fp32 x, bf16 widened in registers) and torch's F.linear (x in W's dtype), taking
    turns, best of `repeats` passes each (other jobs' load only ever slows a pass down)."""
    import torch
    import torch.nn.functional as F

    from recurrent_depth import kernels

    first = torch.randn(n_out, n_in).to(torch_dtype(dtype))
    count = max(2, -(-total_bytes // (first.numel() * first.element_size())))
    weights = [first] + [first.clone() for _ in range(count - 1)]
    x = torch.randn(1, n_in)
    xw = x.to(first.dtype)
    kinds = {"torch": lambda w: F.linear(xw, w)}
    if kernels.available():
        kinds["ours"] = lambda w: torch.ops.rdepth.linear(x, w)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    best = dict.fromkeys(kinds, 0.0)
    for _ in range(repeats):
        for name, fn in kinds.items():
            seconds, _ = _timed(lambda: [fn(w) for w in weights])  # noqa: B023
            best[name] = max(best[name], nbytes / seconds / 1e9)
    return {f"{name}_GBps": rate for name, rate in best.items()}


def gemv_bound(threads: int) -> float:
    """The machine's weight-streaming rate, GB/s, at `threads`: torch's fp32 F.linear on 35840 x 5280 (the decode
    bound a token's weight bytes are divided by)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return gemv_rates(*GEMV_SHAPES[0], "fp32")["torch_GBps"]
    finally:
        torch.set_num_threads(saved)


# ------------------------------------------------------------------------------------------------- scenarios
def scenario_speed(args: argparse.Namespace, preset: str, new_tokens: int) -> dict:
    model = build(preset)
    ids = prompt_ids(model.config.vocab_size, 1, 32)
    result: dict = {"preset": preset, "num_steps": 32, "batch": 1, "prompt": 32, "new_tokens": new_tokens}
    ours_s, ours_cpu, ref_s, ref_cpu, ref_out = [], [], [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for _ in range(args.repeats):  # alternate: ours, reference, ours, reference ...
            seconds, out = time_ours(model, ids, max_new_tokens=new_tokens, num_steps=32)
            ours_s.append(seconds)
            ours_cpu.append(CPU_SECONDS[0])
            ref = run_reference(args, Path(tmp), ids.tolist(), new_tokens, 32)
            if ref is not None:
                ref_s.append(ref["seconds"])
                ref_cpu.append(ref["cpu_seconds"])
                ref_out = ref
    result["ours_tokens_per_s"] = new_tokens / min(ours_s)
    result["ours_tokens_per_cpu_s"] = new_tokens / min(ours_cpu)
    if ref_out is not None:
        result["reference_tokens_per_s"] = new_tokens / min(ref_s)
        result["reference_tokens_per_cpu_s"] = new_tokens / min(ref_cpu)
        result["speedup"] = result["ours_tokens_per_s"] / result["reference_tokens_per_s"]
        result["speedup_cpu_time"] = result["ours_tokens_per_cpu_s"] / result["reference_tokens_per_cpu_s"]
        result["same_tokens_as_reference"] = ref_out["sequences"] == out.sequences.tolist()
    if preset == "medium":
        prefill, _ = time_ours(model, ids, max_new_tokens=1, num_steps=32)
        decode_tps = (new_tokens - 1) / max(min(ours_s) - prefill, 1e-9)
        traffic = weight_bytes_per_token(model, 32) * decode_tps
        bandwidth = memory_bandwidth()
        result.update(ours_decode_tokens_per_s=decode_tps, weight_bytes_per_token=weight_bytes_per_token(model, 32),
                      weight_traffic_GBps=traffic / 1e9, copy_bandwidth_GBps=bandwidth / 1e9,
                      bandwidth_fraction=traffic / bandwidth)
    return result


def scenario_batch16(args: argparse.Namespace) -> dict:
    model = build("medium")
    B, T, new = 16, 16, args.batch_new_tokens
    ids = prompt_ids(model.config.vocab_size, B, T)
    prefill, _ = time_ours(model, ids, max_new_tokens=1, num_steps=32)
    total, _ = time_ours(model, ids, max_new_tokens=new, num_steps=32, warm_up=False)
    decode = max(total - prefill, 1e-9)
    flops = sum(flops_per_token(model, 32, T + i) for i in range(1, new)) * B
    achieved = flops / decode
    d = model.config.n_embd
    peak = matmul_flops(2048, 2048, 2048)
    same_shape = streaming_matmul_flops(B, d, 2 * model.config.intermediate_size)
    return {"preset": "medium", "batch": B, "num_steps": 32, "prompt": T, "new_tokens": new,
            "decode_tokens_per_s": B * (new - 1) / decode, "decode_GFLOPs": achieved / 1e9,
            "matmul_2048_GFLOPs": peak / 1e9, "fraction_of_matmul": achieved / peak,
            "streaming_matmul_same_shape_GFLOPs": same_shape / 1e9,
            "fraction_of_streaming_same_shape_matmul": achieved / same_shape}


def scenario_kv(args: argparse.Namespace) -> dict:
    from recurrent_depth.inference.generate import generate

    model = build("small")
    ids = prompt_ids(model.config.vocab_size, 1, 32)
    rows = {}
    for policy in ("full", "latest", 8, 4, 1):
        out = generate(model, ids, max_new_tokens=64, num_steps=32, kv_sharing=policy)
        rows[str(policy)] = {"kv_MiB": out.kv_cache_bytes / 2**20, "core_kv_MiB": out.stats["core_kv_bytes"] / 2**20}
    rows["core_ratio_1_vs_full"] = rows["1"]["core_kv_MiB"] / rows["full"]["core_kv_MiB"]
    return {"preset": "small", "num_steps": 32, "tokens": 96, "policies": rows}


def scenario_adaptive(args: argparse.Namespace) -> dict:
    model = build("small", converging=True)
    ids = prompt_ids(model.config.vocab_size, 1, 32)
    new = args.adaptive_new_tokens
    base_s, base = time_ours(model, ids, max_new_tokens=new, num_steps=32)
    ref = base.sequences[0, 32:]
    rows = {"fixed_r32": {"tokens_per_s": new / base_s, "mean_steps": 32.0}}
    runs = {"kl_5e-4": dict(exit_criterion="kl", exit_threshold=5e-4),
            "kl_5e-4_latest": dict(exit_criterion="kl", exit_threshold=5e-4, kv_sharing="latest"),
            "latent-diff_0.03": dict(exit_criterion="latent-diff", exit_threshold=0.03),
            "speculative_draft4_look4": dict(draft_steps=4, lookahead=4),
            "speculative_draft8_look8": dict(draft_steps=8, lookahead=8)}
    for name, kw in runs.items():
        seconds, out = time_ours(model, ids, max_new_tokens=new, num_steps=32, **kw)
        row = {"tokens_per_s": new / seconds, "speedup_vs_fixed": base_s / seconds,
               "mean_steps": float(out.steps.float().mean()),
               "greedy_agreement": float((out.sequences[0, 32:] == ref).float().mean())}
        if "accepted_per_round" in out.stats:
            row["accepted_per_round"] = out.stats["accepted_per_round"]
        rows[name] = row
    return {"model": "small preset, adapter state half x0.3 (converging stub)", "num_steps": 32, "new_tokens": new,
            "runs": rows}


def scenario_adaptive_batch(args: argparse.Namespace) -> dict:
    """The converging stub with a batch of 8 different prompts, r <= 32: fixed depth and per-row exit, through the
    fused CPU path and through the eager modules (`fused_decode = False`) in the same run."""
    model = build("small", converging=True)
    ids = prompt_ids(model.config.vocab_size, 8, 32)
    new = args.adaptive_new_tokens // 2
    runs = {"fixed_r32": {}, "kl_5e-4_latest": dict(exit_criterion="kl", exit_threshold=5e-4, kv_sharing="latest"),
            "latent-diff_0.03": dict(exit_criterion="latent-diff", exit_threshold=0.03)}
    rows: dict = {}
    for name, kw in runs.items():
        row: dict = {}
        outs = {}
        for path, fused_on in (("eager", False), ("fused", True)):
            model.transformer.fused_decode = fused_on
            seconds, outs[path] = time_ours(model, ids, repeats=args.repeats, max_new_tokens=new, num_steps=32, **kw)
            row[f"{path}_tokens_per_s"] = 8 * new / seconds
        model.transformer.fused_decode = True
        row["fused_vs_eager"] = row["fused_tokens_per_s"] / row["eager_tokens_per_s"]
        row["mean_steps"] = float(outs["fused"].steps.float().mean())
        row["same_tokens_and_steps"] = (outs["fused"].sequences.tolist() == outs["eager"].sequences.tolist()
                                        and outs["fused"].steps.tolist() == outs["eager"].steps.tolist())
        rows[name] = row
    return {"model": "small preset, adapter state half x0.3 (converging stub)", "batch": 8, "num_steps": 32,
            "new_tokens": new, "runs": rows}


def scenario_trained(args: argparse.Namespace) -> dict:
    """The bundled trained checkpoint (the reproduce run's recurrent arm, `addition`) on its task's test problems,
    one prompt at a time (batch 1, the latency case), greedy from a zero state with at most r = 32 recurrences:
    fixed depth against adaptive exit and self-speculative decoding."""
    import torch

    from recurrent_depth.assets import bundle_info, resolve_model
    from recurrent_depth.data.tokenizer import encode_prompt, load_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM
    from recurrent_depth.inference.generate import generate
    from recurrent_depth.tasks import get_task

    path = resolve_model(None)
    info = bundle_info(path)
    model, tok = RecurrentDepthForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    task = get_task(info["task"], **info.get("difficulty", {}))
    rows = task.generate(args.trained_prompts, split="test", seed=11)
    prompts = [torch.tensor([encode_prompt(tok, r["prompt"])]) for r in rows]
    budget = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 1
    runs = {"fixed_r32": {}, "kl_5e-4": dict(exit_criterion="kl", exit_threshold=5e-4),
            "kl_5e-4_latest": dict(exit_criterion="kl", exit_threshold=5e-4, kv_sharing="latest"),
            "kl_1e-4": dict(exit_criterion="kl", exit_threshold=1e-4),
            "latent-diff_0.03": dict(exit_criterion="latent-diff", exit_threshold=0.03),
            "speculative_draft8_look4": dict(draft_steps=8, lookahead=4),
            "speculative_draft4_look4": dict(draft_steps=4, lookahead=4)}
    generate(model, prompts[0], max_new_tokens=2, num_steps=32)  # warm-up (and the fused op's build)
    results: dict = {}
    fixed_answers: list[list[int]] = []
    for name, kw in runs.items():
        seconds, tokens, steps, correct, agree = 0.0, 0, 0, 0, 0
        for i, (ids, row) in enumerate(zip(prompts, rows)):
            start = time.perf_counter()
            out = generate(model, ids, max_new_tokens=budget, num_steps=32, eos_token_id=tok.eos_token_id, **kw)
            seconds += time.perf_counter() - start
            new = out.sequences[0, ids.shape[1]:].tolist()
            answer = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
            tokens += len(answer)
            steps += int(out.steps[0, : len(answer)].sum())  # speculative: the verified depth, 32
            correct += int(task.score(tok.decode(answer, skip_special_tokens=True), row["answer"]))
            if name == "fixed_r32":
                fixed_answers.append(answer)
            agree += int(answer == fixed_answers[i])
        results[name] = {"tokens_per_s": tokens / seconds, "mean_steps_per_token": steps / tokens,
                         "accuracy": correct / len(rows), "same_answer_as_fixed": agree / len(rows)}
    base = results["fixed_r32"]["tokens_per_s"]
    for row in results.values():
        row["speedup_vs_fixed"] = row["tokens_per_s"] / base
    return {"model": f"bundled checkpoint ({info['task']}, trained at mean depth {info['mean_recurrence']})",
            "prompts": len(rows), "max_steps": 32, "runs": results}


def scenario_gemv(args: argparse.Namespace) -> dict:
    """GB/s of ours and torch's batch-1 products on huginn-3.5b's shapes, fp32 and bf16, at 1 and --threads
    threads, with each rate's share of the bound (torch fp32 on 35840 x 5280 at that thread count)."""
    import torch

    result: dict = {"load_average_before": os.getloadavg()}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        rows: dict = {}
        for n_out, n_in in GEMV_SHAPES:
            rows[f"{n_out}x{n_in}"] = {dt: gemv_rates(n_out, n_in, dt) for dt in DTYPE_NAMES}
        bound = rows[f"{GEMV_SHAPES[0][0]}x{GEMV_SHAPES[0][1]}"]["fp32"]["torch_GBps"]
        for shape in rows.values():
            for rates in shape.values():
                rates.update({k.replace("GBps", "share_of_bound"): v / bound for k, v in list(rates.items())})
            if "ours_GBps" in shape["bf16"]:
                shape["ours_bf16_over_fp32_GBps"] = shape["bf16"]["ours_GBps"] / shape["fp32"]["ours_GBps"]
        result[f"threads_{threads}"] = {"bound_GBps": bound, **rows}
    torch.set_num_threads(args.threads)
    result["load_average_after"] = os.getloadavg()
    return result


def scenario_huginn(args: argparse.Namespace) -> dict:
    """Batch-1 greedy generation at huginn-3.5b's shape (or --huginn-preset's), ours against the reference, per
    dtype; each run a fresh process, so that only one model is ever in memory."""
    preset, r, new = args.huginn_preset, args.huginn_num_steps, args.huginn_new_tokens
    dtypes = args.huginn_dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPE_NAMES))
    if unknown:
        raise SystemExit(f"--huginn-dtypes: unknown {unknown}; valid: {', '.join(DTYPE_NAMES)}")
    paths = bench_checkpoints(preset, dtypes)
    from recurrent_depth import RecurrentDepthConfig

    vocab = RecurrentDepthConfig.from_name(preset).vocab_size
    prompt = prompt_ids(vocab, 1, args.huginn_prompt_tokens).tolist()
    device = args.huginn_device
    result: dict = {"preset": preset, "num_steps": r, "batch": 1, "prompt": args.huginn_prompt_tokens,
                    "new_tokens": new, "device": device, "threads": args.threads, "load_average": os.getloadavg()}
    if device == "cpu":
        result["gemv_bound_GBps"] = gemv_bound(args.threads)
    spec = dict(prompt=prompt, max_new_tokens=new, num_steps=r, threads=args.threads, device=device)
    for dt in dtypes:
        ours, ref = [], []
        for _ in range(args.repeats):  # alternate: ours, reference, ours, reference ...
            ours.append(run_worker(sys.executable, "--ours-worker", {**spec, "checkpoint": str(paths[dt]),
                                                                     "dtype": dt}))
            got = run_reference(args, paths[dt], prompt, new, r, dtype=dt, device=device, prefill=True)
            if got is not None:
                ref.append(got)
        result[dt] = _huginn_row(ours, ref, new, result.get("gemv_bound_GBps"))
    if {"fp32", "bf16"} <= set(dtypes):
        result["ours_bf16_over_ours_fp32"] = result["bf16"]["ours_tokens_per_s"] / result["fp32"]["ours_tokens_per_s"]
    return result


def _huginn_row(ours: list[dict], ref: list[dict], new: int, bound_GBps: float | None) -> dict:
    """One dtype's figures from the workers' best runs: tokens/s over the whole generate (prompt included) and over
    the decode steps alone (new - 1 tokens after the one-token generate's time), ours as a share of the bound."""
    best = min(ours, key=lambda o: o["seconds"])
    decode = lambda o: (new - 1) / max(o["seconds"] - o["prefill_seconds"], 1e-9)  # noqa: E731
    row = {"ours_tokens_per_s": new / best["seconds"], "ours_decode_tokens_per_s": max(map(decode, ours)),
           "ours_fused_calls": best["fused_calls"], "weight_GB_per_token": best["weight_bytes_per_token"] / 1e9}
    if bound_GBps is not None:
        row["bound_decode_tokens_per_s"] = bound_GBps * 1e9 / best["weight_bytes_per_token"]
        row["ours_decode_share_of_bound"] = row["ours_decode_tokens_per_s"] / row["bound_decode_tokens_per_s"]
    if ref:
        ref_best = min(ref, key=lambda o: o["seconds"])
        row.update(reference_tokens_per_s=new / ref_best["seconds"],
                   reference_decode_tokens_per_s=max(map(decode, ref)),
                   same_tokens_as_reference=ref_best["sequences"] == best["sequences"])
        row["speedup"] = row["ours_tokens_per_s"] / row["reference_tokens_per_s"]
        row["decode_speedup"] = row["ours_decode_tokens_per_s"] / row["reference_decode_tokens_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-worker", help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", help=argparse.SUPPRESS)
    parser.add_argument("--reference-dir", default=os.environ.get("REFERENCE_DIR"))
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON",
                                                                     str(REPO / ".venv-tf4" / "bin" / "python")))
    parser.add_argument("--scenarios", default="small,medium,batch16,kv,adaptive,adaptive_batch,trained,gemv")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs per side (best kept)")
    parser.add_argument("--medium-new-tokens", type=int, default=64)
    parser.add_argument("--batch-new-tokens", type=int, default=8)
    parser.add_argument("--adaptive-new-tokens", type=int, default=32)
    parser.add_argument("--trained-prompts", type=int, default=50, help="task problems in the `trained` scenario")
    parser.add_argument("--quick", action="store_true", help="fewer tokens: a smoke run")
    parser.add_argument("--huginn-preset", default="huginn-3.5b", help="the `huginn-3.5b` scenario's shape")
    parser.add_argument("--huginn-dtypes", default="fp32,bf16", help="comma-separated, of fp32 and bf16")
    parser.add_argument("--huginn-num-steps", type=int, default=4, help="recurrences per token (r)")
    parser.add_argument("--huginn-prompt-tokens", type=int, default=16)
    parser.add_argument("--huginn-new-tokens", type=int, default=8)
    parser.add_argument("--huginn-device", default="cpu", help="cpu or cuda (both sides)")
    args = parser.parse_args()
    if args.reference_worker:
        print(json.dumps(reference_worker(json.loads(args.reference_worker))))
        return
    if args.ours_worker:
        print(json.dumps(ours_worker(json.loads(args.ours_worker))))
        return
    import torch

    torch.set_num_threads(args.threads)
    small_new = 64
    if args.quick:
        small_new, args.medium_new_tokens, args.batch_new_tokens, args.adaptive_new_tokens = 8, 4, 3, 8
        args.trained_prompts = 5
        args.repeats = 1
    report: dict = {"threads": args.threads, "torch": torch.__version__, "reference": bool(args.reference_dir)}
    with torch.inference_mode():
        for name in args.scenarios.split(","):
            if name == "small":
                report["small"] = scenario_speed(args, "small", small_new)
            elif name == "medium":
                report["medium"] = scenario_speed(args, "medium", args.medium_new_tokens)
            elif name == "batch16":
                report["batch16"] = scenario_batch16(args)
            elif name == "kv":
                report["kv"] = scenario_kv(args)
            elif name == "adaptive":
                report["adaptive"] = scenario_adaptive(args)
            elif name == "adaptive_batch":
                report["adaptive_batch"] = scenario_adaptive_batch(args)
            elif name == "trained":
                report["trained"] = scenario_trained(args)
            elif name == "gemv":
                report["gemv"] = scenario_gemv(args)
            elif name == "huginn-3.5b":
                report["huginn-3.5b"] = scenario_huginn(args)
            else:
                raise SystemExit(f"unknown scenario {name!r}; valid: small, medium, batch16, kv, adaptive, "
                                 "adaptive_batch, trained, gemv, huginn-3.5b")
            print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
