#!/usr/bin/env bash
# GPU checks that fit in a few minutes of a lent GPU machine; each step prints JSON.
#
#   [REFERENCE_DIR=/path/to/recpre] [REFERENCE_PYTHON=python3] [PYTHON=python3] bash benchmarks/gpu.sh [--dry-run]
#
# 1. generation: the `huginn-3.5b` scenario of benchmarks/generate.py in bf16 at r = 32 (16-token prompt, 8 new
#    tokens, greedy, zero initial state) on cuda, ours against the reference when REFERENCE_DIR is set (the reference
#    needs transformers 4.5x: point REFERENCE_PYTHON at a Python that has it, e.g. wheels carried to the machine).
#    The first run builds the random-weight checkpoint (fp32 init on the CPU, rounded to bf16: ~14 GB of memory,
#    7 GB under ~/.cache/rdepth-bench/huginn-3.5b-bf16/).
# 2. training: AdamW training steps of a ~330M-parameter config (d 1536, 12 heads, 2 + 4 + 2 layers, vocab 65536,
#    tied embeddings) at batch 8 x 1024 tokens, num_steps (24, 8) (24 recurrences without autograd, 8 with), bf16
#    autocast: step seconds, tokens/s and MFU, the model's matmul FLOPs per second over the peak: the GPU's dense bf16
#    figure (H100/H200: 989 TFLOP/s; PEAK_TFLOPS overrides) and an 8192^3 bf16 matmul measured in the same run.
# --dry-run: the same two steps on the CPU with tiny shapes (the `small` preset at r = 2 for 2 tokens; a d = 64
#    training config at batch 2 x 32, fp32, its matmul peak a 512^3 fp32 product), so that the script stays working
#    where no GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run]  (unknown argument: $arg)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
export REFERENCE_PYTHON=${REFERENCE_PYTHON:-$PYTHON}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  gen=(--huginn-preset small --huginn-num-steps 2 --huginn-prompt-tokens 4 --huginn-new-tokens 2 --huginn-device cpu)
else
  gen=(--huginn-num-steps 32 --huginn-device cuda)
fi
"$PYTHON" benchmarks/generate.py --scenarios huginn-3.5b --huginn-dtypes bf16 --repeats 1 "${gen[@]}"

"$PYTHON" - "$DRY" <<'EOF'
"""Training-step MFU: model matmul FLOPs per step (forward of every recurrence, backward of the prelude, coda, head
and the n_grad recurrences with gradients, causal attention included) over the step's time and the peak."""
import json
import os
import sys
import time

import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.training.step import forward_backward, initial_states

dry = sys.argv[1] == "1"
device = torch.device("cpu" if dry else "cuda")
dims = dict(n_embd=64, n_heads=4, intermediate_size=176, vocab_size=512) if dry else \
    dict(n_embd=1536, n_heads=12, intermediate_size=4096, vocab_size=65536)
batch, seq, num_steps, timed = (2, 32, (2, 2), 2) if dry else (8, 1024, (24, 8), 5)
cfg = RecurrentDepthConfig(**dims, block_size=seq, n_layers_in_prelude=2, n_layers_in_recurrent_block=4,
                           n_layers_in_coda=2, mean_recurrence=32, mean_backprop_depth=8)
torch.manual_seed(0)
model = RecurrentDepthForCausalLM(cfg).to(device).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
inputs, labels = ids[:, :-1], ids[:, 1:]
s0 = initial_states(cfg, torch.arange(batch), seq, 0, 0, device)


def autocast():  # bf16 on the GPU; the dry run stays fp32 (a CPU bf16 autocast is not what this checks)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def step():
    forward_backward(model, inputs, labels, s0, num_steps, 1.0 / (batch * seq), autocast)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def matrices(*modules):
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)


t = model.transformer
outer = matrices(t.prelude, t.coda) + cfg.vocab_size * cfg.n_embd  # + the head (tied: the embedding's matrix)
core = matrices(t.core_block, t.adapter)
n_ng, n_g = num_steps
L_out, L_core = len(t.prelude) + len(t.coda), len(t.core_block)
attention = 2 * seq * cfg.n_embd  # causal QK^T and AV per token and layer invocation, forward
per_token = (2 * (outer + (n_ng + n_g) * core) + 4 * (outer + n_g * core)
             + attention * (L_out + (n_ng + n_g) * L_core) + 2 * attention * (L_out + n_g * L_core))
for _ in range(2):  # warm-up
    step()
sync()
start = time.perf_counter()
for _ in range(timed):
    step()
sync()
seconds = (time.perf_counter() - start) / timed
achieved = per_token * batch * seq / seconds

n = 512 if dry else 8192
a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
for _ in range(3):
    a @ a
sync()
start = time.perf_counter()
for _ in range(10):
    a @ a
sync()
matmul = 2 * n**3 * 10 / (time.perf_counter() - start)
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12 if "PEAK_TFLOPS" in os.environ else \
    (989e12 if any(g in name for g in ("H100", "H200")) else None)
print(json.dumps({"train": {
    "device": name, "parameters": model.num_parameters(), "batch": batch, "seq": seq, "num_steps": num_steps,
    "step_seconds": seconds, "tokens_per_s": batch * seq / seconds, "model_TFLOPs_per_s": achieved / 1e12,
    "matmul_TFLOPs_per_s": matmul / 1e12, "mfu_vs_measured_matmul": achieved / matmul,
    "peak_TFLOPs": peak and peak / 1e12, "mfu": peak and achieved / peak}}, indent=1))
EOF
