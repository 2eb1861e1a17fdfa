"""`rdepth <verb>`: thin command-line layer over the library. Each verb lives in `recurrent_depth/cli/<module>.py`
and defines `add_parser(subparsers, name)` (registering its flags, each with help) and `run(args) -> int`.

    rdepth demo | generate | train | eval | reproduce | serve | chat | inspect ...
    rdepth --version

Only the verb being run is imported (with torch and the model), so `rdepth --help` and `rdepth --version` answer
at once; the one-line summaries below are what `rdepth --help` lists (a test keeps them equal to each verb's own).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

# verb -> (module under recurrent_depth.cli, the summary `rdepth --help` lists)
VERBS = {
    "demo": ("demo", "accuracy against test-time depth on the bundled checkpoint and task"),
    "generate": ("generate", "generate from a checkpoint, showing the recurrence steps of every token"),
    "train": ("train", "train with randomized recurrence depth (configs/*.yaml; torchrun for DDP/FSDP2)"),
    "eval": ("evaluate", "accuracy / perplexity against test-time depth and adaptive-exit thresholds"),
    "reproduce": ("reproduce", "reproduce the seed's claims at small scale (trains and evaluates every arm)"),
    "serve": ("serve", "serve a model behind an OpenAI-compatible API (per-request depth and exit)"),
    "chat": ("chat", "chat with a model in the terminal, streaming, with steps per token"),
    "inspect": ("inspect_cmd", "per-token convergence, exit steps, logit lens and latent trajectories of a prompt"),
}


def _version() -> str:
    from recurrent_depth import __version__

    return f"rdepth (recurrent_depth) {__version__}"


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the verbs in `load` fully registered (None: all of them); the others are listed only."""
    load = set(VERBS) if load is None else set(load)
    parser = argparse.ArgumentParser(prog="rdepth", description="Recurrent-depth language models (Huginn-compatible).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, summary) in VERBS.items():
        if verb not in load:
            sub.add_parser(verb, help=summary)
            continue
        module = importlib.import_module(f"recurrent_depth.cli.{module_name}")
        module.add_parser(sub, verb).set_defaults(_run=module.run)
    return parser


def _verb(argv: list[str]) -> str | None:
    """The verb named on the command line (the first word that is not an option), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in VERBS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = _verb(argv)
    parser = build_parser([verb] if verb else [])
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"rdepth {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
