"""`rdepth reproduce [--quick] --out DIR`: train the recurrent model and its baselines, evaluate them, and write
results.json (with a `claims` list), results.md and plots. See recurrent_depth.evaluation.reproduce."""

from __future__ import annotations

import argparse
from dataclasses import replace


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="reproduce the seed's claims at small scale (trains and evaluates every arm)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots, checkpoints)")
    p.add_argument("--quick", action="store_true", help="a smoke run in under 5 minutes on 2 cores (too small to "
                   "test the claims)")
    p.add_argument("--task", default=None, help="reasoning task (default: the full run's)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per arm (default: the scale's); not recurrences, which are --num-steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=None, help="seed for data, models and depth draws")
    p.add_argument("--reuse", action="store_true",
                   help="read back arms already trained in --out with the same config instead of retraining them")
    p.add_argument("--report-only", action="store_true",
                   help="re-judge the claims and rewrite results.md and plots from --out's results.json")
    return p


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.evaluation import reproduce

    if args.report_only:
        print(reproduce.rejudge(args.out) and f"rewrote {args.out}/results.md")
        return 0
    scale = reproduce.QUICK if args.quick else reproduce.FULL
    overrides = {k: v for k, v in {"task": args.task, "steps": args.train_steps, "threads": args.threads,
                                   "seed": args.seed}.items() if v is not None}
    if overrides.get("steps", 1) < 1:
        raise ValueError(f"--train-steps must be >= 1, got {args.train_steps}")
    reproduce.run(args.out, quick=args.quick, scale=replace(scale, **overrides), reuse=args.reuse)
    return 0
