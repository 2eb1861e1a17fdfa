"""`rdepth reproduce`: the seed's claims about latent reasoning, measured at a scale that runs on 2 CPU cores.

Arms, all trained on the same generated task data with the same number of steps and sequences:
  1. `recurrent`: the recurrent-depth model with Huginn's randomized depth (poisson-lognormal-filling);
  2. `baseline-{m}x`: standard fixed-depth transformers of the same width whose core is run once and holds enough
     layers for m times the recurrent model's parameters (m in 1, 2, 4, 8, 16 as far as the budget allows);
  3. `fixed-depth`: the recurrent architecture trained at one fixed depth (why random depth matters);
  4. `cot`: a 1x standard transformer that writes its intermediate steps as tokens (chain of thought);
  5. `text`: the recurrent model on a real offline text corpus (the interpreter's docs), for perplexity vs depth.
Then every arm is evaluated and `results.json` (with a `claims` list), `results.md` and plots are written.

    rdepth reproduce --quick --out runs/reproduce-quick     # < 5 minutes on 2 cores; a smoke run, not a result
    rdepth reproduce --out results/reproduce                # the full run (see results/reproduce/README.md)
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.config import RecurrentDepthConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class Scale:
    """Model shape and budget of one reproduce run. `jobs` arms train at once, each on `threads` CPU threads."""

    task: str = "addition"
    difficulty: dict[str, Any] = field(default_factory=lambda: {"digits": (1, 3), "ood_digits": (3, 3),
                                                               "ood_min_carry": 2})
    n_embd: int = 128
    n_heads: int = 4
    intermediate_size: int = 352
    mean_recurrence: int = 8
    backprop_depth: int = 4
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    n_train: int = 40000
    n_eval: int = 400
    multipliers: tuple[int, ...] = (1, 2, 4, 8)
    text_steps: int = 600
    text_max_chars: int = 1_000_000
    exit_thresholds: tuple[float, ...] = (1e-2, 3e-3, 1e-3, 5e-4, 1e-4, 1e-5)
    jobs: int = 2
    threads: int = 1
    seed: int = 0


FULL = Scale()
QUICK = Scale(n_embd=64, n_heads=2, intermediate_size=128, mean_recurrence=4, backprop_depth=2, steps=40,
              batch_size=16, n_train=2000, n_eval=48, multipliers=(1, 2), text_steps=20, text_max_chars=100_000,
              exit_thresholds=(1e-2, 1e-3))


# ----------------------------------------------------------------------------------------------- training
def model_fields(scale: Scale, n_core: int = 2) -> dict[str, Any]:
    return dict(n_embd=scale.n_embd, n_heads=scale.n_heads, intermediate_size=scale.intermediate_size,
                n_layers_in_prelude=1, n_layers_in_recurrent_block=n_core, n_layers_in_coda=1,
                mean_recurrence=scale.mean_recurrence, mean_backprop_depth=scale.backprop_depth, block_size=256)


def baseline_core_layers(scale: Scale, multiplier: int, vocab: int) -> int:
    """Core layers of a run-once transformer whose parameter count is closest to `multiplier` x the recurrent one."""
    def params(n_core: int) -> int:
        cfg = RecurrentDepthConfig.from_name("debug", vocab_size=vocab, **model_fields(scale, n_core))
        return cfg.estimate_params()

    target = multiplier * params(2)
    return min(range(1, 64 * multiplier + 1), key=lambda n: abs(params(n) - target))


def train_tree(scale: Scale, fields: dict[str, Any], depth: dict[str, Any], data: dict[str, Any], steps: int,
               seq_len: int, lr: float | None = None) -> dict[str, Any]:
    """A `rdepth train` config (as a dict) for one arm (learning rate `lr`, default the scale's)."""
    lr = lr or scale.lr
    return {
        "model": {"preset": "debug", **fields},
        "data": {**data, "seq_len": seq_len},
        "train": {"steps": steps, "batch_size": scale.batch_size, "seed": scale.seed},
        "optim": {"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 20),
                  "schedule": "cosine", "weight_decay": 0.1},
        "depth": depth,
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"every": 10, "progress": False, "tensorboard": False},
        "eval": {"every": 0, "depths": [scale.mean_recurrence], "batches": 1},
        "runtime": {"device": "cpu", "dtype": "float32", "threads": scale.threads},
    }


