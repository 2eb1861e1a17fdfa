"""Flags that several verbs share, defined once so that their spelling, help text and defaults agree.

    add_model_args(p)      --model, --device, --dtype, --num-steps, --threads: every verb that loads a model
    add_exit_arg(p)        --exit NAME[:THRESHOLD], parsed by `inference.exit.parse_exit_spec` (the one parser)
    parse_num_steps_list("1,2,4") -> [1, 2, 4]: --num-steps of a verb that sweeps depths (eval, demo)
    parse_exit(args.exit)  -> an ExitCriterion (or None); parse_exit_sweep("kl:1e-2,1e-3") -> ("kl", [1e-2, 1e-3])
    resolve_runtime(args)  -> (device, dtype) after applying --threads; load_model(args) -> checkpoint and tokenizer

Only the verb being run imports this module (`rdepth --help` imports none). A test freezes every verb's flag surface
(tests/cli/cli_surface.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recurrent_depth.runtime import DTYPES

NUM_STEPS_HELP = "recurrences per token, r (default: the checkpoint's mean_recurrence)"
EXIT_METAVAR = "NAME[:THRESHOLD]"


def add_model_args(p: argparse.ArgumentParser, *, num_steps: bool = True) -> None:
    """--model, --device, --dtype, --threads and (unless `num_steps` is False, for a verb that sweeps a list of
    depths under the same flag name) --num-steps."""
    p.add_argument("--model", default=None,
                   help="checkpoint folder (config.json, safetensors, tokenizer.json); default: the bundled checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype: auto = float32 on CPU, bfloat16 on CUDA (logits and exit criteria are "
                        "computed in float32 either way)")
    if num_steps:
        p.add_argument("--num-steps", type=int, default=None, help=NUM_STEPS_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's choice)")


def _criteria() -> str:
    from recurrent_depth.inference.exit import EXIT_CRITERIA

    return ", ".join(EXIT_CRITERIA)


THRESHOLD_HELP = "THRESHOLD default: the criterion's own"


def exit_help(what: str, thresholds: str = THRESHOLD_HELP) -> str:
    """The help text of an --exit flag: `what` it does, the criteria named by the registry, then what a missing
    threshold means (`thresholds`)."""
    return f"{what}; NAME one of {_criteria()}; {thresholds}"


def add_exit_arg(p: argparse.ArgumentParser, *, help: str = "adaptive exit per token (default: fixed depth)",
                 repeat: bool = False, thresholds: str = THRESHOLD_HELP) -> None:
    """--exit NAME[:THRESHOLD] (a string, parsed with `parse_exit` in `run`, so errors name the flag)."""
    text = exit_help(help, thresholds)
    if repeat:
        p.add_argument("--exit", action="append", default=[], metavar=EXIT_METAVAR, help=text)
    else:
        p.add_argument("--exit", default=None, metavar=EXIT_METAVAR, help=text)


def parse_exit(spec: str | None, flag: str = "--exit") -> Any:
    """`NAME[:THRESHOLD]` -> the ExitCriterion (None for None); ValueError naming `flag`, the spec and the valid
    criteria."""
    if spec is None:
        return None
    from recurrent_depth.inference.exit import parse_exit_spec

    try:
        return parse_exit_spec(spec)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def parse_exit_sweep(spec: str, flag: str = "--exit") -> tuple[str, list[float]]:
    """`NAME[:T1,T2,...]` (an exit-threshold sweep) -> (NAME, [T1, T2, ...]); no thresholds -> (NAME, []), the
    caller's default list. Each threshold is checked by the same parser as a single `NAME:THRESHOLD`."""
    name, _, values = spec.partition(":")
    if not values:
        return parse_exit(name, flag).name, []
    crits = [parse_exit(f"{name}:{value}", flag) for value in values.split(",")]
    return crits[0].name, [c.threshold for c in crits]


def resolve_runtime(args: argparse.Namespace) -> tuple[Any, Any]:
    """(torch.device, torch.dtype) named by --device / --dtype (`runtime`'s one policy), after --threads is applied."""
    import torch

    from recurrent_depth.runtime import resolve_device, resolve_dtype

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def model_path(args: argparse.Namespace) -> Path:
    """--model as a checkpoint folder; without it, the bundled checkpoint (a clear error if this install has none)."""
    from recurrent_depth.assets import resolve_model

    path = resolve_model(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {str(path)!r} is not a checkpoint folder")
    return path


def load_model(args: argparse.Namespace, need_tokenizer: bool = False) -> tuple[Path, Any, Any]:
    """(folder, model in eval mode on --device in --dtype, tokenizer or None without tokenizer.json). With
    `need_tokenizer`, a folder without tokenizer.json is refused before the model is read."""
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    path = model_path(args)
    if need_tokenizer and not (path / "tokenizer.json").is_file():
        verb = getattr(args, "verb", None) or "this verb"
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}: rdepth {verb} needs one")
    device, dtype = resolve_runtime(args)
    model = RecurrentDepthForCausalLM.from_pretrained(path, device=device, dtype=dtype).eval()
    if not (path / "tokenizer.json").is_file():
        return path, model, None
    from recurrent_depth.data.tokenizer import load_tokenizer

    return path, model, load_tokenizer(path)


def parse_num_steps_list(text: str, flag: str = "--num-steps") -> list[int]:
    """Comma-separated recurrence counts (`1,2,4`) -> [1, 2, 4]; ValueError naming `flag` and the text unless they
    are a non-empty list of non-negative integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ValueError(f"{flag} must list non-negative integers, got {text!r}")
    return values


def resolve_num_steps(args: argparse.Namespace, model: Any, minimum: int = 0) -> int:
    """--num-steps, or the model's mean_recurrence without it; ValueError below `minimum`."""
    num_steps = args.num_steps if args.num_steps is not None else int(model.config.mean_recurrence)
    if num_steps < minimum:
        raise ValueError(f"--num-steps must be >= {minimum}, got {num_steps}")
    return num_steps
