"""`rdepth inspect`: look at a prompt's latent thought, token by token.

    rdepth inspect --model PATH --prompt "The capital of France is" --num-steps 64 --out out/inspect
    rdepth inspect --model PATH --prompt "2+3=5" --tokens 3 "=" --threshold kl=5e-4

Writes PNG figures and a self-contained `index.html` (open it in a browser; it loads nothing from the network).
"""

from __future__ import annotations

import argparse

import torch

from recurrent_depth.cli.progress import Progress
from recurrent_depth.inference.defaults import INIT_SCALE, check_init_scale
from recurrent_depth.inspection.convergence import CRITERIA

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="per-token convergence, exit steps, logit lens and latent trajectories of a prompt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="checkpoint folder (model files + tokenizer.json); default: the bundled checkpoint")
    p.add_argument("--prompt", required=True, help="the text to inspect")
    p.add_argument("--num-steps", type=int, default=64, help="recurrence steps to run and record (default 64)")
    p.add_argument("--out", default="out/inspect", help="output folder for the figures and index.html")
    p.add_argument("--tokens", nargs="+", default=None, metavar="TOKEN",
                   help="positions (0-based, negative from the end) or token texts whose trajectories to draw; "
                        "default: the two most and two least converged")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help=f"override an exit threshold, repeatable; criteria: {', '.join(CRITERIA)}")
    p.add_argument("--colour-by", default="kl", choices=CRITERIA, help="criterion that colours the tokens")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE,
                   help="scale of the random initial state (default 0: zeros)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state")
    p.add_argument("--top-k", type=int, default=5, help="tokens the logit lens keeps per step")
    p.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights' dtype (default float32; logits and criteria are computed in float32 anyway)")
    return p


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """['kl=5e-4', ...] -> {'kl': 5e-4}; a malformed item or unknown criterion raises ValueError naming it."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in CRITERIA:
            raise ValueError(f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(CRITERIA)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {item!r}: {value!r} is not a number") from None
    return out


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.assets import resolve_model
    from recurrent_depth.data.tokenizer import load_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM
    from recurrent_depth.inspection import inspect_prompt, write_report

    model_dir = resolve_model(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {str(model_dir)!r} is not a folder")
    if args.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {args.num_steps}")
    check_init_scale(args.init_scale, "--init-scale")
    thresholds = parse_thresholds(args.threshold)
    with Progress() as progress:
        progress.update(f"loading {model_dir}")
        tokenizer = load_tokenizer(model_dir)
        model = RecurrentDepthForCausalLM.from_pretrained(model_dir).to(torch.device(args.device), DTYPES[args.dtype])
        model.eval()
        progress.update(f"tracing {args.num_steps} recurrence steps over the prompt")
        result = inspect_prompt(model, tokenizer, args.prompt, num_steps=args.num_steps, tokens=args.tokens,
                                thresholds=thresholds, init_scale=args.init_scale, seed=args.seed, top_k=args.top_k,
                                meta={"model": str(model_dir)})
        progress.update(f"writing the figures and index.html into {args.out}")
        paths = write_report(result, args.out, colour_by=args.colour_by)
    conv = result.convergence
    steps = conv.exit_step[args.colour_by]
    print(f"{len(result.texts)} tokens, {args.num_steps} steps; {args.colour_by} exit step: "
          f"mean {steps.float().mean():.1f}, min {int(steps.min())}, max {int(steps.max())}, "
          f"not converged {int((~conv.exited[args.colour_by]).sum())}")
    for name, path in paths.items():
        print(f"{name:>12}: {path}")
    return 0
