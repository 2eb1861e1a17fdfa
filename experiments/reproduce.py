"""The seed's claim at a scale that runs on 2 CPU cores: think longer, solve harder.

An experiment, not part of the library: it drives `recurrent_depth` through its public API (`training.config` +
`training.loop.train`, `evaluation.sweeps`, `evaluation.plots`, `tasks`). Arms, all trained on the same generated rows,
the same number of steps and sequences:

  1. `recurrent-s{seed}`: the recurrent-depth model with Huginn's randomized depth (poisson-lognormal-filling);
  2. `baseline-{m}x-lr{lr}-s{seed}`: standard fixed-depth transformers of the same width whose core runs once and
     holds enough layers for m times the recurrent model's parameters (m in `multipliers`); each size first trains
     `sweep-{m}x-lr{f}` at every learning rate of `lr_factors` x `lr` (first seed, `sweep_fraction` of the steps),
     the best on the in-distribution validation rows is kept, and it trains the full steps with every seed (mean
     and spread are reported);
  3. `flops-1x-s{seed}`: the 1x transformer trained for as many steps as give it the recurrent arm's training FLOPs
     (first seed);
  4. `fixed-depth-s{seed}`: the recurrent architecture trained at one fixed depth (why random depth matters);
  5. `cot`: a 1x transformer that writes its intermediate steps as tokens (chain of thought);
  6. `text`: the recurrent model on a real offline text corpus (the interpreter's docs), for perplexity vs depth;
  7. `lookup-s{seed}`: the recurrent model (Huginn's sampler) on the multi-hop lookup family (`lookup_task`, its own
     windows, steps and seeds), judged on its own harder split (more hops).
Then every arm is evaluated on in-distribution (`test`) and harder (`ood`: longer chains) rows and `results.json`
(with a `claims` list judged on the targets of issue 16), `results.md` and plots are written.

    python experiments/reproduce.py --quick --out runs/reproduce-quick    # a smoke run (< 2 minutes), not a result
    python experiments/reproduce.py --out results/reproduce               # the full run (results/reproduce/README.md)
    python experiments/reproduce.py bundle --from results/reproduce/arms/recurrent-s0   # the bundled checkpoint
    rdepth reproduce ...                                                  # the same, from a source checkout
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.config import RecurrentDepthConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class Scale:
    """Model shape and budget of one run. `jobs` arms train at once, each on `threads` CPU threads."""

    task: str = "modular_chain"
    difficulty: dict[str, Any] = field(default_factory=lambda: {"ops": (1, 6), "ood_ops": (7, 12)})
    targets: bool = True  # dense running-state labels (data.task.targets) for every arm trained on the task
    n_embd: int = 64
    n_heads: int = 4
    intermediate_size: int = 176
    mean_recurrence: int = 6
    backprop_depth: int = 3
    # the recurrent and fixed-depth arms' core_attention_window (0: global attention, Huginn's); the run-once
    # baselines and the chain-of-thought arm keep global attention, the standard transformer
    core_window: int = 0
    outer_window: int = 0  # the looped arms' outer_attention_window (prelude and coda; 0: global, Huginn's)
    looped_lr: float | None = None  # the recurrent and fixed-depth arms' learning rate (None: `lr`)
    curriculum: float = 0.0  # data.curriculum of every task-trained arm (the first fraction of steps ramps the level)
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    lr_factors: tuple[float, ...] = (0.25, 0.5, 1.0)  # baselines' learning-rate sweep, times `lr`
    sweep_fraction: float = 1 / 3  # the sweep's runs train this fraction of `steps` (first seed), then the chosen lr
    #                              trains the full `steps` with every seed (1.0: the sweep's run is the first seed's)
    seeds: tuple[int, ...] = (0, 1)
    baseline_seeds: tuple[int, ...] | None = None  # the baselines' full runs after the lr sweep (None: `seeds`)
    # The multi-hop lookup family (issue 16's second task family): the recurrent arm alone (Huginn's sampler, the
    # model shape above) on its own task and attention windows, judged on its own harder split; "" leaves it out
    lookup_task: str = ""
    lookup_difficulty: dict[str, Any] = field(default_factory=dict)
    lookup_window: int = 7
    lookup_outer_window: int = 3
    lookup_steps: int = 2000
    lookup_seeds: tuple[int, ...] = (0, 1)
    n_train: int = 40000
    n_eval: int = 400
    multipliers: tuple[int, ...] = (1, 2, 4, 8)
    table: tuple[int, ...] = (1, 5, 10, 50)  # the seed's table: 1x, 5x, 10x, 50x the smallest depth (r = 1)
    text_steps: int = 300
    text_max_chars: int = 1_000_000
    exit_thresholds: tuple[float, ...] = (1e-2, 3e-3, 1e-3, 5e-4, 1e-4, 1e-5)
    jobs: int = 2
    threads: int = 1


# The full run: the looped arms' core attends to the last 3 positions (core_attention_window; experiments/README.md,
# the window probes: with global attention the hard split saturates by r = 4), and so do their prelude and coda
# (outer_attention_window, session 11: the model is then translation invariant along the row, so longer chains meet
# only local contexts it was trained on; experiments/README.md, the outer-window probe), every arm trains 3000 steps,
# the first 30% of them on a curriculum over chain length (experiments/README.md, the curriculum probe: without it
# one seed in four found the repeatable step), four seeds per arm; the looped arms at lr 3e-3
# (results/reproduce/no-curriculum has the run without the curriculum, two seeds, and its `--looped-lr 1.5e-3`
# variant); the baselines' full runs at two seeds (the issue's minimum; the session-12 run trained four, and its 8x
# arms alone took 55 minutes of one core); the multi-hop lookup family: binding_chain with every lookup among the
# last two bindings (results/binding_chain, the reach-2 probe), core window 7, prelude and coda window 3
FULL = Scale(core_window=3, outer_window=3, steps=3000, curriculum=0.3, seeds=(0, 1, 2, 3), baseline_seeds=(0, 1),
             lookup_task="binding_chain", lookup_difficulty={"reach": 2})
QUICK = Scale(n_embd=32, n_heads=2, intermediate_size=64, mean_recurrence=3, backprop_depth=2, steps=20,
              batch_size=16, lr_factors=(1.0,), sweep_fraction=1.0, seeds=(0,), n_train=1000, n_eval=32,
              multipliers=(1, 2), lookup_task="binding_chain", lookup_difficulty={"reach": 2}, lookup_steps=20,
              lookup_seeds=(0,),
              table=(1, 5), text_steps=10, text_max_chars=50_000, exit_thresholds=(1e-2, 1e-3))
LEARNED = 0.05  # below this accuracy an arm learned nothing, and no claim about it can hold
EVAL_SEED = 1000  # evaluation rows: seeds 1000 (test) and 1001 (ood); training validation rows use seed 1


# ----------------------------------------------------------------------------------------------- training
def model_fields(scale: Scale, n_core: int = 2, window: int = 0, outer: int = 0) -> dict[str, Any]:
    return dict(n_embd=scale.n_embd, n_heads=scale.n_heads, intermediate_size=scale.intermediate_size,
                n_layers_in_prelude=1, n_layers_in_recurrent_block=n_core, n_layers_in_coda=1,
                mean_recurrence=scale.mean_recurrence, mean_backprop_depth=scale.backprop_depth, block_size=256,
                core_attention_window=window, outer_attention_window=outer)


def _params(scale: Scale, n_core: int, vocab: int) -> int:
    return RecurrentDepthConfig.from_name("debug", vocab_size=vocab, **model_fields(scale, n_core)).estimate_params()


def baseline_core_layers(scale: Scale, multiplier: int, vocab: int) -> int:
    """Core layers of a run-once transformer whose parameter count is closest to `multiplier` x the recurrent one."""
    target = multiplier * _params(scale, 2, vocab)
    return min(range(1, 64 * multiplier + 1), key=lambda n: abs(_params(scale, n, vocab) - target))


def lookup_scale(scale: Scale) -> Scale:
    """The scale of the multi-hop lookup family's arms: the run's model and budget on the lookup task, windows,
    steps and seeds."""
    return replace(scale, task=scale.lookup_task, difficulty=dict(scale.lookup_difficulty),
                   core_window=scale.lookup_window, outer_window=scale.lookup_outer_window, steps=scale.lookup_steps,
                   seeds=scale.lookup_seeds, lookup_task="")


def baseline_seeds(scale: Scale) -> tuple[int, ...]:
    return scale.baseline_seeds or scale.seeds


def train_flops_per_token(fields: dict[str, Any], depth: dict[str, Any]) -> float:
    """Training cost in layer-applications per token: forward through every applied layer plus backward (2x) through
    those with gradients, at the sampler's expected depth (Huginn's: mean r, gradients through the last k)."""
    p, c, core = fields["n_layers_in_prelude"], fields["n_layers_in_coda"], fields["n_layers_in_recurrent_block"]
    if depth["sampler"] == "non-recurrent":
        r = k = 1
    elif depth["sampler"] == "fixed":
        r = depth["depth"]
        k = min(r, fields["mean_backprop_depth"])
    else:
        r, k = fields["mean_recurrence"], min(fields["mean_recurrence"], fields["mean_backprop_depth"])
    return (p + c + core * r) + 2 * (p + c + core * k)


def train_tree(scale: Scale, fields: dict[str, Any], depth: dict[str, Any], data: dict[str, Any], steps: int,
               seq_len: int, lr: float | None = None, seed: int = 0) -> dict[str, Any]:
    """A `rdepth train` config (as a dict) for one arm."""
    lr = lr or scale.lr
    return {
        "model": {"preset": "debug", **fields},
        "data": {**data, "seq_len": seq_len},
        "train": {"steps": steps, "batch_size": scale.batch_size, "seed": seed},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20),
                  "schedule": "cosine", "weight_decay": 0.1},
        "depth": depth,
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"every": 10, "progress": False, "tensorboard": False},
        "eval": {"every": 0, "depths": [1 if depth["sampler"] == "non-recurrent" else scale.mean_recurrence],
                 "batches": 4},
        "runtime": {"device": "cpu", "dtype": "float32", "threads": scale.threads},
    }


def _finished(folder: Path, tree: dict[str, Any]) -> bool:
    """Whether `folder` holds a finished run of exactly this config (for --reuse)."""
    from recurrent_depth.training.checkpoint import latest_checkpoint
    from recurrent_depth.training.config import config_from_dict

    done = latest_checkpoint(folder) if (folder / "config.json").is_file() else None
    same = done is not None and json.loads((folder / "config.json").read_text()) == json.loads(
        json.dumps(config_from_dict(tree).to_dict()))
    return same and done.name.endswith(f"{tree['train']['steps']:08d}")


def _train_command(name: str, tree: dict[str, Any], out: Path) -> list[str]:
    """`rdepth train` on the arm's config (written beside its folder), replacing what an earlier run left."""
    config = out / f"{name}.config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(tree, indent=1) + "\n")
    return [sys.executable, "-m", "recurrent_depth", "train", "--config", str(config), "--out", str(out / name),
            "--overwrite"]


