"""`rdepth bundle`: produce the bundled default checkpoint (the recurrent arm of `rdepth reproduce`, trained on the
full run's task and budget), or copy one that a reproduce run already trained (`--from RUN/recurrent`)."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="build the bundled default checkpoint used when no --model is given",
                       description=__doc__)
    p.add_argument("--from", dest="source", default=None,
                   help="a reproduce run's `recurrent` folder (its latest checkpoint is copied) instead of training")
    p.add_argument("--out", default=None, help="destination (default: the package's assets/default-model)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps (default: the full reproduce scale); not recurrences")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.assets import DEFAULT_MODEL
    from recurrent_depth.evaluation import reproduce
    from recurrent_depth.model.checkpoint import atomic_folder
    from recurrent_depth.training.checkpoint import latest_checkpoint

    overrides = {"steps": args.train_steps, "threads": args.threads}
    scale = replace(reproduce.FULL, **{k: v for k, v in overrides.items() if v})
    if args.source:
        arm = Path(args.source)
        command = f"rdepth bundle --from {args.source}"
    else:
        arm = Path(args.out or DEFAULT_MODEL).parent / ".bundle-train" / "recurrent"
        tree = reproduce.train_tree(scale, reproduce.model_fields(scale), {"sampler": "poisson-lognormal-filling"},
                                    reproduce.task_data(scale), scale.steps, reproduce.task_seq_len(scale))
        reproduce.train_arm("recurrent", tree, arm.parent, print)
        command = "rdepth bundle" + (f" --train-steps {args.train_steps}" if args.train_steps else "")
    ckpt = latest_checkpoint(arm)
    train_cfg = arm / "config.json"
    if ckpt is None or not train_cfg.is_file():
        raise FileNotFoundError(f"no checkpoint and config.json under {str(arm)!r} (expected an `rdepth train` "
                                "output folder, such as a reproduce run's `recurrent` folder)")
    task = json.loads(train_cfg.read_text())["data"]["task"]
    if not task.get("name"):
        raise ValueError(f"{train_cfg} did not train on a built-in task; the demo needs one")
    model_cfg = json.loads((ckpt / "config.json").read_text())
    keep = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"}
    with atomic_folder(Path(args.out or DEFAULT_MODEL)) as folder:
        for f in ckpt.iterdir():
            if f.name in keep:
                shutil.copy2(f, folder / f.name)
        info = {"task": task["name"], "difficulty": task.get("difficulty", {}),
                "mean_recurrence": model_cfg["mean_recurrence"], "command": command, "trained_by": str(train_cfg)}
        (folder / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in Path(args.out or DEFAULT_MODEL).iterdir())
    print(f"bundled checkpoint written to {args.out or DEFAULT_MODEL} ({size / 1e6:.1f} MB)")
    return 0
