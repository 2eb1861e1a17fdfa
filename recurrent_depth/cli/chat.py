"""`rdepth chat`: a terminal chat with streaming, showing the recurrence steps each token took.

    rdepth chat --model ckpt/ --num-steps 32 --exit-criterion kl

The model runs in this process through the same engine as `rdepth serve`. Each reply streams as it is generated;
after it, a line lists the steps of every token (or, with --inline-steps, each token is followed by its count).
Commands: /steps N, /exit NAME[:THRESHOLD], /temp T, /reset, /quit.
"""

from __future__ import annotations

import argparse
import queue
import sys
from typing import TextIO

from recurrent_depth.cli.serve import add_model_args, load_for_serving
from recurrent_depth.inference.exit import EXIT_CRITERIA


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="chat with a model in the terminal, streaming, with steps per token",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--num-steps", type=int, default=None, help="recurrences per token (default: mean_recurrence)")
    p.add_argument("--exit-criterion", default="none", choices=list(EXIT_CRITERIA), help="adaptive exit criterion")
    p.add_argument("--exit-threshold", type=float, default=None, help="threshold (default: the criterion's own)")
    p.add_argument("--kv-sharing", default="full", help="full, latest or an integer k (cyclic slots)")
    p.add_argument("--warm-start", action="store_true", help="start each token from the previous token's state")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling and random initial states")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--inline-steps", action="store_true", help="print each token's steps right after it")
    return p


class Chat:
    """The conversation state and one streamed reply at a time (separate from the terminal for testing)."""

    def __init__(self, served, args: argparse.Namespace) -> None:
        from recurrent_depth.serving.engine import BatchEngine
        from recurrent_depth.serving.protocol import Limits
        from recurrent_depth.serving.scheduler import Scheduler

        self.served, self.args = served, args
        self.scheduler = Scheduler(BatchEngine(served.model, served.tokenizer, max_rows=1))
        self.limits = Limits(max_prompt_tokens=served.block_size, max_tokens=max(1, args.max_tokens),
                             max_num_steps=10**6, max_n=1)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def body(self) -> dict:
        a = self.args
        body = {"model": self.served.model_id, "messages": self.messages, "max_tokens": a.max_tokens,
                "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed, "exit_criterion": a.exit_criterion,
                "exit_threshold": a.exit_threshold, "kv_sharing": a.kv_sharing, "warm_start": a.warm_start}
        if a.num_steps is not None:
            body["num_steps"] = a.num_steps
        return body

    def reply(self, text: str, out: TextIO) -> list[int]:
        """Send a user message, stream the answer to `out`, return the steps of each generated token."""
        from recurrent_depth.serving.engine import Sequence
        from recurrent_depth.serving.protocol import parse_chat

        self.messages.append({"role": "user", "content": text})
        s = self.served
        try:
            parsed = parse_chat(self.body(), s.render, s.tokenize_chat, s.block_size, s.default_steps, self.limits,
                                s.stop_token_ids, s.template_stop)
        except Exception:
            self.messages.pop()
            raise
        events: queue.Queue = queue.Queue()
        seq = Sequence(parsed.prompts[0], parsed.depth, parsed.sampling)
        self.scheduler.submit([seq], notify=lambda i, ev: events.put(ev))
        answer = []
        while True:
            event = events.get()
            if event.finish_reason == "error":
                raise RuntimeError(event.text)
            answer.append(event.text)
            out.write(event.text)
            if self.args.inline_steps and event.steps is not None:
                out.write(f"\x1b[2m[{event.steps}]\x1b[0m" if out.isatty() else f"[{event.steps}]")
            out.flush()
            if event.finish_reason is not None:
                break
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        return seq.token_steps

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line[1:].partition(" ")
        if cmd in ("quit", "q", "bye"):
            return False
        if cmd == "reset":
            self.reset()
            out.write("(conversation cleared)\n")
        elif cmd == "steps" and arg.strip().isdigit():
            self.args.num_steps = int(arg)
            out.write(f"(num_steps = {self.args.num_steps})\n")
        elif cmd == "exit" and arg.strip():
            name, _, thr = arg.strip().partition(":")
            if name not in EXIT_CRITERIA:
                out.write(f"(unknown criterion {name!r}; valid: {', '.join(EXIT_CRITERIA)})\n")
            else:
                self.args.exit_criterion, self.args.exit_threshold = name, float(thr) if thr else None
                out.write(f"(exit criterion = {name}{':' + thr if thr else ''})\n")
        elif cmd == "temp":
            try:
                self.args.temperature = float(arg)
                out.write(f"(temperature = {self.args.temperature})\n")
            except ValueError:
                out.write("(usage: /temp 0.7)\n")
        else:
            out.write("(commands: /steps N, /exit NAME[:THRESHOLD], /temp T, /reset, /quit)\n")
        return True


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from recurrent_depth.serving.protocol import APIError

    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    args.max_batch = 1
    chat = Chat(load_for_serving(args), args)
    chat.scheduler.start()
    interactive = stdin.isatty()
    out.write(f"rdepth chat: {chat.served.model_id}; /quit to leave, /steps N, /exit NAME[:THR], /reset\n")
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not chat.command(line, out):
                    break
                continue
            out.write("model> ")
            try:
                steps = chat.reply(line, out)
            except APIError as err:
                out.write(f"(error: {err.message})\n")
                continue
            mean = sum(steps) / len(steps) if steps else 0.0
            out.write(f"\n  [{len(steps)} tokens; steps per token: {' '.join(map(str, steps))}; mean {mean:.1f}]\n")
            out.flush()
    finally:
        chat.scheduler.stop()
    return 0
