"""`rdepth generate`: generate text from a checkpoint and show how many recurrences each token took.

    rdepth generate --model PATH --prompt "Once upon" --num-steps 32 --exit kl:5e-4 --stream

Each generated token is shown with its recurrence count: coloured (few steps green, many red) in a terminal, and as
a plain `steps:` line when the output is piped. A checkpoint without tokenizer.json takes `--prompt-ids 1,2,3`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from recurrent_depth.cli.options import add_exit_arg, add_model_args, load_model, parse_exit, resolve_num_steps
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, KV_SHARING_HELP, check_init_scale
from recurrent_depth.progress import Progress

_COLOURS = ["\033[32m", "\033[92m", "\033[33m", "\033[93m", "\033[91m", "\033[31m"]  # few -> many steps
_RESET = "\033[0m"


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="generate from a checkpoint, showing the recurrence steps of every token",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a left-padded batch)")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt (no tokenizer needed)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not put the tokenizer's BOS before each --prompt (training rows start with it)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    add_exit_arg(p, help="adaptive exit per token, e.g. kl:5e-4 (default: fixed depth; with an exit, --num-steps is "
                         "the cap)")
    p.add_argument("--min-steps", type=int, default=0, help="recurrences before the first exit check")
    p.add_argument("--kv-sharing", default=KV_SHARING_AUTO, help=KV_SHARING_HELP)
    p.add_argument("--warm-start", action="store_true", help="start each token from the previous final state")
    p.add_argument("--draft-steps", type=int, default=None, help="self-speculative decoding: draft depth")
    p.add_argument("--lookahead", type=int, default=None, help="self-speculative decoding: drafted tokens per pass")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p times the top probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE, help="initial-state noise scale (default 0: zeros)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (batch of one)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of text (with --stream: one JSON line per token "
                        "first)")
    return p


def _colour(steps: int, num_steps: int) -> str:
    idx = min(len(_COLOURS) - 1, int(len(_COLOURS) * steps / max(num_steps, 1)))
    return _COLOURS[max(idx, 0)]


class _Printer:
    """Streams decoded text, coloured by steps in a terminal, or one JSON line per token (batch of one)."""

    def __init__(self, tokenizer: Any, num_steps: int, colour: bool, as_json: bool) -> None:
        self.tok, self.num_steps, self.colour, self.as_json = tokenizer, num_steps, colour, as_json
        self.prompt_seen, self.ids, self.text, self.steps = False, [], "", None

    def put_steps(self, steps: torch.Tensor) -> None:
        self.steps = steps[0].tolist()  # the recurrences of the tokens that `put` receives next

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        tokens = value[0].tolist()
        for token, steps in zip(tokens, self.steps or [None] * len(tokens)):
            self.ids.append(token)
            text = self.tok.decode(self.ids) if self.tok is not None else " ".join(map(str, self.ids))
            piece, self.text = text[len(self.text):], text
            if self.as_json:
                piece = json.dumps({"token": token, "text": piece, "steps": steps}) + "\n"
            elif self.colour and steps is not None:
                piece = f"{_colour(steps, self.num_steps)}{piece}{_RESET}"
            sys.stdout.write(piece)
            sys.stdout.flush()

    def end(self) -> None:
        if not self.as_json:
            sys.stdout.write("\n")


class _TokenProgress:
    """A streamer that reports tokens generated so far (on stderr, through `Progress`)."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done, self.prompt_seen = progress, total, 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.done += value.shape[1]
        rate = self.done / max(self.progress.elapsed(), 1e-9)
        self.progress.update(f"generated {self.done}/{self.total} tokens per row ({rate:.1f} tokens/s)")

    def end(self) -> None:
        self.progress.done()


def _check_args(args: argparse.Namespace) -> None:
    """Flag errors found before the checkpoint is loaded, each naming its flag."""
    from recurrent_depth.inference.sampling import Sampler

    check_init_scale(args.init_scale, "--init-scale")
    parse_exit(args.exit)
    try:
        Sampler(args.sample, args.temperature, args.top_k, args.top_p, args.min_p)
    except ValueError as err:
        raise ValueError(f"{err} (--sample, --temperature, --top-k, --top-p, --min-p)") from None


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.inference.generate import generate

    _check_args(args)
    with Progress() as progress:
        progress.update(f"loading {args.model or 'the bundled checkpoint'}")
        _, model, tokenizer = load_model(args)
        ids, mask = _encode(args, tokenizer)
        ids, mask = ids.to(model.device), None if mask is None else mask.to(model.device)
        num_steps = resolve_num_steps(args, model)
        if args.stream and ids.shape[0] != 1:
            raise ValueError("--stream shows one prompt; give a single --prompt")
        colour = sys.stdout.isatty() and not args.json
        if args.stream:  # the tokens themselves show progress
            progress.done()
            streamer = _Printer(tokenizer, num_steps, colour, args.json)
        else:
            streamer = _TokenProgress(progress, args.max_new_tokens)
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        out = generate(model, ids, mask, max_new_tokens=args.max_new_tokens, num_steps=num_steps,
                       exit_criterion=parse_exit(args.exit), min_steps=args.min_steps,
                       warm_start=args.warm_start, kv_sharing=args.kv_sharing, draft_steps=args.draft_steps,
                       lookahead=args.lookahead, do_sample=args.sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       generator=torch.Generator(model.device).manual_seed(args.seed), init_scale=args.init_scale,
                       eos_token_id=eos, streamer=streamer,
                       vocab_limit=len(tokenizer) if tokenizer is not None else None)  # as the server does
    T = ids.shape[1]
    for row in range(ids.shape[0]):
        new = out.sequences[row, T:].tolist()
        steps = out.steps[row].tolist()
        if eos is not None and eos in new:
            cut = new.index(eos) + 1
            new, steps = new[:cut], steps[:cut]
        _report(args, tokenizer, new, steps, num_steps, colour, streamed=args.stream)
    if args.exit or args.json:
        used = out.steps[out.steps > 0].float()
        mean = float(used.mean()) if used.numel() else 0.0
        print(f"mean steps per token: {mean:.2f} of {num_steps}; peak KV cache: {out.kv_cache_bytes / 2**20:.2f} MiB",
              file=sys.stderr)
    return 0


def _encode(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if args.prompt_ids:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return torch.tensor([ids]), None
    if not args.prompt:
        raise ValueError("give --prompt TEXT (or --prompt-ids 1,2,3)")
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json in {args.model!r}: use --prompt-ids")
    from recurrent_depth.data.tokenizer import encode_prompt, left_pad

    rows = [encode_prompt(tokenizer, text, add_bos=not args.no_bos) for text in args.prompt]
    if min(len(r) for r in rows) == 0:
        raise ValueError("the prompt encodes to no tokens")
    return left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _report(args: argparse.Namespace, tokenizer: Any, new: list[int], steps: list[int], num_steps: int,
            colour: bool, streamed: bool) -> None:
    text = tokenizer.decode(new) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"tokens": new, "text": text, "steps": steps}))
        return
    if streamed:
        if not colour:  # piped: the steps (the streamed text went before)
            print("steps:", " ".join(map(str, steps)))
        return
    if colour:
        pieces = [tokenizer.decode([t]) if tokenizer is not None else f"{t} " for t in new]
        print("".join(f"{_colour(s, num_steps)}{p}{_RESET}" for p, s in zip(pieces, steps)))
        print(f"(colour: green = few of {num_steps} steps, red = many)")
    else:
        print(text if text is not None else " ".join(map(str, new)))
        print("steps:", " ".join(map(str, steps)))
