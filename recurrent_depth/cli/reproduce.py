"""`rdepth reproduce [--quick] --out DIR`: run the seed-claim experiment (`experiments/reproduce.py` in a source
checkout): train the recurrent model and its baselines, evaluate them, write results.json (with a `claims` list),
results.md and plots. The experiment lives outside the library and drives it through its public API; this verb
only finds and runs it."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "reproduce.py"


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="reproduce the seed's claims at small scale (trains and evaluates every arm)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots, arms/)")
    p.add_argument("--quick", action="store_true", help="a smoke run in under 2 minutes on 2 cores (too small to "
                   "test the claims)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per arm (default: the scale's); not recurrences, which are --num-steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per arm")
    p.add_argument("--jobs", type=int, default=None, help="arms trained at once (default 2)")
    p.add_argument("--reuse", action="store_true",
                   help="read back arms already trained in --out with the same config instead of retraining them")
    p.add_argument("--report-only", action="store_true",
                   help="re-judge the claims and rewrite results.md and plots from --out's results.json")
    return p


def load_experiment(path: Path = EXPERIMENT) -> ModuleType:
    """The experiment module, imported from the source checkout this package runs from."""
    if not path.is_file():
        raise FileNotFoundError(f"the reproduce experiment is not installed with the package: it lives in a source "
                                f"checkout's experiments/reproduce.py (looked for {path}); clone the repository and "
                                f"run `pip install -e .` there")
    name = "rdepth_experiment_reproduce"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    if args.train_steps is not None and args.train_steps < 1:
        raise ValueError(f"--train-steps must be >= 1, got {args.train_steps}")
    argv = ["--out", args.out]
    argv += ["--quick"] * args.quick + ["--reuse"] * args.reuse + ["--report-only"] * args.report_only
    for flag, value in (("--train-steps", args.train_steps), ("--threads", args.threads), ("--jobs", args.jobs)):
        if value is not None:
            argv += [flag, str(value)]
    return load_experiment().main(argv)
