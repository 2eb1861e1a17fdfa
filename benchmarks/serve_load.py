"""Serving under load, on loopback: continuous batching against one-at-a-time serving, in one run; prints JSON.

    .venv/bin/python benchmarks/serve_load.py [--model CKPT | --preset tiny] [--requests 256] [--concurrency 32]

Starts `rdepth serve` as a subprocess twice on the same checkpoint (random `--preset` weights with a character
tokenizer unless --model is given): with `--max-batch` = the concurrency, then with `--max-batch 1`. Each time 32
concurrent clients (the official `openai` async client) send the same 256 completion requests with mixed depths
(num_steps from --depths, every fourth with the KL exit criterion), greedy with a zero initial state, so both servers
must return the same text. Reported per server: requests/s, generated tokens/s, p50 / p99 request latency, errors
(must be 0), peak rows decoded together; and the batched / one-at-a-time throughput ratio.
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

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = sorted(latencies[i] for i in range(len(requests)) if latencies[i] > 0)

    def pct(p: float) -> float:
        return round(ok[min(len(ok) - 1, int(p * len(ok)))], 4) if ok else float("nan")

    return {"wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "recurrence_steps_per_s": round(steps / wall, 1),
            "p50_latency_s": pct(0.50), "p99_latency_s": pct(0.99), "errors": len(errors),
            "error_samples": errors[:3], "completion_tokens": tokens, "_texts": texts}


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: random --preset weights)")
    p.add_argument("--preset", default="tiny", help="preset for the random checkpoint")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--depths", default="1,2,4,8,16", help="num_steps values the requests draw from")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    requests = workload(args.requests, [int(d) for d in args.depths.split(",")], args.max_tokens, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else make_checkpoint(args.preset, Path(tmp) / f"{args.preset}-char")
        batched = run_one(ckpt, args.concurrency, args, requests)
        serial = run_one(ckpt, 1, args, requests)
    same = batched.pop("_texts") == serial.pop("_texts")
    report = {
        "benchmark": "serve_load",
        "config": {"model": args.model or f"random {args.preset} preset, char tokenizer", "requests": args.requests,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens, "depths": args.depths,
                   "kl_exit_share": 0.25, "server_threads": args.threads, "cpu_count": os.cpu_count()},
        "batched": batched,
        "one_at_a_time": serial,
        "throughput_ratio_batched_vs_one_at_a_time": round(batched["requests_per_s"] / serial["requests_per_s"], 2),
        "same_greedy_outputs": same,
    }
    print(json.dumps(report, indent=2))
    return 0 if batched["errors"] == 0 and serial["errors"] == 0 and same else 1


if __name__ == "__main__":
    sys.exit(main())
