"""`rdepth train`: train a recurrent-depth model from a YAML config (see configs/ and recurrent_depth.training).

    rdepth train --config configs/debug.yaml --out runs/debug
    rdepth train --config configs/debug.yaml --out runs/debug --set train.steps=400 --set optim.lr=3e-3
    rdepth train --config configs/debug.yaml --out runs/debug --resume
    rdepth train --config configs/debug.yaml --out runs/debug --overwrite     # delete the earlier run, start again
    torchrun --nproc_per_node=2 -m recurrent_depth train --config configs/debug.yaml --set runtime.parallel=fsdp
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="train with randomized recurrence depth (configs/*.yaml; torchrun for DDP/FSDP2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML training config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.steps=200 or model.n_embd=64 (repeatable)")
    p.add_argument("--out", default="runs/train",
                   help="output folder: checkpoints/, metrics.jsonl, config.json. A folder that already holds a "
                        "run is refused unless --resume or --overwrite")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from the newest complete checkpoint in --out (a corrupt newest one is skipped, "
                           "saying so). A new or empty --out starts at step 0, saying so; an --out holding a run "
                           "but no checkpoint is an error")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run already in --out (metrics.jsonl, config.json, checkpoints/, "
                           "tensorboard/; other files stay) and start a new one")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.training.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails here, naming the key, before anything is built
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from recurrent_depth.training.loop import train

    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if result.losses and result.is_main:
        summary = {"steps": result.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None, **result.final_eval}
        print(json.dumps(summary))
    return 0