def train_arm(name: str, tree: dict[str, Any], out: Path, log: Log, reuse: bool = False) -> dict[str, Any]:
    """Train one arm; returns its record (checkpoint folder, parameters, seconds, final training loss). With
    `reuse`, an arm whose folder already holds a finished run of the same config is read back, not retrained."""
    from recurrent_depth.training.checkpoint import latest_checkpoint
    from recurrent_depth.training.config import config_from_dict
    from recurrent_depth.training.loop import train

    cfg = config_from_dict(tree)
    folder = out / name
    done = latest_checkpoint(folder) if reuse else None
    same = done is not None and json.loads((folder / "config.json").read_text()) == json.loads(
        json.dumps(cfg.to_dict()))
    if same and done.name.endswith(f"{tree['train']['steps']:08d}"):
        log(f"  reusing {name} from {done}")
    else:
        train(cfg, folder, overwrite=True)  # retrain the arm: replace what an earlier run left
    return arm_record(name, folder, log)


def arm_record(name: str, folder: Path, log: Log) -> dict[str, Any]:
    """Checkpoint, parameter count, training seconds and mean loss of the last 20 logged steps of a finished arm."""
    from recurrent_depth.model.checkpoint import read_config
    from recurrent_depth.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(folder)
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [x["loss"] for x in lines if "loss" in x][-20:] or [float("nan")]
    rec = {"name": name, "checkpoint": str(ckpt), "params": read_config(ckpt).estimate_params(),
           "train_seconds": round(max(x.get("elapsed_s", 0.0) for x in lines), 1),
           "final_loss": sum(losses) / len(losses)}
    log(f"  trained {name}: {rec['params']:,} parameters, {rec['train_seconds']:.0f} s, "
        f"final loss {rec['final_loss']:.3f}")
    return rec


def _train_job(name: str, tree: dict[str, Any], out: Path, reuse: bool) -> dict[str, Any]:
    return train_arm(name, tree, out, lambda msg: print(msg, flush=True), reuse)


def train_all(jobs: dict[str, dict[str, Any]], out: Path, workers: int, log: Log,
              reuse: bool = False) -> dict[str, dict[str, Any]]:
    """Train every arm, `workers` at a time in separate processes (1: in this process), longest first."""
    order = sorted(jobs, key=lambda n: -_cost(jobs[n]))
    if workers <= 1:
        return {name: train_arm(name, jobs[name], out, log, reuse) for name in order}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_train_job, name, jobs[name], out, reuse) for name in order}
        return {name: f.result() for name, f in futures.items()}


def _cost(tree: dict[str, Any]) -> float:
    """Rough training cost: layers applied per token (mean depth for recurrent arms) x steps x sequence length."""
    f = tree["model"]
    sampler = tree["depth"]["sampler"]
    depth = 1 if sampler == "non-recurrent" else tree["depth"].get("depth") or f["mean_recurrence"]
    layers = f["n_layers_in_prelude"] + f["n_layers_in_coda"] + f["n_layers_in_recurrent_block"] * depth
    return layers * tree["train"]["steps"] * tree["data"]["seq_len"]


def _load(rec: dict[str, Any]) -> tuple[Any, Any]:
    return _load_checkpoint(rec["checkpoint"])


@functools.lru_cache(maxsize=4)
def _load_checkpoint(path: str) -> tuple[Any, Any]:
    """Model and tokenizer of an arm's checkpoint, read once however many evaluations use them."""
    from recurrent_depth.data.tokenizer import load_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    return RecurrentDepthForCausalLM.from_pretrained(path), load_tokenizer(path)


