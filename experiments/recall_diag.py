"""Why does associative recall (variable_binding) not learn? A small in-process trainer that swaps one thing at a time.

    PYTHONPATH=. python experiments/recall_diag.py --model ours --steps 600 --hops 0,0
    PYTHONPATH=. python experiments/recall_diag.py --model gpt --steps 600 --hops 0,0      # a plain GPT, same data

`ours` is RecurrentDepthForCausalLM (preset `--preset`, Huginn init) run at a fixed depth `--depth` from s0 drawn with
`--init-scale` (0: zeros); `gpt` is a textbook pre-LN GPT (learned positions, PyTorch default init, same width and
layer count as prelude + core + coda). Both see the same rows, the same char tokenizer, the same answer-only labels
(built by the training pipeline's `encode_examples`), AdamW with linear warm-up then constant lr. Prints one JSON line
per evaluation: the step, the training loss (mean over the last `--every` steps, per supervised token) and the
teacher-forced exact-match accuracy on 512 held-out rows (a built-in task: also on 512 `ood` rows, `ood_acc`). One
torch thread; a run of 600 steps takes 1-3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.data.prompts import IGNORE, encode_examples
from recurrent_depth.data.tokenizer import char_tokenizer
from recurrent_depth.tasks import get_task


class GPT(nn.Module):
    """A plain pre-LN causal transformer with learned positional embeddings (the calibration baseline)."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, ff: int, block: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T))
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.ln(x))


def build(args: argparse.Namespace, vocab: int):
    """(model, forward(ids) -> logits) for --model."""
    fields = json.loads(args.fields) if args.fields else {}
    cfg = RecurrentDepthConfig.from_name(args.preset, vocab_size=vocab, **fields)
    if args.model == "gpt":
        layers = cfg.n_layers_in_prelude + cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
        model = GPT(vocab, cfg.n_embd, cfg.n_heads, layers, cfg.intermediate_size, 256)
        return model, model
    model = RecurrentDepthForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        depth = args.depth if not args.random_depth else int(torch.randint(1, 2 * args.depth, ()).item())
        return model(ids, num_steps=depth, init_scale=args.init_scale).logits

    return model, forward


def accuracy(forward, data, n: int) -> tuple[float, float]:
    """Teacher-forced exact match of every answer token (and <eos>) on the first n rows, and per-token accuracy."""
    with torch.no_grad():
        logits = forward(data.inputs[:n])
    ans = data.answer_labels[:n]
    mask = ans != IGNORE
    hit = logits.argmax(-1) == ans
    return float((hit | ~mask).all(-1).float().mean()), float(hit[mask].float().mean())


def pointer_rows(n: int, slots: int, hops: tuple[int, int], split: str, seed: int) -> list[dict]:
    """Pointer chasing by position: "31134770;5?" -> the root reached from slot 5 by following slot -> digit (a root
    holds its own index). Slots are fixed positions, so each hop is "read the slot this digit names"."""
    import random

    from recurrent_depth.tasks import in_held_out

    rng, rows = random.Random(f"pointer:{split}:{seed}"), []
    while len(rows) < n:
        k = rng.randint(*hops)
        order = rng.sample(range(slots), slots)
        parent = {order[0]: order[0]}
        depth = {order[0]: 0}
        for i in range(1, k + 1):  # the query chain
            parent[order[i]], depth[order[i]] = order[i - 1], i
        for s in order[k + 1:]:  # the rest: new roots or children of anything shallower than the max hops
            target = rng.choice([v for v in parent if depth[v] < hops[1]] + [s])
            parent[s], depth[s] = target, (0 if target == s else depth[target] + 1)
        prompt = "".join(str(parent[i]) for i in range(slots)) + f";{order[k]}?"
        if in_held_out("pointer", prompt) == (split != "train"):
            rows.append({"prompt": prompt, "answer": str(order[0]), "level": k})
    return rows


