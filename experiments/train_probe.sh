#!/usr/bin/env bash
# A short `rdepth train` probe on 1 CPU thread (tiny preset, char tokenizer, batch 64, lr 1e-3, answer-only loss),
# validation accuracy at depths 1, 2, 4, 8, 16 every 200 steps; output in ${PROBE_OUT:-/tmp/h5}/NAME.
#   experiments/train_probe.sh NAME TASK 'DIFFICULTY' [--set KEY=VALUE ...]
#   experiments/train_probe.sh pc pointer_chase '{slots: 10, hops: [1, 4], ood_hops: [5, 7], roots: 3}' \
#       --set model.mean_recurrence=4 --set model.mean_backprop_depth=2 --set train.steps=400
#   experiments/train_probe.sh vb0 variable_binding '{hops: [0, 0], ood_hops: [0, 0]}' --set train.steps=1000 \
#       --set depth.sampler=non-recurrent
set -euo pipefail
name=$1 task=$2 difficulty=$3; shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
out=${PROBE_OUT:-/tmp/h5}/$name
rm -rf "$out"; mkdir -p "$out"
OMP_NUM_THREADS=1 PYTHONPATH=$root /work/main/.venv/bin/rdepth train --out "$out" \
  --set model.preset=tiny --set data.kind=task --set "data.task.name=$task" \
  --set "data.task.difficulty=$difficulty" --set data.task.num_train=40000 --set data.tokenizer=char \
  --set data.seq_len=64 --set train.steps=600 --set train.batch_size=64 --set optim.lr=1e-3 \
  --set optim.warmup_steps=50 --set runtime.threads=1 --set runtime.device=cpu --set runtime.dtype=float32 \
  --set log.progress=false --set log.every=50 --set eval.every=200 --set 'eval.depths=[1,2,4,8,16]' \
  --set checkpoint.keep=1 "$@" > "$out/log" 2>&1
tail -1 "$out/log"
