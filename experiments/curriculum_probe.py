"""The recurrent arm alone, at several seeds: does a curriculum make it find the step on every seed, and does a
task learn at all? (issue 16)

    python experiments/curriculum_probe.py --out DIR [--curriculum 0.3] [--seeds 0 1 2 3] [--steps 3000]
        [--task NAME --difficulty JSON --window W --outer-window W]

Trains only the full run's recurrent arm (experiments/reproduce.py FULL: modular_chain with labels, core window 3,
prelude and coda window 3, Huginn's depth sampler; --task/--difficulty/--window/--outer-window change the task and
the attention windows) at each seed
with `data.curriculum` set, then prints and writes (DIR/probe.json) its in-distribution and harder-split accuracy
at r = 1, 5, 10, 50 with the per-level accuracy at its best r.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce as rp  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--curriculum", type=float, default=0.3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=rp.FULL.steps)
    p.add_argument("--lr", type=float, default=None, help="the looped arm's lr (default: the full run's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--task", default=rp.FULL.task)
    p.add_argument("--difficulty", type=json.loads, default=None, help="the task's knobs as JSON (default: FULL's "
                   "for its task, else the task's defaults)")
    p.add_argument("--window", type=int, default=rp.FULL.core_window)
    p.add_argument("--outer-window", type=int, default=rp.FULL.outer_window, help="the prelude's and coda's window")
    a = p.parse_args(argv)
    from recurrent_depth.tasks import get_task

    difficulty = a.difficulty if a.difficulty is not None else rp.FULL.difficulty if a.task == rp.FULL.task else {}
    scale = replace(rp.FULL, curriculum=a.curriculum, steps=a.steps, jobs=a.jobs, looped_lr=a.lr, task=a.task,
                    difficulty=difficulty, core_window=a.window, outer_window=a.outer_window)
    task = get_task(scale.task, **scale.difficulty)
    out = Path(a.out)
    seq_len, data = rp.task_seq_len(scale, task), rp.task_data(scale)
    fields = rp.model_fields(scale, window=scale.core_window, outer=scale.outer_window)
    jobs = {f"recurrent-s{s}": rp.train_tree(scale, fields, {"sampler": "poisson-lognormal-filling"}, data,
                                             scale.steps, seq_len, lr=scale.looped_lr, seed=s) for s in a.seeds}
    arms = rp.train_all(jobs, out / "arms", scale.jobs, print)
    splits = rp.eval_rows(scale, task)
    depths = [1, 5, 10, 50]
    report = {"task": repr(task), "window": a.window, "outer_window": a.outer_window, "curriculum": a.curriculum,
              "steps": a.steps, "lr": scale.looped_lr or scale.lr, "arms": {}}
    for name, rec in arms.items():
        curves = rp.eval_depths(rec, splits, depths)
        best = max(curves["ood"], key=lambda x: x["accuracy"])
        report["arms"][name] = {"train_seconds": rec["train_seconds"],
                                **{sp: {c["num_steps"]: round(c["accuracy"], 4) for c in cs}
                                   for sp, cs in curves.items()},
                                "ood_levels_at_best": best["accuracy_by_level"], "best_r": best["num_steps"]}
        print(name, json.dumps(report["arms"][name]))
    (out / "probe.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
