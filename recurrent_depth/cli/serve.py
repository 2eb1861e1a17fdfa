"""`rdepth serve`: an OpenAI-compatible HTTP server with per-request depth and adaptive exit.

    rdepth serve --model ckpt/ [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 8] [--num-steps 32]

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "ckpt", "prompt": "2+2=", "max_tokens": 8, "num_steps": 32, "exit_criterion": "kl"}'

Endpoints and fields: see `recurrent_depth.serving` (README section "Serving").
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from recurrent_depth.cli.options import add_model_args, model_path, resolve_runtime
from recurrent_depth.serving.protocol import Limits


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="serve a model behind an OpenAI-compatible API (per-request depth and exit)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)  # --num-steps: the depth of requests that give no num_steps
    p.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (continuous batching); 1 = one at a time")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=os.environ.get("RDEPTH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $RDEPTH_API_KEY; none = open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    d = Limits()
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest prompt accepted")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens accepted")
    p.add_argument("--max-num-steps", type=int, default=d.max_num_steps, help="largest num_steps (recurrences)")
    p.add_argument("--max-n", type=int, default=d.max_n, help="most choices (prompts x n) per request")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="sequences allowed to wait for a batch row; beyond it requests get 429")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def load_for_serving(args: argparse.Namespace):
    """The ServedModel named by --model / --device / --dtype, answering at --num-steps when a request names none."""
    from recurrent_depth.serving.model import load_served_model

    if getattr(args, "max_batch", 1) < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.num_steps is not None and args.num_steps < 0:
        raise ValueError(f"--num-steps must be >= 0, got {args.num_steps}")
    device, dtype = resolve_runtime(args)
    served = load_served_model(model_path(args), device, dtype, getattr(args, "served_model_name", None))
    served.num_steps = args.num_steps
    return served


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.serving.app import check_api_key, create_app
    from recurrent_depth.serving.server import serve

    for name in ("max_prompt_tokens", "max_tokens", "max_num_steps", "max_n", "max_body_bytes", "max_queue"):
        if getattr(args, name) < (0 if name == "max_num_steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("the API key is empty (--api-key '' or RDEPTH_API_KEY set to ''): give a key, or unset "
                         "RDEPTH_API_KEY to serve without one")
    if args.num_steps is not None and args.num_steps > args.max_num_steps:
        raise ValueError(f"--num-steps {args.num_steps} is above --max-num-steps {args.max_num_steps}")
    check_api_key(args.api_key)
    served = load_for_serving(args)
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_num_steps, args.max_n, args.max_body_bytes,
                    args.max_queue)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"rdepth serve: warning: binding {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(served, limits, max_batch=args.max_batch, api_key=args.api_key)
    print(f"rdepth serve: {served.model_id} ({served.model.num_parameters():,} parameters, mean recurrence "
          f"{served.default_num_steps}) on http://{args.host}:{args.port}/v1  max batch {args.max_batch}",
          file=sys.stderr)
    serve(app, args.host, args.port, args.log_level)
    return 0