def mqar_rows(n: int, pairs: int, queries: int, split: str, seed: int, sep: str = "=") -> list[dict]:
    """Multi-query recall in the prompt/answer format: "a=3,b=7,c=1,d=0;bd?" -> "70" (each answer digit is the
    value of one query key, in order: `queries` supervised recalls per row instead of one). Values may repeat.
    sep: what stands between a key and its value ("" puts them side by side: "a3,b7;b?")."""
    import random
    import string

    from recurrent_depth.tasks import in_held_out

    rng, rows = random.Random(f"mqar:{split}:{seed}"), []
    while len(rows) < n:
        keys = rng.sample(string.ascii_lowercase, pairs)
        vals = [rng.choice(string.digits) for _ in keys]
        asked = rng.sample(range(pairs), queries)
        prompt = ",".join(f"{k}{sep}{v}" for k, v in zip(keys, vals)) + ";" + "".join(keys[i] for i in asked) + "?"
        if in_held_out("mqar", prompt) == (split != "train"):
            rows.append({"prompt": prompt, "answer": "".join(vals[i] for i in asked)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ours", "gpt"], default="ours")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--fields", default="", help="JSON object of RecurrentDepthConfig overrides")
    p.add_argument("--task", default="variable_binding", help="a built-in task, or mqar (see --mqar)")
    p.add_argument("--mqar", default="6,3", help="mqar: PAIRS,QUERIES per row")
    p.add_argument("--sep", default="=", help="mqar: between a key and its value ('' for side by side)")
    p.add_argument("--pointer", default="8,1,1", help="pointer: SLOTS,MIN_HOPS,MAX_HOPS")
    p.add_argument("--knobs", default='{"hops": [0, 0], "ood_hops": [0, 0]}', help="JSON difficulty knobs")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--random-depth", action="store_true", help="depth drawn uniformly in [1, 2*depth-1] per step")
    p.add_argument("--init-scale", type=float, default=0.0)
    p.add_argument("--full-loss", action="store_true", help="loss on every token, not the answer only")
    p.add_argument("--n-train", type=int, default=40000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    builtin = args.task not in ("mqar", "pointer")  # a built-in task also reports its ood split
    task = get_task(args.task if builtin else "variable_binding", **json.loads(args.knobs))
    tok = char_tokenizer(task.alphabet)
    if args.task == "pointer":
        slots, lo, hi = (int(x) for x in args.pointer.split(","))
        train_rows = pointer_rows(args.n_train, slots, (lo, hi), "train", args.seed)
        test_rows = pointer_rows(512, slots, (lo, hi), "test", args.seed)
    elif args.task == "mqar":
        pairs, queries = (int(x) for x in args.mqar.split(","))
        train_rows = mqar_rows(args.n_train, pairs, queries, "train", args.seed, args.sep)
        test_rows = mqar_rows(512, pairs, queries, "test", args.seed, args.sep)
    else:
        train_rows, test_rows = task.generate(args.n_train, "train", args.seed), task.generate(512, "test", args.seed)
    train = encode_examples(train_rows, tok, 128, not args.full_loss)
    test = encode_examples(test_rows, tok, 128, True)
    ood = encode_examples(task.generate(512, "ood", args.seed), tok, 128, True) if builtin else None
    model, forward = build(args, len(tok))
    decay = [q for n, q in model.named_parameters() if q.dim() >= 2]
    rest = [q for n, q in model.named_parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train.inputs), (args.batch,), generator=gen)
        logits = forward(train.inputs[idx])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), train.labels[idx].reshape(-1),
                               ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % args.every == 0 or step == args.steps:
            model.eval()
            acc, token_acc = accuracy(forward, test, 512)
            more = {"ood_acc": accuracy(forward, ood, 512)[0]} if ood is not None else {}
            model.train()
            recent = losses[-args.every:]
            print(json.dumps({"step": step, "loss": round(sum(recent) / len(recent), 4), "acc": acc, **more,
                              "token_acc": round(token_acc, 4), "s": round(time.perf_counter() - start, 1)}),
                  flush=True)
    print(json.dumps({"done": vars(args), "ln(roots)/2": round(math.log(task.roots) / 2, 4)}))


if __name__ == "__main__":
    main()
