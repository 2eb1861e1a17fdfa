"""`rdepth <verb>`: thin command-line layer over the library. Each verb lives in `recurrent_depth/cli/<module>.py`
and defines `add_parser(subparsers)` (registering its flags, each with help) and `run(args) -> int`.

    rdepth demo | generate | train | eval | reproduce | serve | chat | inspect ...
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module under recurrent_depth.cli; a module that is not there yet is skipped.
VERBS = {
    "demo": "demo",
    "generate": "generate",
    "train": "train",
    "eval": "evaluate",
    "reproduce": "reproduce",
    "bundle": "bundle",
    "serve": "serve",
    "chat": "chat",
    "inspect": "inspect_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdepth", description="Recurrent-depth language models (Huginn-compatible).")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_name in VERBS.items():
        try:
            module = importlib.import_module(f"recurrent_depth.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name == f"recurrent_depth.cli.{module_name}":
                continue
            raise
        p = module.add_parser(sub, verb)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