def train_arm(name: str, tree: dict[str, Any], out: Path, log: Log, reuse: bool = False) -> dict[str, Any]:
    """Train one arm into out/name (a `rdepth train` process); returns its record. With `reuse`, an arm whose
    folder already holds a finished run of the same config is read back, not retrained."""
    import subprocess

    if reuse and _finished(out / name, tree):
        log(f"  reusing {name}")
    else:
        proc = subprocess.run(_train_command(name, tree, out), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"training arm {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return arm_record(name, out / name, log)


def arm_record(name: str, folder: Path, log: Log) -> dict[str, Any]:
    """Checkpoint, parameters, training seconds, mean loss of the last 20 logged steps and the final validation
    accuracy (in-distribution rows, the depth the arm was trained for) of a finished arm."""
    from recurrent_depth.model.checkpoint import read_config
    from recurrent_depth.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(folder)
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [x["loss"] for x in lines if "loss" in x][-20:] or [float("nan")]
    val = [v for x in lines for k, v in x.items() if k.startswith("val_acc@")]
    rec = {"name": name, "checkpoint": str(ckpt), "params": read_config(ckpt).estimate_params(),
           "train_seconds": round(max(x.get("elapsed_s", 0.0) for x in lines), 1),
           "final_loss": sum(losses) / len(losses), "val_accuracy": val[-1] if val else None}
    log(f"  {name}: {rec['params']:,} parameters, trained in {rec['train_seconds']:.0f} s, "
        f"final loss {rec['final_loss']:.3f}, validation accuracy {rec['val_accuracy']}")
    return rec


def train_all(jobs: dict[str, dict[str, Any]], out: Path, workers: int, log: Log,
              reuse: bool = False) -> dict[str, dict[str, Any]]:
    """Train every arm, `workers` processes at a time, longest first."""
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(jobs, key=lambda n: -_cost(jobs[n]))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {name: pool.submit(train_arm, name, jobs[name], out, log, reuse) for name in order}
        return {name: f.result() for name, f in futures.items()}


def _cost(tree: dict[str, Any]) -> float:
    return train_flops_per_token(tree["model"], tree["depth"]) * tree["train"]["steps"] * tree["data"]["seq_len"]


@functools.lru_cache(maxsize=4)
def _load_checkpoint(path: str) -> tuple[Any, Any]:
    """Model and tokenizer of an arm's checkpoint, read once however many evaluations use them."""
    from recurrent_depth.data.tokenizer import load_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    return RecurrentDepthForCausalLM.from_pretrained(path), load_tokenizer(path)


def _load(rec: dict[str, Any]) -> tuple[Any, Any]:
    return _load_checkpoint(rec["checkpoint"])


# --------------------------------------------------------------------------------------------- evaluation
def sweep_depths(scale: Scale) -> list[int]:
    """The seed's table (1x, 5x, 10x, 50x) plus powers of two and the training mean and its multiples."""
    mean = scale.mean_recurrence
    return sorted({*scale.table, 1, 2, 4, 8, 16, 32, mean, 2 * mean, 4 * mean} - {0})


def eval_depths(rec: dict[str, Any], splits: dict[str, list[dict]], depths: list[int]) -> dict[str, list]:
    """Exact-match accuracy (with per-level accuracy) at every depth on every split (teacher-forced: equal to greedy
    at fixed depth), from a zero initial state (the library default)."""
    from recurrent_depth.evaluation.sweeps import depth_sweep

    model, tok = _load(rec)
    return {s: depth_sweep(model, tok, rows, depths, method="teacher_forced") for s, rows in splits.items()}


def eval_exit(rec: dict[str, Any], rows: list[dict], scale: Scale, cap: int) -> list[dict[str, Any]]:
    from recurrent_depth.evaluation.sweeps import exit_sweep

    model, tok = _load(rec)
    return exit_sweep(model, tok, rows, "kl", list(scale.exit_thresholds), cap)


def eval_cot(rec: dict[str, Any], task: Any, splits: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Greedy chain-of-thought decoding: accuracy of the final answer and the tokens written before it."""
    from recurrent_depth.evaluation.sweeps import evaluate_accuracy

    model, tok = _load(rec)
    out = {}
    for split, rows in splits.items():
        r = evaluate_accuracy(model, tok, rows, 1, scorer=lambda pred, ans: task.score(task.extract_answer(pred),
                                                                              task.extract_answer(ans)),
                              max_new_tokens=max(len(tok(x["answer"])["input_ids"]) for x in rows) + 3)
        answer_tokens = sum(len(tok(task.extract_answer(x["answer"]))["input_ids"]) + 1 for x in rows) / len(rows)
        r["extra_context_tokens"] = r["mean_new_tokens"] - answer_tokens
        out[split] = r
    return out


def eval_text(rec: dict[str, Any], texts: list[str], depths: list[int]) -> list[dict[str, Any]]:
    from recurrent_depth.evaluation.sweeps import perplexity_sweep

    model, tok = _load(rec)
    return perplexity_sweep(model, tok, texts, depths, seq_len=64, max_blocks=64)


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, min, max and sample standard deviation (0 for one value) of per-seed accuracies."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def mean_curve(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-depth records averaged over seeds (accuracy and per-level accuracy), with the per-seed spread."""
    out = []
    for recs in zip(*per_seed):
        accs = [r["accuracy"] for r in recs]
        levels = sorted({int(k) for r in recs for k in r.get("accuracy_by_level", {})})
        by = {lvl: statistics.fmean(r["accuracy_by_level"][lvl] for r in recs) for lvl in levels}
        out.append({"num_steps": recs[0]["num_steps"], "accuracy": statistics.fmean(accs),
                    "accuracy_min": min(accs), "accuracy_max": max(accs), "accuracy_by_level": by})
    return out


# ------------------------------------------------------------------------------------------------- claims
def _acc(records: list[dict], r: int) -> float:
    return next(x["accuracy"] for x in records if x["num_steps"] == r)


def _level_acc(records: list[dict], r: int, level: int) -> float | None:
    by = next(x for x in records if x["num_steps"] == r).get("accuracy_by_level", {})
    value = by.get(level, by.get(str(level)))
    return None if value is None else float(value)


def answer_floor(rows: list[dict]) -> float:
    """The accuracy of always giving the split's most common answer: below it (plus LEARNED) an arm has learned
    nothing about the problems, and arms that all sit at it are tied by the answer distribution, not by skill."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    return max(counts.values()) / len(rows)


def eval_rows(scale: Scale, task: Any = None, cot: bool = False) -> dict[str, list[dict]]:
    """The evaluation rows of both splits (seeded: a re-judge regenerates the same rows)."""
    from recurrent_depth.tasks import get_task

    task = task or get_task(scale.task, **scale.difficulty)
    return {s: task.generate(scale.n_eval, split=s, seed=EVAL_SEED + i, cot=cot) for i, s in enumerate(("test", "ood"))}


def judge_claims(res: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    """One {"claim", "target", "measured", "held"} per target of issue 16 (and the seed's other claims).

    Accuracies of the recurrent and fixed-depth arms are means over seeds; a comparison between arms never counts
    as held when the winner is within LEARNED (5 points) of the split's answer floor (`answer_floor`: always the most
    common answer), where every arm ties by the answer distribution."""
    mean = scale.mean_recurrence
    floor = res.get("floor", {"test": 0.0, "ood": 0.0})
    above = floor["ood"] + LEARNED
    rec = res["recurrent"]["depth"]
    hard, test = rec["ood"], rec["test"]
    claims = []
    best_test = max(x["accuracy"] for x in test)
    claims.append({"claim": "The recurrent model learns the task in-distribution",
                   "target": ">= 95% exact match on the in-distribution test rows at some depth",
                   "measured": f"best {100 * best_test:.1f}% (r = "
                               f"{max(test, key=lambda x: x['accuracy'])['num_steps']})",
                   "held": best_test >= 0.95})
    t = [_acc(hard, r) for r in scale.table]
    rises = all(b > a for a, b in zip(t[:3], t[1:3]))
    gain = t[min(2, len(t) - 1)] - t[0]
    holds = len(t) < 4 or t[3] >= t[2] - 0.01
    shown = ", ".join(f"r={r}: {100 * a:.1f}%" for r, a in zip(scale.table, t))
    claims.append({"claim": "The seed's table: on the harder split, accuracy rises with test-time iterations",
                   "target": "strictly rises 1x -> 5x -> 10x, >= +30 points in all, no fall from 10x to 50x "
                             "(1 point of tolerance)",
                   "measured": f"{shown} ({100 * gain:+.1f} points 1x -> 10x)",
                   "held": rises and gain >= 0.30 and holds and max(t) >= above})
    cap = 4 * mean
    trained_max = _level_knob(scale.difficulty, ood=False)[1]
    levels = [lvl for lvl in range(trained_max + 1, 2 * trained_max + 1)]
    seen = _levels_reached(hard, res["depths"], levels, cap)
    claims.append({"claim": "Harder instances are solved by thinking longer",
                   "target": f"every level up to 2x the trained maximum ({2 * trained_max}) reaches >= 80% at some "
                             f"r <= 4x the training mean (r <= {cap})",
                   "measured": ", ".join(f"level {k}: {100 * v:.0f}%" for k, v in seen.items()) or "no such level",
                   "held": bool(seen) and len(seen) == len(levels) and min(seen.values()) >= 0.80})
    best = max(x["accuracy"] for x in hard)
    bl = sorted(res["baselines"], key=lambda b: b["multiplier"])
    shown = ", ".join(f"{b['multiplier']}x: {100 * b['ood']['mean']:.1f}% ({100 * b['ood']['min']:.1f}-"
                      f"{100 * b['ood']['max']:.1f})" for b in bl)
    m = max([b["multiplier"] for b in bl if b["ood"]["mean"] <= best and b["test"]["mean"] >= LEARNED], default=0)
    eight = next((b for b in bl if b["multiplier"] == 8), None)
    claims.append({"claim": "Effective parameters: at its best depth the recurrent model matches a much larger "
                            "fixed-depth transformer on the harder split",
                   "target": ">= the 8x baseline's mean over seeds (each baseline at its best learning rate)",
                   "measured": f"recurrent best {100 * best:.1f}% vs baselines {shown}; largest matched: {m}x; "
                               f"answer floor {100 * floor['ood']:.1f}%",
                   "held": eight is not None and best >= eight["ood"]["mean"] and best >= above
                   and eight["test"]["mean"] >= floor["test"] + LEARNED})
    fl = res["flops"]
    claims.append({"claim": "At equal training FLOPs the recurrent model beats the 1x transformer trained longer",
                   "target": "recurrent best hard-split accuracy > the equal-FLOPs 1x baseline's",
                   "measured": f"recurrent best {100 * best:.1f}%; 1x baseline at {fl['steps']} steps "
                               f"({fl['flops_ratio']:.2f}x the recurrent arm's FLOPs): {100 * fl['ood']['mean']:.1f}%",
                   "held": best > fl["ood"]["mean"] and best >= above})
    fixed = res["fixed-depth"]["depth"]["ood"]
    beyond = [r for r in res["depths"] if r > 2 * mean]
    rand_b = statistics.fmean(_acc(hard, r) for r in beyond)
    fix_b = statistics.fmean(_acc(fixed, r) for r in beyond)
    claims.append({"claim": "Random depth matters: Huginn's sampler against fixed-depth training, beyond the "
                            "training depth",
                   "target": f"mean hard-split accuracy over r in {beyond} higher with the random-depth sampler",
                   "measured": f"random depth {100 * rand_b:.1f}%, fixed depth {res['fixed-depth']['depth_trained']}"
                               f": {100 * fix_b:.1f}%",
                   "held": rand_b > fix_b and rand_b >= above})
    cot = res["cot"]["ood"]
    claims.append({"claim": "Latent reasoning uses no context, unlike chain of thought",
                   "target": "chain-of-thought extra context tokens vs the latent model's zero; latent accuracy at "
                             "its best depth within 2 points of CoT or better",
                   "measured": f"CoT {100 * cot['accuracy']:.1f}% with {cot['extra_context_tokens']:.1f} extra "
                               f"tokens per answer; latent {100 * best:.1f}% with 0",
                   "held": cot["extra_context_tokens"] > 0 and best >= cot["accuracy"] - 0.02 and best >= above})
    ex = res["recurrent"]["exit"]
    ok = [x for x in ex if x.get("threshold") is not None and x["accuracy_drop"] <= 0.01]
    saved = max((x["steps_saved"] for x in ok), default=0.0)
    claims.append({"claim": "Adaptive exit saves iterations", "target": ">= 30% fewer iterations, <= 1 point lost",
                   "measured": f"{100 * saved:.1f}% fewer iterations (KL exit, cap r={res['exit_cap']}) within 1 "
                               f"point", "held": saved >= 0.30 and ex[0]["accuracy"] >= above})
    ppl = {x["num_steps"]: x["perplexity"] for x in res["text"]["perplexity"]}
    falls = all(ppl[a] >= ppl[b] for a, b in zip(sorted(ppl), sorted(ppl)[1:]) if b <= mean)
    rise4 = ppl[4 * mean] / ppl[mean] - 1
    claims.append({"claim": "Text LM (no special data): validation perplexity falls with depth, no rise beyond",
                   "target": f"falls up to r={mean}; at r={4 * mean} no more than 2% above r={mean}",
                   "measured": f"perplexity {ppl[1]:.1f} at r=1 -> {ppl[mean]:.1f} at r={mean} -> "
                               f"{ppl[4 * mean]:.1f} at r={4 * mean} ({100 * rise4:+.1f}%)",
                   "held": falls and rise4 <= 0.02})
    if "lookup" in res:
        claims += judge_lookup_claims(res["lookup"], scale)
    return claims


def judge_lookup_claims(lk: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    """The multi-hop lookup family's claims (means over its seeds): it learns in-distribution, its harder split
    (more hops) gains >= 30 points from r = 1 to 10x and does not fall after (it may saturate before 10x: a hop
    level needs a fixed number of iterations, so no strict rise past saturation is asked), and every held-out hop
    level up to 2x the trained maximum reaches >= 80% at some r <= 4x the training mean."""
    name = f"Multi-hop lookup ({scale.lookup_task})"
    hard, test = lk["depth"]["ood"], lk["depth"]["test"]
    above = lk["floor"]["ood"] + LEARNED
    best_test = max(x["accuracy"] for x in test)
    claims = [{"claim": f"{name}: the recurrent model learns the task in-distribution",
               "target": ">= 95% exact match on the in-distribution test rows at some depth",
               "measured": f"best {100 * best_test:.1f}% (r = {max(test, key=lambda x: x['accuracy'])['num_steps']})",
               "held": best_test >= 0.95}]
    t = [_acc(hard, r) for r in scale.table]
    gain = t[min(2, len(t) - 1)] - t[0]
    steady = all(b >= a - 0.01 for a, b in zip(t, t[1:]))
    claims.append({"claim": f"{name}: on the harder split (more hops), accuracy rises with test-time iterations",
                   "target": ">= +30 points from 1x to 10x, no fall (1 point of tolerance) from 1x to 5x to 10x to "
                             "50x",
                   "measured": ", ".join(f"r={r}: {100 * a:.1f}%" for r, a in zip(scale.table, t))
                   + f" ({100 * gain:+.1f} points 1x -> 10x)",
                   "held": gain >= 0.30 and steady and max(t) >= above})
    cap = 4 * scale.mean_recurrence
    trained_max = max(lk["trained_levels"])
    levels = [lvl for lvl in lk["ood_levels"] if lvl <= 2 * trained_max]
    seen = _levels_reached(hard, lk["depths"], levels, cap)
    claims.append({"claim": f"{name}: more hops are solved by thinking longer",
                   "target": f"every held-out level up to 2x the trained maximum ({2 * trained_max}) reaches >= 80% "
                             f"at some r <= 4x the training mean (r <= {cap})",
                   "measured": ", ".join(f"level {k}: {100 * v:.0f}% (r = 1: "
                                         f"{100 * (_level_acc(hard, 1, k) or 0):.0f}%)" for k, v in seen.items())
                   or "no such level",
                   "held": bool(seen) and len(seen) == len(levels) and min(seen.values()) >= 0.80})
    return claims


def _levels_reached(hard: list[dict], depths: list[int], levels: list[int], cap: int) -> dict[int, float]:
    """Each level's best accuracy over the depths r <= cap (levels never evaluated are left out)."""
    reached = {lvl: max((a for r in depths if r <= cap for a in [_level_acc(hard, r, lvl)] if a is not None),
                        default=None) for lvl in levels}
    return {k: v for k, v in reached.items() if v is not None}


def _level_knob(difficulty: dict[str, Any], ood: bool) -> tuple[int, int]:
    """The training (or ood) difficulty levels: the task's first range knob as (min, max)."""
    value = difficulty[next(k for k in difficulty if k.startswith("ood_") == ood)]
    return (int(value[0]), int(value[1])) if isinstance(value, list | tuple) else (int(value), int(value))



# ------------------------------------------------------------------------------------------------ the run
def task_data(scale: Scale) -> dict[str, Any]:
    """The `data` section that trains on the scale's built-in task (answer-only loss, per-character tokens)."""
    return {"kind": "task", "tokenizer": "char", "answer_only_loss": True, "curriculum": scale.curriculum,
            "task": {"name": scale.task, "difficulty": scale.difficulty, "num_train": scale.n_train,
                     "num_eval": 256, "targets": scale.targets}}


def _seq_len(rows: list[dict]) -> int:
    return max(len(r["prompt"]) + len(r["answer"]) for r in rows) + 4


def task_seq_len(scale: Scale, task: Any = None) -> int:
    """Sequence length that fits the longest training row and the longest hard-split evaluation row."""
    from recurrent_depth.tasks import get_task

    task = task or get_task(scale.task, **scale.difficulty)
    train = task.generate(scale.n_train, split="train", seed=0)
    ood = task.generate(scale.n_eval, split="ood", seed=EVAL_SEED + 1)
    return max(_seq_len(train), _seq_len(ood))


def plan(scale: Scale, out: Path, task: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every arm's training config except the baselines' second seeds (chosen after the lr sweep)."""
    from recurrent_depth.evaluation.corpus import export_corpus
    from recurrent_depth.tasks import get_task, write_jsonl

    seq_len, data, mean = task_seq_len(scale, task), task_data(scale), scale.mean_recurrence
    vocab = len(task.alphabet) + 4
    huginn = {"sampler": "poisson-lognormal-filling"}
    plain = {"sampler": "non-recurrent"}
    jobs: dict[str, dict[str, Any]] = {}
    looped = model_fields(scale, window=scale.core_window, outer=scale.outer_window)
    for s in scale.seeds:
        jobs[f"recurrent-s{s}"] = train_tree(scale, looped, huginn, data, scale.steps, seq_len, lr=scale.looped_lr,
                                             seed=s)
        jobs[f"fixed-depth-s{s}"] = train_tree(scale, looped, {"sampler": "fixed", "depth": mean}, data,
                                               scale.steps, seq_len, lr=scale.looped_lr, seed=s)
    if scale.lookup_task:
        ls = lookup_scale(scale)
        lt = get_task(ls.task, **ls.difficulty)
        fields = model_fields(ls, window=ls.core_window, outer=ls.outer_window)
        for s in ls.seeds:
            jobs[f"lookup-s{s}"] = train_tree(ls, fields, huginn, task_data(ls), ls.steps, task_seq_len(ls, lt),
                                              lr=scale.looped_lr, seed=s)
    cores = {m: baseline_core_layers(scale, m, vocab) for m in scale.multipliers}
    sweep_steps = max(1, round(scale.steps * scale.sweep_fraction))
    for m, n_core in cores.items():
        for f in scale.lr_factors:
            jobs[f"sweep-{m}x-lr{f:g}"] = train_tree(scale, model_fields(scale, n_core), plain, data, sweep_steps,
                                                     seq_len, lr=scale.lr * f, seed=scale.seeds[0])
    ratio = train_flops_per_token(model_fields(scale), huginn) / train_flops_per_token(model_fields(scale), plain)
    flops_steps = round(scale.steps * ratio)
    cot_file = write_jsonl(task.generate(scale.n_train, split="train", seed=0, cot=True),
                           out / "data" / "cot_train.jsonl")
    cot_data = {"kind": "jsonl", "paths": [str(cot_file)], "tokenizer": "char", "answer_only_loss": True,
                "val_fraction": 0.01, "curriculum": scale.curriculum}
    cot_len = max(_seq_len(task.generate(scale.n_eval, split="ood", seed=EVAL_SEED + 1, cot=True)), seq_len * 3)
    jobs["cot"] = train_tree(scale, model_fields(scale), plain, cot_data, scale.steps, cot_len)
    corpus = export_corpus(out / "data" / "corpus", max_chars=scale.text_max_chars)
    text_data = {"kind": "text", "paths": [str(corpus["train"].parent)], "glob": "*.txt",
                 "val_paths": [str(corpus["validation"].parent)], "tokenizer": "bpe", "bpe_vocab_size": 1024}
    jobs["text"] = train_tree(scale, model_fields(scale), huginn, text_data, scale.text_steps, 64)
    meta = {"seq_len": seq_len, "data": data, "cores": cores, "flops_steps": flops_steps, "flops_ratio": ratio}
    return jobs, meta


def second_round(scale: Scale, first: dict[str, dict[str, Any]], meta: dict[str, Any],
                 jobs: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[int, float], dict[str, str]]:
    """The baselines' chosen learning rates (best in-distribution validation accuracy of the sweep, ties to the
    lower lr), the configs of their full runs at every seed and of the equal-FLOPs 1x arm (first seed, the 1x
    baseline's chosen lr), and aliases: full runs that are a sweep run already (sweep_fraction 1, first seed)."""
    chosen: dict[int, float] = {}
    more: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    plain = {"sampler": "non-recurrent"}
    for m in meta["cores"]:
        scores = {f: first[f"sweep-{m}x-lr{f:g}"]["val_accuracy"] or 0.0 for f in scale.lr_factors}
        chosen[m] = max(sorted(scores), key=lambda f: scores[f])
        swept = f"sweep-{m}x-lr{chosen[m]:g}"
        for s in baseline_seeds(scale):
            name = f"baseline-{m}x-lr{chosen[m]:g}-s{s}"
            if scale.sweep_fraction == 1.0 and s == scale.seeds[0]:
                aliases[name] = swept
                continue
            tree = jobs[swept]
            more[name] = {**tree, "train": {**tree["train"], "seed": s, "steps": scale.steps}}
    one = jobs[f"sweep-{min(meta['cores'])}x-lr{chosen[min(meta['cores'])]:g}"]
    fields = {k: v for k, v in one["model"].items() if k != "preset"}
    more[f"flops-1x-s{scale.seeds[0]}"] = train_tree(scale, fields, plain, meta["data"], meta["flops_steps"],
                                                      meta["seq_len"], lr=one["optim"]["lr"], seed=scale.seeds[0])
    return more, chosen, aliases


def run(out_dir: str | Path, quick: bool = False, scale: Scale | None = None, log: Log = print,
        reuse: bool = False) -> dict[str, Any]:
    """Train every arm, evaluate, judge the claims; write results.json, results.md and plots into `out_dir`."""
    from recurrent_depth.evaluation.corpus import corpus_texts
    from recurrent_depth.tasks import get_task

    scale = scale or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(scale.threads)
    started = time.perf_counter()
    task = get_task(scale.task, **scale.difficulty)
    splits, cot_rows = eval_rows(scale, task), eval_rows(scale, task, cot=True)
    log(f"[reproduce] task {task}; {scale.steps} steps x {scale.batch_size} sequences per arm; {scale.jobs} arms "
        f"at a time")
    arms_dir = out / "arms"
    jobs, meta = plan(scale, out, task)
    arms = train_all(jobs, arms_dir, scale.jobs, log, reuse)
    more, chosen, aliases = second_round(scale, arms, meta, jobs)
    arms.update(train_all(more, arms_dir, scale.jobs, log, reuse))
    arms.update({name: arms[swept] for name, swept in aliases.items()})
    log(f"[reproduce] baselines' learning rates (x {scale.lr:g}): {chosen}")

    log("[eval] depth sweeps, baselines, exit sweep, chain of thought, perplexity")
    torch.set_num_threads(max(1, scale.jobs * scale.threads))
    depths = sweep_depths(scale)
    res: dict[str, Any] = {"scale": asdict(scale), "quick": quick, "task": repr(task), "depths": depths,
                           "exit_cap": 2 * scale.mean_recurrence,
                           "floor": {s: answer_floor(rows) for s, rows in splits.items()}}
    for kind in ("recurrent", "fixed-depth"):
        per_seed = {s: eval_depths(arms[f"{kind}-s{s}"], splits, depths) for s in scale.seeds}
        res[kind] = {"arms": [arms[f"{kind}-s{s}"] for s in scale.seeds], "per_seed": per_seed,
                     "depth": {sp: mean_curve([per_seed[s][sp] for s in scale.seeds]) for sp in splits}}
    res["fixed-depth"]["depth_trained"] = scale.mean_recurrence
    best_seed = scale.seeds[0]
    res["recurrent"]["exit"] = eval_exit(arms[f"recurrent-s{best_seed}"], splits["ood"], scale, res["exit_cap"])
    res["recurrent"]["exit_test"] = eval_exit(arms[f"recurrent-s{best_seed}"], splits["test"], scale,
                                              res["exit_cap"])
    res["baselines"] = [_baseline_record(arms, m, n_core, chosen[m], scale, splits)
                        for m, n_core in meta["cores"].items()]
    res["baseline_sweep"] = {name: {"val_accuracy": arms[name]["val_accuracy"], "lr": jobs[name]["optim"]["lr"]}
                             for name in jobs if name.startswith("sweep-")}
    fl = [_ood_test(arms[f"flops-1x-s{scale.seeds[0]}"], splits)]
    res["flops"] = {"steps": meta["flops_steps"], "flops_ratio": meta["flops_ratio"],
                    "ood": summarize([x["ood"] for x in fl]), "test": summarize([x["test"] for x in fl])}
    res["cot"] = {**arms["cot"], **eval_cot(arms["cot"], task, cot_rows)}
    val_texts = corpus_texts("validation", max_chars=scale.text_max_chars // 10)
    text_depths = sorted({1, 2, scale.mean_recurrence, 2 * scale.mean_recurrence, 4 * scale.mean_recurrence})
    res["text"] = {**arms["text"], "perplexity": eval_text(arms["text"], val_texts, text_depths)}
    if scale.lookup_task:
        res["lookup"] = eval_lookup(scale, arms, depths)
    res["claims"] = judge_claims(res, scale)
    res["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(res, out)
    log(f"[reproduce] done in {res['seconds']:.0f} s: {out / 'results.md'}")
    return res


def eval_lookup(scale: Scale, arms: dict[str, dict[str, Any]], depths: list[int]) -> dict[str, Any]:
    """The multi-hop lookup family's depth sweeps (the run's depths and r = 3: a hop or two per iteration saturates
    early), averaged over its seeds, with the split's answer floor and the levels trained and held out."""
    from recurrent_depth.tasks import get_task

    ls = lookup_scale(scale)
    task = get_task(ls.task, **ls.difficulty)
    splits = eval_rows(ls, task)
    depths = sorted({*depths, 3})
    per_seed = {s: eval_depths(arms[f"lookup-s{s}"], splits, depths) for s in ls.seeds}
    (lo, hi), (ood_lo, ood_hi) = (_level_knob(task.difficulty, ood=o) for o in (False, True))  # defaults included
    return {"task": repr(task), "depths": depths,
            "floor": {s: answer_floor(rows) for s, rows in splits.items()},
            "trained_levels": list(range(lo, hi + 1)), "ood_levels": list(range(ood_lo, ood_hi + 1)),
            "arms": [arms[f"lookup-s{s}"] for s in ls.seeds], "per_seed": per_seed,
            "depth": {sp: mean_curve([per_seed[s][sp] for s in ls.seeds]) for sp in splits}}


def _ood_test(rec: dict[str, Any], splits: dict[str, list[dict]]) -> dict[str, float]:
    acc = eval_depths(rec, splits, [1])
    return {s: acc[s][0]["accuracy"] for s in acc}


def _baseline_record(arms: dict[str, dict[str, Any]], m: int, n_core: int, f: float, scale: Scale,
                     splits: dict[str, list[dict]]) -> dict[str, Any]:
    names = [f"baseline-{m}x-lr{f:g}-s{s}" for s in baseline_seeds(scale)]
    accs = [_ood_test(arms[n], splits) for n in names]
    return {"multiplier": m, "core_layers": n_core, "params": arms[names[0]]["params"], "lr": scale.lr * f,
            "arms": names, "ood": summarize([a["ood"] for a in accs]), "test": summarize([a["test"] for a in accs]),
            "train_seconds": arms[names[0]]["train_seconds"], "final_loss": arms[names[0]]["final_loss"]}


def rejudge(out_dir: str | Path) -> dict[str, Any]:
    """Recompute the claims and rewrite results.md / plots from an existing results.json (no training)."""
    out = Path(out_dir)
    file = out / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"no results.json in {str(out)!r}")
    res = json.loads(file.read_text())
    tuples = {k: tuple(v) for k, v in res["scale"].items() if isinstance(v, list)}
    scale = Scale(**{**res["scale"], **tuples})
    res.setdefault("floor", {s: answer_floor(rows) for s, rows in eval_rows(scale).items()})
    res["claims"] = judge_claims(res, scale)
    write_outputs(res, out)
    return res


# ------------------------------------------------------------------------------------------------ outputs
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(res: dict[str, Any]) -> str:
    """The seed's table and the claims with our measured numbers beside them."""
    sc = res["scale"]
    mean = sc["mean_recurrence"]
    rec = res["recurrent"]["depth"]
    lines = ["# The seed's claim at small scale: think longer, solve harder", "",
             f"Task `{sc['task']}` ({res['task']}); dense running-state labels: {sc['targets']}; training mean depth "
             f"r = {mean}; {sc['steps']} steps x {sc['batch_size']} sequences per arm; seeds {sc['seeds']}; "
             f"{'QUICK smoke run: too small to test the claims' if res['quick'] else 'full run'}; "
             f"{res['seconds']:.0f} s in all. Answer floor (always the most common answer): "
             f"{_pct(res['floor']['test'])}% in-distribution, {_pct(res['floor']['ood'])}% on the harder split.", "",
             "## The seed's table: test-time iterations against accuracy (recurrent arm, mean over seeds)", "",
             "| iterations | seed says | in-distribution | harder split (ood) |", "|---|---|---|---|"]
    words = {1: "baseline", 5: "moderate gains", 10: "significant gains", 50: "dramatic gains (50x+)"}
    for r in res["depths"]:
        o = next(x for x in rec["ood"] if x["num_steps"] == r)
        lines.append(f"| r = {r} | {words.get(r, '') if r in sc['table'] else ''} | {_pct(_acc(rec['test'], r))}% | "
                     f"{_pct(o['accuracy'])}% ({_pct(o['accuracy_min'])}-{_pct(o['accuracy_max'])}) |")
    lines += ["", "## Claims", "", "| claim | target | measured | held |", "|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['claim']} | {c['target']} | {c['measured']} | {'yes' if c['held'] else 'no'} |")
    lines += ["", "## Arms (accuracy: mean over seeds, min-max in brackets)", "",
              "| arm | parameters | lr | test | ood |", "|---|---|---|---|---|"]
    for name in ("recurrent", "fixed-depth"):
        a = res[name]
        best = max(a["depth"]["ood"], key=lambda x: x["accuracy"])
        lines.append(f"| {name} (at its best r = {best['num_steps']} on ood) | {a['arms'][0]['params']:,} | "
                     f"{sc.get('looped_lr') or sc['lr']:g} | {_pct(_acc(a['depth']['test'], best['num_steps']))}% | "
                     f"{_pct(best['accuracy'])}% |")
    for b in res["baselines"]:
        lines.append(f"| baseline {b['multiplier']}x ({b['core_layers']} core layers, run once) | {b['params']:,} | "
                     f"{b['lr']:g} | {_pct(b['test']['mean'])}% ({_pct(b['test']['min'])}-{_pct(b['test']['max'])}) "
                     f"| {_pct(b['ood']['mean'])}% ({_pct(b['ood']['min'])}-{_pct(b['ood']['max'])}) |")
    fl = res["flops"]
    lines.append(f"| 1x at equal training FLOPs ({fl['steps']} steps) | {res['baselines'][0]['params']:,} | "
                 f"{res['baselines'][0]['lr']:g} | {_pct(fl['test']['mean'])}% | {_pct(fl['ood']['mean'])}% |")
    c = res["cot"]
    lines.append(f"| chain of thought (1x) | {c['params']:,} | {sc['lr']:g} | {_pct(c['test']['accuracy'])}% | "
                 f"{_pct(c['ood']['accuracy'])}% |")
    lines += ["", "Baselines' learning-rate sweep (first seed, in-distribution validation accuracy at the end of "
              "training; the best is kept):", "", "| arm | lr | validation accuracy |", "|---|---|---|"]
    for name, v in res["baseline_sweep"].items():
        val = "n/a" if v["val_accuracy"] is None else f"{_pct(v['val_accuracy'])}%"
        lines.append(f"| {name} | {v['lr']:g} | {val} |")
    if "lookup" in res:
        lines += lookup_markdown(res["lookup"], sc)
    lines += ["", f"## Adaptive exit (KL criterion, harder split, cap r = {res['exit_cap']})", "",
              "| threshold | accuracy | mean steps | steps saved |", "|---|---|---|---|"]
    for x in res["recurrent"]["exit"]:
        thr = "fixed" if x["threshold"] is None else f"{x['threshold']:g}"
        lines.append(f"| {thr} | {_pct(x['accuracy'])}% | {x['mean_steps']:.2f} | {_pct(x['steps_saved'])}% |")
    lines += ["", "## Text LM: validation perplexity against depth", "", "| r | perplexity |", "|---|---|"]
    lines += [f"| {x['num_steps']} | {x['perplexity']:.2f} |" for x in res["text"]["perplexity"]]
    lines += ["", "Plots: `depth.png`, `levels.png` (level x depth), `baselines.png`, `exit.png`, `perplexity.png`. "
              "Raw numbers: `results.json`.", ""]
    return "\n".join(lines)


def lookup_markdown(lk: dict[str, Any], sc: dict[str, Any]) -> list[str]:
    """The multi-hop lookup family's depth table (mean over its seeds, min-max in brackets) and its levels."""
    hard = lk["depth"]["ood"]
    levels = lk["ood_levels"]
    lines = ["", f"## The multi-hop lookup family: `{sc['lookup_task']}` ({lk['task']})", "",
             f"The recurrent arm alone: the model above, core window {sc['lookup_window']}, prelude and coda window "
             f"{sc['lookup_outer_window']}, {sc['lookup_steps']} steps, seeds {sc['lookup_seeds']}; levels "
             f"{lk['trained_levels']} in training, {levels} on the harder split. Answer floor: "
             f"{_pct(lk['floor']['test'])}% / {_pct(lk['floor']['ood'])}%. Plot: `lookup-levels.png`.", "",
             "| iterations | in-distribution | harder split (ood) | " + " | ".join(f"level {x}" for x in levels) + " |",
             "|---|---|---|" + "---|" * len(levels)]
    for r in lk["depths"]:
        o = next(x for x in hard if x["num_steps"] == r)
        cells = [f"{_pct(_level_acc(hard, r, x) or 0.0)}%" for x in levels]
        lines.append(f"| r = {r} | {_pct(_acc(lk['depth']['test'], r))}% | {_pct(o['accuracy'])}% "
                     f"({_pct(o['accuracy_min'])}-{_pct(o['accuracy_max'])}) | " + " | ".join(cells) + " |")
    return lines


def _level_plot(depth: dict[str, list[dict]], path: Path, title: str) -> None:
    """Level x depth heat map over both splits of one arm's mean curves."""
    from recurrent_depth.evaluation.plots import plot_level_heatmap

    both = [{"num_steps": t["num_steps"], "accuracy_by_level": {**t["accuracy_by_level"], **o["accuracy_by_level"]}}
            for t, o in zip(depth["test"], depth["ood"])]
    plot_level_heatmap(both, path, title=title)


def write_outputs(res: dict[str, Any], out: Path) -> None:
    from recurrent_depth.evaluation.plots import plot_depth_sweep, plot_exit_sweep, plot_series

    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(res))
    series = {f"{arm}, {split}": res[arm]["depth"][split] for arm in ("recurrent", "fixed-depth")
              for split in ("test", "ood")}
    plot_depth_sweep(series, out / "depth.png", title="accuracy against test-time depth (mean over seeds)")
    _level_plot(res["recurrent"]["depth"], out / "levels.png",
                "recurrent model: accuracy by difficulty level and depth")
    if "lookup" in res:
        _level_plot(res["lookup"]["depth"], out / "lookup-levels.png",
                    f"{res['scale']['lookup_task']}: accuracy by hop count and depth")
    plot_exit_sweep({"ood": res["recurrent"]["exit"], "test": res["recurrent"]["exit_test"]}, out / "exit.png")
    plot_depth_sweep(res["text"]["perplexity"], out / "perplexity.png", metric="perplexity",
                     title="validation perplexity against depth (text)")
    best = max(x["accuracy"] for x in res["recurrent"]["depth"]["ood"])
    pts = {"fixed-depth baselines (ood, mean over seeds)": [{"params": b["params"], "accuracy": b["ood"]["mean"]}
                                                            for b in res["baselines"]],
           "recurrent, best depth (ood)": [{"params": res["recurrent"]["arms"][0]["params"], "accuracy": best}]}
    plot_series(pts, "params", "accuracy", out / "baselines.png", title="hard-split accuracy against parameters",
                logx=True)


# ------------------------------------------------------------------------------------------------- bundle
# A task model answers one problem per message, trained on `<bos>` + the prompt: `rdepth chat` and the server's
# chat endpoint send it the last user message alone, in that format (the default `role: content` transcript would
# wrap the problem in characters it never saw)
TASK_CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.last %}{{ bos_token }}{{ message['content'] }}"
                      "{% endif %}{% endfor %}")


def bundle(source: str | Path, dest: str | Path | None = None, command: str = "") -> Path:
    """Copy an arm's latest checkpoint (an `rdepth train` output folder trained on a built-in task) into the
    package's bundled-model folder (or `dest`), with a bundle.json naming its task for `rdepth demo` and a chat
    template that sends the model the last message as a task prompt."""
    from recurrent_depth.assets import DEFAULT_MODEL
    from recurrent_depth.model.checkpoint import atomic_folder
    from recurrent_depth.training.checkpoint import latest_checkpoint

    arm = Path(source)
    ckpt = latest_checkpoint(arm)
    train_cfg = arm / "config.json"
    if ckpt is None or not train_cfg.is_file():
        raise FileNotFoundError(f"no checkpoint and config.json under {str(arm)!r} (expected an `rdepth train` "
                                "output folder, such as a reproduce run's arms/recurrent-s0)")
    task = json.loads(train_cfg.read_text())["data"]["task"]
    if not task.get("name"):
        raise ValueError(f"{train_cfg} did not train on a built-in task; the demo needs one")
    model_cfg = json.loads((ckpt / "config.json").read_text())
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"}
    target = Path(dest or DEFAULT_MODEL)
    with atomic_folder(target) as folder:
        for f in ckpt.iterdir():
            if f.name in keep:
                shutil.copy2(f, folder / f.name)
        info = {"task": task["name"], "difficulty": task.get("difficulty", {}),
                "mean_recurrence": model_cfg["mean_recurrence"], "command": command or f"bundle --from {source}"}
        (folder / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
        (folder / "chat_template.jinja").write_text(TASK_CHAT_TEMPLATE)
    return target


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python experiments/reproduce.py [--quick] --out DIR` or `... bundle --from ARM [--out DIR]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bundle"]:
        p = argparse.ArgumentParser(prog="reproduce.py bundle", description=bundle.__doc__)
        p.add_argument("--from", dest="source", required=True, help="an arm's folder, e.g. RUN/arms/recurrent-s0")
        p.add_argument("--out", default=None, help="destination (default: the package's assets/default-model)")
        a = p.parse_args(argv[1:])
        path = bundle(a.source, a.out, "python experiments/reproduce.py " + " ".join(argv))
        print(f"bundled checkpoint written to {path}")
        return 0
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots, arms/)")
    p.add_argument("--quick", action="store_true", help="a smoke run in under 2 minutes (too small for the claims)")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps per arm, the lookup "
                   "family's included (not recurrences)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per arm")
    p.add_argument("--jobs", type=int, default=None, help="arms trained at once")
    p.add_argument("--looped-lr", type=float, default=None, help="the recurrent and fixed-depth arms' learning rate "
                   "(default: the scale's lr)")
    p.add_argument("--reuse", action="store_true", help="read back arms already trained in --out with the same "
                   "config instead of retraining them")
    p.add_argument("--report-only", action="store_true", help="re-judge the claims and rewrite results.md and "
                   "plots from --out's results.json")
    a = p.parse_args(argv)
    if a.report_only:
        rejudge(a.out)
        print(f"rewrote {a.out}/results.md")
        return 0
    if a.train_steps is not None and a.train_steps < 1:
        p.error(f"--train-steps must be >= 1, got {a.train_steps}")
    if a.looped_lr is not None and not a.looped_lr > 0:
        p.error(f"--looped-lr must be > 0, got {a.looped_lr}")
    scale = QUICK if a.quick else FULL
    overrides = {"steps": a.train_steps, "lookup_steps": a.train_steps, "threads": a.threads, "jobs": a.jobs,
                 "looped_lr": a.looped_lr}
    run(a.out, quick=a.quick, scale=replace(scale, **{k: v for k, v in overrides.items() if v is not None}),
        reuse=a.reuse)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