# --------------------------------------------------------------------------------------------- evaluation
def sweep_depths(mean: int, quick: bool) -> list[int]:
    """The seed table's 1x / 5x / 10x / 50x iteration points plus the training mean and 4x it."""
    base = {1, 2, mean, 2 * mean, 4 * mean} if quick else {1, 2, 4, 5, 8, 10, 16, 32, 50, mean, 4 * mean}
    return sorted(base)


def eval_depths(rec: dict[str, Any], splits: dict[str, list[dict]], depths: list[int]) -> dict[str, list]:
    """Exact-match accuracy at every depth on every split (teacher-forced: equal to greedy at fixed depth)."""
    from recurrent_depth.evaluation.sweeps import depth_sweep

    model, tok = _load(rec)
    return {s: depth_sweep(model, tok, rows, depths, method="teacher_forced", init_scale=EVAL_INIT_SCALE)
            for s, rows in splits.items()}


def eval_exit(rec: dict[str, Any], rows: list[dict], scale: Scale) -> list[dict[str, Any]]:
    from recurrent_depth.evaluation.sweeps import exit_sweep

    model, tok = _load(rec)
    return exit_sweep(model, tok, rows, "kl", list(scale.exit_thresholds), scale.mean_recurrence,
                      init_scale=EVAL_INIT_SCALE)


