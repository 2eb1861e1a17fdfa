"""Does a local attention window in the core turn extra iterations into longer chains? (issue 16, a probe)

With global attention every layer can read every position, so a model can shortcut a chain in a few layers and sit
at a fixed point; with the core's attention limited to the last `--window` positions, information moves at most
`window - 1` positions per core layer, so a chain of n operations needs about n / (2 (window - 1) / 2) iterations
and more test-time iterations can reach further (the receptive-field argument of Schwarzschild et al. 2021 and
Bansal et al. 2022). The prelude and coda keep global attention.

    PYTHONPATH=. python experiments/window_probe.py --window 3 --steps 1500 --out /tmp/window3.json
    PYTHONPATH=. python experiments/window_probe.py --window 0 --steps 1500 --out /tmp/window0.json   # global

An in-process trainer on the library's pieces (the task rows with dense labels, the training pipeline's encoding,
Huginn's depth sampler, truncated backprop via `num_steps=(n, k)`), one torch thread; the window is the model's
`core_attention_window` config field. Prints one JSON line per evaluation: teacher-forced exact match on the test
and ood splits at several depths, by level. `experiments/reproduce.py` (`Scale.core_window`) runs the full
comparison with it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.data.loader import batch_indices
from recurrent_depth.data.prompts import encode_examples
from recurrent_depth.data.tokenizer import char_tokenizer
from recurrent_depth.depth_sampler import make_sampler
from recurrent_depth.evaluation.sweeps import depth_sweep
from recurrent_depth.tasks import get_task
from recurrent_depth.training.step import token_loss_sum


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=3, help="core attention window (0: global, Huginn's)")
    p.add_argument("--task", default="modular_chain")
    p.add_argument("--knobs", default='{"ops": [1, 6], "ood_ops": [7, 12]}')
    p.add_argument("--fields", default='{"n_embd": 64, "n_heads": 4, "intermediate_size": 176}')
    p.add_argument("--mean", type=int, default=6)
    p.add_argument("--backprop", type=int, default=3)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--every", type=int, default=400)
    p.add_argument("--depths", default="1,2,4,8,16,32,64")
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--out", default=None, help="also write the evaluations as JSON lines here")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task(args.task, **json.loads(args.knobs))
    tok = char_tokenizer(task.alphabet)
    train = encode_examples(task.generate(40000, "train", seed=0, targets=True), tok, 64, answer_only=True)
    evals = {s: task.generate(args.n_eval, s, seed=1000 + i) for i, s in enumerate(("test", "ood"))}
    cfg = RecurrentDepthConfig.from_name("debug", vocab_size=len(tok), n_layers_in_prelude=1,
                                         n_layers_in_recurrent_block=2, n_layers_in_coda=1,
                                         mean_recurrence=args.mean, mean_backprop_depth=args.backprop,
                                         block_size=256, core_attention_window=args.window,
                                         **json.loads(args.fields))
    model = RecurrentDepthForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    sampler = make_sampler("poisson-lognormal-filling", args.mean, args.backprop)
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.dim() < 2 else decay).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    depths = [int(d) for d in args.depths.split(",")]
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 60) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(
            3.14159265 * step / args.steps)).item()))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = train.rows(batch_indices(step, args.batch, len(train), 0))
        n, k = sampler.sample(step=step)
        model.train()
        out = model(batch.inputs, num_steps=(n, k), init_scale=1.0)
        loss = token_loss_sum(out.logits, batch.labels) / (batch.labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            model.eval()
            rec = {"window": args.window, "step": step + 1, "loss": round(loss.item(), 4),
                   "s": round(time.perf_counter() - start, 1)}
            for split, rows in evals.items():
                recs = depth_sweep(model, tok, rows, depths, method="teacher_forced")
                rec[split] = {r["num_steps"]: round(r["accuracy"], 3) for r in recs}
                rec[f"{split}_by_level"] = {r["num_steps"]: {k: round(v, 2) for k, v in r["accuracy_by_level"].items()}
                                            for r in recs}
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
