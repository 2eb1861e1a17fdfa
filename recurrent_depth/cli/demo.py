"""`rdepth demo` (what `make demo` runs): on the bundled checkpoint and its bundled reasoning task, accuracy against
test-time depth as a table and a plot, and one generated answer with the recurrence steps each token took."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from recurrent_depth.cli.options import add_model_args, load_model, parse_num_steps_list
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="accuracy against test-time depth on the bundled checkpoint and task",
                       description=__doc__)
    add_model_args(p, num_steps=False)  # --num-steps here is a list of depths
    p.add_argument("--num-steps", default=None,
                   help="comma-separated depths (default: 1,2,4,r̄,2r̄,4r̄,8r̄ and 50; r̄ = training mean)")
    p.add_argument("--n", type=int, default=200, help="problems per split")
    p.add_argument("--out", default="demo-out", help="folder for the plot and records")
    p.add_argument("--seed", type=int, default=7, help="seed for the generated problems")
    return p


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.assets import bundle_info
    from recurrent_depth.evaluation.plots import plot_depth_sweep, plot_level_heatmap
    from recurrent_depth.evaluation.records import write_records
    from recurrent_depth.evaluation.report import format_table
    from recurrent_depth.evaluation.sweeps import depth_sweep
    from recurrent_depth.tasks import get_task

    if args.threads is None:
        args.threads = min(2, torch.get_num_threads())
    listed = parse_num_steps_list(args.num_steps) if args.num_steps else None  # before the model loads
    path, model, tok = load_model(args, need_tokenizer=True)
    info = bundle_info(path)
    if "task" not in info:
        raise ValueError(f"{path} has no bundle.json naming its task; give a checkpoint made by "
                         f"`python experiments/reproduce.py bundle`")
    mean = int(info["mean_recurrence"])
    steps = listed or sorted({1, 2, 4, mean, 2 * mean, 4 * mean, 8 * mean, 50})
    task = get_task(info["task"], **info.get("difficulty", {}))
    print(f"bundled checkpoint {path} ({model.num_parameters():,} parameters, trained at mean depth {mean})")
    print(f"task {task}; {args.n} problems per split\n")
    records = {}
    for split in ("test", "ood"):
        rows = task.generate(args.n, split=split, seed=args.seed)
        recs = depth_sweep(model, tok, rows, steps, method="teacher_forced", progress=_to_stderr)
        for r in recs:
            r["split"] = split
        records[split] = recs
        label = "in-distribution" if split == "test" else "harder, out-of-distribution"
        print(f"{label} ({split}):")
        print(format_table(recs, ["num_steps", "accuracy", "correct", "n"]))
        print()
    out = Path(args.out)
    write_records(records["test"] + records["ood"], out, "demo_depth_sweep", {"model": str(path), "num_steps": steps})
    plot = plot_depth_sweep(records, out / "depth.png", title=f"{task.name}: accuracy against test-time depth")
    print("harder split, accuracy by difficulty level (rows) and depth (columns):")
    print(level_table(records["ood"]))
    heat = plot_level_heatmap(_merge_levels(records["test"], records["ood"]), out / "levels.png",
                              title=f"{task.name}: accuracy by level and depth")
    print(f"\nplots: {plot}, {heat}")
    _show_one(model, tok, task, args.seed, 4 * mean)
    return 0


def level_table(records: list[dict]) -> str:
    """Accuracy per difficulty level (rows) at each depth (columns), as percentages."""
    levels = sorted({int(k) for r in records for k in r.get("accuracy_by_level", {})})
    head = "level " + " ".join(f"r={r['num_steps']:<4}" for r in records)
    lines = [head]
    for lvl in levels:
        cells = [f"{100 * r['accuracy_by_level'].get(lvl, float('nan')):5.0f}%" for r in records]
        lines.append(f"{lvl:>5} " + " ".join(cells))
    return "\n".join(lines)


def _merge_levels(test: list[dict], ood: list[dict]) -> list[dict]:
    """Per-depth records whose accuracy_by_level holds both splits' levels (they do not overlap)."""
    return [{"num_steps": t["num_steps"], "accuracy_by_level": {**t.get("accuracy_by_level", {}),
                                                                **o.get("accuracy_by_level", {})}}
            for t, o in zip(test, ood)]


def _to_stderr(message: str) -> None:
    print(f"rdepth demo: {message}", file=sys.stderr, flush=True)


def _show_one(model, tok, task, seed: int, num_steps: int) -> None:
    """Generate one in-distribution answer with the KL exit and print each token with the steps it used."""
    from recurrent_depth.data.tokenizer import encode_prompt
    from recurrent_depth.inference.generate import generate

    row = task.generate(1, split="test", seed=seed + 1)[0]
    ids = torch.tensor([encode_prompt(tok, row["prompt"])], device=model.device)
    n_answer = len(tok(row["answer"], add_special_tokens=False)["input_ids"])
    # The shared inference defaults (`inference.defaults`): kv_sharing "auto" is "latest" under this exit (a token
    # that exited early is read from its last computed step at deeper steps); init_scale 0, a zero initial state.
    out = generate(model, ids, max_new_tokens=n_answer + 1, num_steps=num_steps, exit_criterion="kl",
                   exit_threshold=5e-4, eos_token_id=tok.eos_token_id, kv_sharing=KV_SHARING_AUTO,
                   init_scale=INIT_SCALE)
    new = out.sequences[0, ids.shape[1]:].tolist()
    shown = " ".join(f"{tok.decode([t])!r}:{int(s)}" for t, s in zip(new, out.steps[0].tolist()) if s > 0)
    text = tok.decode(new, skip_special_tokens=True)
    print(f"\none answer (KL exit at 5e-4, at most {num_steps} steps):\n  prompt  {row['prompt']}\n  answer  {text}"
          f"   (expected {row['answer']}: {'correct' if task.score(text, row['answer']) else 'wrong'})\n"
          f"  token:steps  {shown}")
