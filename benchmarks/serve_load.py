"""Serving under load, on loopback: continuous batching against one-at-a-time serving, in one run; prints JSON.

    .venv/bin/python benchmarks/serve_load.py [--model CKPT | --presets small,medium] [--requests 256]
                                              [--concurrency 32]

For each checkpoint (random weights of each of --presets with a character tokenizer, unless --model is given),
starts `rdepth serve` as a subprocess twice: with `--max-batch` = the concurrency, then with `--max-batch 1`. Each
time 32
concurrent clients (the official `openai` async client) send the same 256 completion requests with mixed depths
(num_steps from --depths, every fourth with the KL exit criterion), greedy with a zero initial state, so both servers
must return the same text. Reported per server: requests/s, generated tokens/s, p50 / p99 request latency, errors
(must be 0), peak rows decoded together; KV memory polled from /health while it runs (`kv_bytes_in_use` against
`live_tokens`, their peak, and both after the last request, which must be 0); and the batched / one-at-a-time
throughput ratio. Also printed: KV bytes per token at the huginn-3.5b shape (`inference.cache.kv_bytes_per_token`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(preset: str, folder: Path) -> Path:
    import torch

    from recurrent_depth.config import RecurrentDepthConfig
    from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 ,.:;?!+-=*()\n")
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name(preset, vocab_size=len(tok))).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "recurrent_depth", "serve", "--model", str(ckpt), "--port", str(port),
           "--max-batch", str(max_batch), "--threads", str(threads), "--max-queue", "4096", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rdepth serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("rdepth serve did not start")


def workload(n: int, depths: list[int], max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "two", "plus", "three", "is", "why", "how"]
    out = []
    for i in range(n):
        extra = {"num_steps": rng.choice(depths), "init_scale": 0.0}
        if i % 4 == 3:
            extra.update(exit_criterion="kl", exit_threshold=1e-3)
        out.append({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 10))),
                    "max_tokens": max_tokens, "extra_body": extra})
    return out


async def poll_kv(url: str, samples: list[dict], stop: asyncio.Event) -> None:
    """Sample /health's KV figures every 0.1 s until `stop` is set."""
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            h = (await client.get(url + "/health")).json()
            samples.append({k: h[k] for k in ("kv_bytes_in_use", "kv_cache_bytes", "live_tokens")})
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass


def kv_summary(samples: list[dict], final: dict) -> dict:
    """Peak KV bytes in use and pools, bytes per live token while busy, and what is held once all requests ended."""
    busy = [s for s in samples if s["live_tokens"] > 0]
    per_token = [s["kv_bytes_in_use"] / s["live_tokens"] for s in busy]
    return {"samples": len(samples), "peak_kv_bytes_in_use": max((s["kv_bytes_in_use"] for s in samples), default=0),
            "peak_kv_pool_bytes": max((s["kv_cache_bytes"] for s in samples), default=0),
            "peak_live_tokens": max((s["live_tokens"] for s in samples), default=0),
            "kv_bytes_per_live_token_min_max": [round(min(per_token)), round(max(per_token))] if per_token else None,
            "after_last_request": {k: final[k] for k in ("kv_bytes_in_use", "kv_cache_bytes", "live_tokens")}}


async def drive(url: str, model: str, requests: list[dict], concurrency: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(requests):
        queue.put_nowait((i, req))
    latencies, texts, errors = [0.0] * len(requests), [""] * len(requests), []
    tokens = steps = 0

    async def worker() -> None:
        nonlocal tokens, steps
        while not queue.empty():
            i, req = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"],
                                                    temperature=0, extra_body=req["extra_body"])
            except Exception as err:  # counted and reported: the benchmark must show zero
                errors.append(repr(err)[:200])
                continue
            latencies[i] = time.perf_counter() - t0
            texts[i] = r.choices[0].text
            tokens += r.usage.completion_tokens
            steps += r.usage.recurrence_steps

    samples: list[dict] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_kv(url, samples, stop))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    stop.set()
    await poller
    await client.close()
    await asyncio.sleep(0.3)  # the engine thread measures after its last step
    ok = sorted(latencies[i] for i in range(len(requests)) if latencies[i] > 0)

    def pct(p: float) -> float:
        return round(ok[min(len(ok) - 1, int(p * len(ok)))], 4) if ok else float("nan")

    return {"wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "recurrence_steps_per_s": round(steps / wall, 1),
            "p50_latency_s": pct(0.50), "p99_latency_s": pct(0.99), "errors": len(errors),
            "error_samples": errors[:3], "completion_tokens": tokens, "_texts": texts,
            "kv": kv_summary(samples, httpx.get(url + "/health").json())}


def run_one(ckpt: Path, max_batch: int, args: argparse.Namespace, requests: list[dict]) -> dict:
    proc, url = start_server(ckpt, max_batch, args.threads)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        result = asyncio.run(drive(url, model, requests, args.concurrency))
        result["peak_running"] = httpx.get(url + "/health").json()["peak_running"]
        result["max_batch"] = max_batch
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def compare(ckpt: Path, args: argparse.Namespace, requests: list[dict]) -> dict:
    """Batched against one at a time on one checkpoint."""
    batched = run_one(ckpt, args.concurrency, args, requests)
    serial = run_one(ckpt, 1, args, requests)
    same = batched.pop("_texts") == serial.pop("_texts")
    return {"batched": batched, "one_at_a_time": serial,
            "throughput_ratio_batched_vs_one_at_a_time": round(batched["requests_per_s"] / serial["requests_per_s"], 2),
            "same_greedy_outputs": same,
            "ok": batched["errors"] == 0 and serial["errors"] == 0 and same
            and batched["kv"]["after_last_request"]["kv_bytes_in_use"] == 0}


def huginn_kv_table(num_steps: int = 32) -> dict:
    """KV bytes per token at the huginn-3.5b shape for full, latest and k=1, fp32 and bf16."""
    import torch

    from recurrent_depth.config import RecurrentDepthConfig
    from recurrent_depth.inference.cache import kv_bytes_per_token

    cfg = RecurrentDepthConfig.from_name("huginn-3.5b")
    return {str(policy): {str(dt).removeprefix("torch."): kv_bytes_per_token(cfg, policy, num_steps, dt)
                          for dt in (torch.float32, torch.bfloat16)} for policy in ("full", "latest", 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: random weights of each --presets)")
    p.add_argument("--presets", default="small,medium", help="presets for the random checkpoints, comma-separated")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--depths", default="1,2,4,8,16", help="num_steps values the requests draw from")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    requests = workload(args.requests, [int(d) for d in args.depths.split(",")], args.max_tokens, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            results[args.model] = compare(Path(args.model), args, requests)
        for preset in [] if args.model else args.presets.split(","):
            results[preset] = compare(make_checkpoint(preset, Path(tmp) / f"{preset}-char"), args, requests)
    report = {
        "benchmark": "serve_load",
        "config": {"models": args.model or f"random {args.presets} presets, char tokenizer",
                   "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "depths": args.depths, "kl_exit_share": 0.25, "server_threads": args.threads,
                   "cpu_count": os.cpu_count()},
        "results": results,
        "huginn_3.5b_kv_bytes_per_token_r32": huginn_kv_table(),
    }
    print(json.dumps(report, indent=2))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