def eval_cot(rec: dict[str, Any], task: Any, splits: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Greedy chain-of-thought decoding: accuracy of the final answer and the tokens written before it."""
    from recurrent_depth.evaluation.sweeps import evaluate_accuracy

    model, tok = _load(rec)
    out = {}
    for split, rows in splits.items():
        r = evaluate_accuracy(model, tok, rows, 1, scorer=lambda pred, ans: task.score(task.extract_answer(pred),
                                                                              task.extract_answer(ans)),
                     max_new_tokens=max(len(tok(x["answer"])["input_ids"]) for x in rows) + 3,
                     init_scale=EVAL_INIT_SCALE)
        answer_tokens = sum(len(tok(task.extract_answer(x["answer"]))["input_ids"]) + 1 for x in rows) / len(rows)
        r["extra_context_tokens"] = r["mean_new_tokens"] - answer_tokens
        out[split] = r
    return out


def eval_text(rec: dict[str, Any], texts: list[str], depths: list[int]) -> list[dict[str, Any]]:
    from recurrent_depth.evaluation.sweeps import perplexity_sweep

    model, tok = _load(rec)
    return perplexity_sweep(model, tok, texts, depths, seq_len=64, max_blocks=64, init_scale=EVAL_INIT_SCALE)


# ------------------------------------------------------------------------------------------------- claims
def _acc(records: list[dict], r: int) -> float:
    return next(x["accuracy"] for x in records if x["num_steps"] == r)


LEARNED = 0.05  # below this accuracy an arm learned nothing, and no claim about it can hold


def effective_multiple(baselines: list[dict[str, Any]], best: float) -> tuple[int, str]:
    """Largest m such that every baseline up to m x the parameters that trained (in-distribution accuracy >= 5%)
    is at or below the recurrent model's best hard-split accuracy; 0 if the 1x baseline already beats it. A
    baseline that did not train proves nothing and stops the count (it cannot be "matched")."""
    m = 0
    for b in sorted(baselines, key=lambda b: b["multiplier"]):
        if b["accuracy"].get("test", 1.0) < LEARNED:
            return m, f"largest matched: {m}x ({b['multiplier']}x baseline did not train)" if m else \
                f"no trained baseline matched ({b['multiplier']}x baseline did not train)"
        if b["accuracy"]["ood"] > best:
            break
        m = b["multiplier"]
    return m, f"largest matched: {m}x" if m else "the 1x baseline already beats it"


def judge_claims(res: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    """One {"claim", "target", "measured", "held"} per item of the issue's "What must show".

    A comparison between arms that learned nothing (accuracy under 5%) never counts as held."""
    mean = scale.mean_recurrence
    hard = res["recurrent"]["depth"]["ood"]
    claims = []
    rise = _acc(hard, mean) - _acc(hard, 1)
    claims.append({"claim": "On the hard split, accuracy rises with test-time depth",
                   "target": "+30 points from r=1 to the training mean",
                   "measured": f"{100 * _acc(hard, 1):.1f}% at r=1 -> {100 * _acc(hard, mean):.1f}% at r={mean} "
                               f"({100 * rise:+.1f} points)", "held": rise >= 0.30})
    best = max(x["accuracy"] for x in hard)
    drop = best - _acc(hard, 4 * mean)
    claims.append({"claim": "No collapse beyond the training depth",
                   "target": f"accuracy at r={4 * mean} (4x mean) within 2 points of the best",
                   "measured": f"best {100 * best:.1f}%, at r={4 * mean} {100 * _acc(hard, 4 * mean):.1f}% "
                               f"({100 * drop:.1f} points below)", "held": drop <= 0.02 and best >= LEARNED})
    m, note = effective_multiple(res["baselines"], best)
    shown = ", ".join(f"{b['multiplier']}x: {100 * b['accuracy']['ood']:.1f}%" for b in res["baselines"])
    claims.append({"claim": "Effective parameters: the recurrent model matches a much larger fixed-depth model",
                   "target": ">= 8x parameters matched on the hard split (the seed claims 14x)",
                   "measured": f"recurrent best {100 * best:.1f}% vs baselines {shown}; {note}",
                   "held": m >= 8 and best >= LEARNED})
    cot = res["cot"]["ood"]
    latent_acc = _acc(hard, mean)
    claims.append({"claim": "Latent reasoning uses no context, unlike chain of thought",
                   "target": "chain-of-thought extra context tokens vs the latent model's zero, at equal accuracy",
                   "measured": f"CoT {100 * cot['accuracy']:.1f}% with {cot['extra_context_tokens']:.1f} extra "
                               f"tokens per answer; latent {100 * latent_acc:.1f}% with 0",
                   "held": cot["extra_context_tokens"] > 0 and latent_acc >= cot["accuracy"] - 0.02
                   and latent_acc >= LEARNED})
    ok = [x for x in res["recurrent"]["exit"] if x.get("threshold") is not None and x["accuracy_drop"] <= 0.01]
    saved = max((x["steps_saved"] for x in ok), default=0.0)
    claims.append({"claim": "Adaptive exit saves iterations", "target": ">= 30% fewer iterations, <= 1 point lost",
                   "measured": f"{100 * saved:.1f}% fewer iterations (KL exit, cap r={mean}) within 1 point",
                   "held": saved >= 0.30 and res["recurrent"]["exit"][0]["accuracy"] >= LEARNED})
    ppl = {x["num_steps"]: x["perplexity"] for x in res["text"]["perplexity"]}
    falls = all(ppl[a] >= ppl[b] for a, b in zip(sorted(ppl), sorted(ppl)[1:]) if b <= mean)
    rise4 = ppl[4 * mean] / ppl[mean] - 1
    claims.append({"claim": "Text LM (no special data): validation perplexity falls with depth, no rise beyond",
                   "target": f"falls up to r={mean}; at r={4 * mean} no more than 2% above r={mean}",
                   "measured": f"perplexity {ppl[1]:.1f} at r=1 -> {ppl[mean]:.1f} at r={mean} -> "
                               f"{ppl[4 * mean]:.1f} at r={4 * mean} ({100 * rise4:+.1f}%)",
                   "held": falls and rise4 <= 0.02})
    return claims


# ------------------------------------------------------------------------------------------------ the run
def rejudge(out_dir: str | Path) -> dict[str, Any]:
    """Recompute the claims and rewrite results.md / plots from an existing results.json (no training)."""
    out = Path(out_dir)
    file = out / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"no results.json in {str(out)!r}")
    res = json.loads(file.read_text())
    scale = Scale(**{**res["scale"], "multipliers": tuple(res["scale"]["multipliers"]),
                     "exit_thresholds": tuple(res["scale"]["exit_thresholds"])})
    res["claims"] = judge_claims(res, scale)
    write_outputs(res, out)
    return res


def _seq_len(rows: list[dict]) -> int:
    return max(len(r["prompt"]) + len(r["answer"]) for r in rows) + 4


def task_data(scale: Scale) -> dict[str, Any]:
    """The `data` section that trains on the scale's built-in task (answer-only loss, per-character tokens)."""
    return {"kind": "task", "tokenizer": "char", "answer_only_loss": True,
            "task": {"name": scale.task, "difficulty": scale.difficulty, "num_train": scale.n_train, "num_eval": 64}}


EVAL_SEEDS = {"test": 1000, "ood": 1001}  # offsets from scale.seed for the evaluation rows
# s0 drawn as in training, seeded: the protocol results/reproduce/ was measured with, pinned here so that a re-run
# reproduces it (the library default, `inference.defaults.INIT_SCALE`, is 0; on the bundled recurrent arm that moves
# the hard split at r = 1 from 19.5% to 21.5% and leaves r = 8 at 52.2%).
EVAL_INIT_SCALE = 1.0


def task_seq_len(scale: Scale, task: Any = None) -> int:
    """Sequence length that fits the longest training example and the longest hard-split evaluation example (the
    same rows `run` trains and evaluates on, so `rdepth bundle` retrains exactly the reproduce recipe)."""
    from recurrent_depth.tasks import get_task

    task = task or get_task(scale.task, **scale.difficulty)
    train = task.generate(scale.n_train, split="train", seed=scale.seed)
    ood = task.generate(scale.n_eval, split="ood", seed=scale.seed + EVAL_SEEDS["ood"])
    return max(_seq_len(train), _seq_len(ood))


def run(out_dir: str | Path, quick: bool = False, scale: Scale | None = None, log: Log = print,
        reuse: bool = False) -> dict[str, Any]:
    """Train every arm, evaluate, judge the claims; write results.json, results.md and plots into `out_dir`.
    With `reuse`, arms already trained there with the same config are read back instead of retrained."""
    from recurrent_depth.evaluation.corpus import corpus_texts, export_corpus
    from recurrent_depth.tasks import get_task, write_jsonl

    scale = scale or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(scale.threads)
    started = time.perf_counter()
    task = get_task(scale.task, **scale.difficulty)
    seeds = {s: scale.seed + offset for s, offset in EVAL_SEEDS.items()}
    splits = {s: task.generate(scale.n_eval, split=s, seed=seed) for s, seed in seeds.items()}
    cot_rows = {s: task.generate(scale.n_eval, split=s, seed=seed, cot=True) for s, seed in seeds.items()}
    seq_len = task_seq_len(scale, task)
    data = task_data(scale)
    mean, steps = scale.mean_recurrence, scale.steps
    log(f"[reproduce] task {scale.task} {task}; {scale.steps} steps x {scale.batch_size} sequences per arm; "
        f"{scale.jobs} arms at a time")
    jobs: dict[str, dict[str, Any]] = {}
    jobs["recurrent"] = train_tree(scale, model_fields(scale), {"sampler": "poisson-lognormal-filling"}, data,
                                   steps, seq_len)
    vocab = len(task.alphabet) + 4
    cores = {m: baseline_core_layers(scale, m, vocab) for m in scale.multipliers}
    for m, n_core in cores.items():  # standard transformers: the core runs once; deeper ones get a lower lr
        jobs[f"baseline-{m}x"] = train_tree(scale, model_fields(scale, n_core), {"sampler": "non-recurrent"}, data,
                                            steps, seq_len, lr=scale.lr / m**0.5)
    jobs["fixed-depth"] = train_tree(scale, model_fields(scale), {"sampler": "fixed", "depth": mean}, data, steps,
                                     seq_len)
    cot_file = write_jsonl(task.generate(scale.n_train, split="train", seed=scale.seed, cot=True),
                           out / "data" / "cot_train.jsonl")
    cot_data = {"kind": "jsonl", "paths": [str(cot_file)], "tokenizer": "char", "answer_only_loss": True,
                "val_fraction": 0.01}
    cot_len = max(_seq_len(cot_rows["ood"]), seq_len * 3)
    jobs["cot"] = train_tree(scale, model_fields(scale), {"sampler": "non-recurrent"}, cot_data, steps, cot_len)
    corpus = export_corpus(out / "data" / "corpus", max_chars=scale.text_max_chars)
    text_data = {"kind": "text", "paths": [str(corpus["train"].parent)], "glob": "*.txt",
                 "val_paths": [str(corpus["validation"].parent)], "tokenizer": "bpe", "bpe_vocab_size": 1024}
    jobs["text"] = train_tree(scale, model_fields(scale), {"sampler": "poisson-lognormal-filling"}, text_data,
                              scale.text_steps, 64)
    arms = train_all(jobs, out, scale.jobs, log, reuse)
    baselines = [{**arms[f"baseline-{m}x"], "multiplier": m, "core_layers": n} for m, n in cores.items()]

    log("[eval] depth sweeps, exit sweep, chain of thought, perplexity")
    torch.set_num_threads(max(1, scale.jobs * scale.threads))
    depths = sweep_depths(mean, quick)
    res: dict[str, Any] = {"scale": asdict(scale), "quick": quick, "task": repr(task), "depths": depths}
    res["recurrent"] = {**arms["recurrent"], "depth": eval_depths(arms["recurrent"], splits, depths),
                        "exit": eval_exit(arms["recurrent"], splits["ood"], scale),
                        "exit_test": eval_exit(arms["recurrent"], splits["test"], scale)}
    res["fixed-depth"] = {**arms["fixed-depth"], "depth": eval_depths(arms["fixed-depth"], splits, depths)}
    for b in baselines:
        acc = eval_depths(b, splits, [1])
        b["accuracy"] = {s: acc[s][0]["accuracy"] for s in acc}
    res["baselines"] = baselines
    res["cot"] = {**arms["cot"], **eval_cot(arms["cot"], task, cot_rows)}
    val_texts = corpus_texts("validation", max_chars=scale.text_max_chars // 10)
    res["text"] = {**arms["text"], "perplexity": eval_text(arms["text"], val_texts, sweep_depths(mean, True))}
    res["claims"] = judge_claims(res, scale)
    res["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(res, out)
    log(f"[reproduce] done in {res['seconds']:.0f} s: {out / 'results.md'}")
    return res


# ------------------------------------------------------------------------------------------------ outputs
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(res: dict[str, Any]) -> str:
    """The seed's claims with our measured numbers beside them."""
    mean = res["scale"]["mean_recurrence"]
    rec = res["recurrent"]["depth"]
    lines = ["# Reproducing the seed's claims at small scale", "",
             f"Task `{res['scale']['task']}` ({res['task']}); training mean depth r = {mean}; "
             f"{res['scale']['steps']} steps x {res['scale']['batch_size']} sequences per arm; "
             f"{'QUICK smoke run: too small to test the claims' if res['quick'] else 'full run'}; "
             f"{res['seconds']:.0f} s in all.", "",
             "## The seed's table: test-time iterations against gains", "",
             "| iterations | seed says | accuracy, in-distribution | accuracy, hard (ood) split |",
             "|---|---|---|---|"]
    words = {1: "baseline", 5: "moderate gains", 10: "significant gains", 50: "dramatic gains (50x+)"}
    for r in res["depths"]:
        acc_t, acc_o = _acc(rec["test"], r), _acc(rec["ood"], r)
        lines.append(f"| r = {r} | {words.get(r, '')} | {_pct(acc_t)}% | {_pct(acc_o)}% |")
    lines += ["", "## Claims", "", "| claim | target | measured | held |", "|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['claim']} | {c['target']} | {c['measured']} | {'yes' if c['held'] else 'no'} |")
    lines += ["", "## Arms", "", "| arm | parameters | train s | final loss | acc. test | acc. ood |",
              "|---|---|---|---|---|---|"]
    for name in ("recurrent", "fixed-depth"):
        a = res[name]
        lines.append(f"| {name} (at r={mean}) | {a['params']:,} | {a['train_seconds']} | {a['final_loss']:.3f} | "
                     f"{_pct(_acc(a['depth']['test'], mean))}% | {_pct(_acc(a['depth']['ood'], mean))}% |")
    for b in res["baselines"]:
        lines.append(f"| baseline {b['multiplier']}x ({b['core_layers']} core layers, run once) | {b['params']:,} | "
                     f"{b['train_seconds']} | {b['final_loss']:.3f} | {_pct(b['accuracy']['test'])}% | "
                     f"{_pct(b['accuracy']['ood'])}% |")
    c = res["cot"]
    lines.append(f"| chain of thought (1x) | {c['params']:,} | {c['train_seconds']} | {c['final_loss']:.3f} | "
                 f"{_pct(c['test']['accuracy'])}% | {_pct(c['ood']['accuracy'])}% |")
    lines += ["", "## Adaptive exit (KL criterion, hard split, cap r = training mean)", "",
              "| threshold | accuracy | mean steps | steps saved |", "|---|---|---|---|"]
    for x in res["recurrent"]["exit"]:
        thr = "fixed" if x["threshold"] is None else f"{x['threshold']:g}"
        lines.append(f"| {thr} | {_pct(x['accuracy'])}% | {x['mean_steps']:.2f} | {_pct(x['steps_saved'])}% |")
    lines += ["", "## Text LM: validation perplexity against depth", "", "| r | perplexity |", "|---|---|"]
    lines += [f"| {x['num_steps']} | {x['perplexity']:.2f} |" for x in res["text"]["perplexity"]]
    lines += ["", "Plots: `depth.png`, `baselines.png`, `exit.png`, `perplexity.png`. Raw numbers: `results.json`.", ""]
    return "\n".join(lines)


def write_outputs(res: dict[str, Any], out: Path) -> None:
    from recurrent_depth.evaluation.plots import plot_depth_sweep, plot_exit_sweep, plot_series

    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(res))
    series = {f"{arm}, {split}": res[arm]["depth"][split] for arm in ("recurrent", "fixed-depth")
              for split in ("test", "ood")}
    plot_depth_sweep(series, out / "depth.png", title="accuracy against test-time depth")
    plot_exit_sweep({"ood": res["recurrent"]["exit"], "test": res["recurrent"]["exit_test"]}, out / "exit.png")
    plot_depth_sweep(res["text"]["perplexity"], out / "perplexity.png", metric="perplexity",
                     title="validation perplexity against depth (text)")
    best = max(x["accuracy"] for x in res["recurrent"]["depth"]["ood"])
    pts = {"fixed-depth baselines (ood)": [{"params": b["params"], "accuracy": b["accuracy"]["ood"]}
                                           for b in res["baselines"]],
           "recurrent, best depth (ood)": [{"params": res["recurrent"]["params"], "accuracy": best}]}
    plot_series(pts, "params", "accuracy", out / "baselines.png", title="hard-split accuracy against parameters",
                logx=True)


__all__ = ["FULL", "QUICK", "Scale", "judge_claims", "results_markdown", "run"]
