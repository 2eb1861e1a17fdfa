"""`rdepth demo`: build the `debug` preset and show what test-time depth changes (r = 1, 4, 16)."""

from __future__ import annotations

import argparse

import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.model import RecurrentDepthForCausalLM


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="show accuracy and outputs against test-time depth on the bundled defaults")
    p.add_argument("--steps", default="1,4,16", help="comma-separated recurrence depths to compare")
    p.add_argument("--seed", type=int, default=0, help="seed for the random debug model")
    return p


def run(args: argparse.Namespace) -> int:
    steps = [int(s) for s in args.steps.split(",")]
    torch.manual_seed(args.seed)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(args.seed))
    print(f"debug preset: {model.num_parameters():,} parameters; prompt of {ids.shape[1]} tokens; s0 = 0")
    prev = None
    with torch.no_grad():
        for r in steps:
            out = model(ids, num_steps=r, init_scale=0.0)
            probs = out.logits[0, -1].softmax(-1)
            line = f"r={r:>3}: next-token argmax {int(probs.argmax()):>4}  p={float(probs.max()):.4f}"
            if prev is not None:
                line += f"  |latent change vs previous r| = {float((out.latent_states - prev).norm()):.4f}"
            print(line)
            prev = out.latent_states
    return 0
