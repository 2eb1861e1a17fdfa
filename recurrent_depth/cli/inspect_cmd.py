"""`rdepth inspect`: look at a prompt's latent thought, token by token.

    rdepth inspect --model PATH --prompt "The capital of France is" --num-steps 64 --out out/inspect
    rdepth inspect --model PATH --prompt "2+3=5" --tokens 3 "=" --exit kl:5e-4 --exit latent-diff:0.01

Every exit criterion is traced; `--exit NAME[:THRESHOLD]` (repeatable) sets a criterion's threshold, and the first
one given colours the tokens (default: kl at its own threshold). Writes PNG figures and a self-contained
`index.html` (open it in a browser; it loads nothing from the network).
"""

from __future__ import annotations

import argparse

from recurrent_depth.cli.options import add_exit_arg, add_model_args, load_model, parse_exit, resolve_num_steps
from recurrent_depth.inference.defaults import INIT_SCALE, check_init_scale
from recurrent_depth.progress import Progress


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="per-token convergence, exit steps, logit lens and latent trajectories of a prompt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to inspect")
    p.add_argument("--out", default="out/inspect", help="output folder for the figures and index.html")
    p.add_argument("--tokens", nargs="+", default=None, metavar="TOKEN",
                   help="positions (0-based, negative from the end) or token texts whose trajectories to draw; "
                        "default: the two most and two least converged")
    add_exit_arg(p, repeat=True, help="set a criterion's threshold, repeatable; the first colours the tokens "
                                      "(default: kl; every criterion but none is traced)")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE,
                   help="scale of the random initial state (default 0: zeros)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial state")
    p.add_argument("--top-k", type=int, default=5, help="tokens the logit lens keeps per step")
    return p


def parse_exits(specs: list[str]) -> tuple[str, dict[str, float]]:
    """--exit values -> (the criterion that colours the tokens, {name: threshold}); 'none' is refused (it never
    exits, so there is nothing to colour by)."""
    thresholds = {}
    for spec in specs:
        crit = parse_exit(spec)
        if crit.name == "none":
            raise ValueError(f"--exit {spec!r}: inspect traces the adaptive criteria; 'none' never exits")
        thresholds[crit.name] = crit.threshold
    return (next(iter(thresholds)) if thresholds else "kl"), thresholds


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.inspection import inspect_prompt, write_report

    check_init_scale(args.init_scale, "--init-scale")
    colour_by, thresholds = parse_exits(args.exit)
    with Progress() as progress:
        progress.update(f"loading {args.model or 'the bundled checkpoint'}")
        model_dir, model, tokenizer = load_model(args, need_tokenizer=True)
        num_steps = resolve_num_steps(args, model, minimum=1)
        progress.update(f"tracing {num_steps} recurrence steps over the prompt")
        result = inspect_prompt(model, tokenizer, args.prompt, num_steps=num_steps, tokens=args.tokens,
                                thresholds=thresholds, init_scale=args.init_scale, seed=args.seed, top_k=args.top_k,
                                meta={"model": str(model_dir)})
        progress.update(f"writing the figures and index.html into {args.out}")
        paths = write_report(result, args.out, colour_by=colour_by)
    conv = result.convergence
    steps = conv.exit_step[colour_by]
    print(f"{len(result.texts)} tokens, {num_steps} steps; {colour_by} exit step: "
          f"mean {steps.float().mean():.1f}, min {int(steps.min())}, max {int(steps.max())}, "
          f"not converged {int((~conv.exited[colour_by]).sum())}")
    for name, path in paths.items():
        print(f"{name:>12}: {path}")
    return 0
