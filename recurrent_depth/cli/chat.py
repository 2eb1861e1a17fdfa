"""`rdepth chat`: a terminal chat with streaming, showing the recurrence steps each token took.

    rdepth chat --model ckpt/ --num-steps 32 --exit kl:5e-4

The model runs in this process through the same engine as `rdepth serve`. Each reply streams as it is generated;
after it, a line lists the steps of every token (or, with --inline-steps, each token is followed by its count).
Commands: /steps N, /exit NAME[:THRESHOLD], /temp T, /reset, /quit; a bad value is refused at once. Ctrl-C stops
the reply being written (the conversation goes on). A reply is at most --max-tokens long and never longer than the
context the conversation leaves; once the conversation fills the context, messages are refused until /reset.
"""

from __future__ import annotations

import argparse
import queue
import sys
from typing import TextIO

from recurrent_depth.cli.options import add_exit_arg, add_model_args, parse_exit
from recurrent_depth.cli.serve import load_for_serving
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, KV_SHARING_HELP
from recurrent_depth.serving.protocol import Limits

COMMANDS = "/steps N, /exit NAME[:THRESHOLD], /temp T, /reset, /quit"


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="chat with a model in the terminal, streaming, with steps per token",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--max-num-steps", type=int, default=Limits().max_num_steps,
                   help="largest --num-steps or /steps accepted (the KV store keeps a slot per recurrence step)")
    add_exit_arg(p, help="adaptive exit per token, e.g. kl:5e-4 (default: fixed depth; /exit changes it)")
    p.add_argument("--kv-sharing", default=KV_SHARING_AUTO, help=KV_SHARING_HELP)
    p.add_argument("--warm-start", action="store_true", help="start each token from the previous token's state")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE, help="initial-state noise scale (default 0: zeros)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="longest reply (capped by the context the conversation leaves)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling and random initial states")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--inline-steps", action="store_true", help="print each token's steps right after it")
    return p


class Chat:
    """The conversation state and one streamed reply at a time (separate from the terminal for testing).

    Every setting goes through the server's own request validation (`serving.protocol.parse_chat`): bad flags fail
    at start, a bad /command is refused at once and changes nothing."""

    def __init__(self, served, args: argparse.Namespace) -> None:
        from recurrent_depth.serving.engine import BatchEngine
        from recurrent_depth.serving.scheduler import Scheduler

        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.max_num_steps < 0:
            raise ValueError(f"--max-num-steps must be >= 0, got {args.max_num_steps}")
        self.served, self.args = served, args
        self.limits = Limits(max_prompt_tokens=served.block_size, max_tokens=args.max_tokens,
                             max_num_steps=args.max_num_steps, max_n=1)
        self.check()
        self.scheduler = Scheduler(BatchEngine(served.model, served.tokenizer, max_rows=1))
        self.messages: list[dict[str, str]] = []
        self.stopped = False  # whether Ctrl-C stopped the last reply
        self.context_used = 0  # tokens of the last request and its reply (the context is block_size)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def body(self, messages: list[dict[str, str]]) -> dict:
        """The request for `messages`; no max_tokens, so a reply gets min(--max-tokens, the context left)."""
        a = self.args
        crit = parse_exit(a.exit)
        body = {"model": self.served.model_id, "messages": messages, "temperature": a.temperature,
                "top_p": a.top_p, "seed": a.seed, "exit_criterion": crit.name if crit else None,
                "exit_threshold": crit.threshold if crit else None, "kv_sharing": a.kv_sharing,
                "warm_start": a.warm_start, "init_scale": a.init_scale}
        if a.num_steps is not None:
            body["num_steps"] = a.num_steps
        return body

    def parse(self, messages: list[dict[str, str]]):
        """The validated request (raises `APIError` naming the field)."""
        from recurrent_depth.serving.protocol import parse_chat

        s = self.served
        return parse_chat(self.body(messages), s.render, s.tokenize_chat, s.block_size, s.default_num_steps,
                          self.limits, s.stop_token_ids, s.template_stop)

    def check(self) -> None:
        """Validate the settings alone (a one-word conversation): ValueError with the server's message (or the
        --exit parser's)."""
        from recurrent_depth.serving.protocol import APIError

        try:
            self.parse([{"role": "user", "content": "hi"}])
        except APIError as err:
            hint = " (--max-num-steps sets the limit)" if err.param == "num_steps" else ""
            raise ValueError(err.message + hint) from None

    def reply(self, text: str, out: TextIO) -> list[int]:
        """Send a user message, stream the answer to `out`, return the steps of each generated token.

        A message that does not fit raises `APIError` and is not kept. Ctrl-C stops the reply: what was shown
        stays in the conversation, which goes on."""
        from recurrent_depth.serving.engine import Sequence

        parsed = self.parse(self.messages + [{"role": "user", "content": text}])
        self.messages.append({"role": "user", "content": text})
        events: queue.Queue = queue.Queue()
        seq = Sequence(parsed.prompts[0], parsed.depth, parsed.sampling)
        handle = self.scheduler.submit([seq], notify=lambda i, ev: events.put(ev))
        try:
            answer, self.stopped = self._stream(handle, events, out)
        except RuntimeError:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        self.context_used = len(parsed.prompts[0]) + len(seq.tokens)
        return seq.token_steps

    def _stream(self, handle, events: queue.Queue, out: TextIO) -> tuple[str, bool]:
        """Write the reply's events to `out` until it ends: (the text shown, whether Ctrl-C stopped it). Ctrl-C
        cancels the sequence; its remaining events are drained, not shown."""
        shown: list[str] = []
        stopped = False
        while True:
            event = None
            try:
                event = events.get(timeout=0.1)
                if event.finish_reason == "error":
                    raise RuntimeError(event.text)
                if not stopped:
                    self._show(event, out)
                    shown.append(event.text)
            except queue.Empty:
                continue
            except KeyboardInterrupt:  # while waiting or writing; if this was the last event, the reply is over
                stopped = True
                handle.cancel()
            if event is not None and event.finish_reason is not None:
                return "".join(shown), stopped

    def _show(self, event, out: TextIO) -> None:
        out.write(event.text)
        if self.args.inline_steps and event.steps is not None:
            out.write(f"\x1b[2m[{event.steps}]\x1b[0m" if out.isatty() else f"[{event.steps}]")
        out.flush()

    def _set(self, out: TextIO, shown: str, **values) -> None:
        """Change settings if the result is valid; otherwise say why and keep the old ones."""
        old = {name: getattr(self.args, name) for name in values}
        vars(self.args).update(values)
        try:
            self.check()
        except ValueError as err:
            vars(self.args).update(old)
            out.write(f"(rejected: {err}; unchanged)\n")
            return
        out.write(f"({shown})\n")

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "q", "bye"):
            return False
        if cmd == "reset":
            self.reset()
            out.write("(conversation cleared)\n")
        elif cmd == "steps":
            try:
                self._set(out, f"num_steps = {int(arg)}", num_steps=int(arg))
            except ValueError:
                out.write("(usage: /steps N, a whole number of recurrences)\n")
        elif cmd == "exit" and arg:
            self._set(out, f"exit = {arg}", exit=arg)
        elif cmd == "temp":
            try:
                self._set(out, f"temperature = {float(arg)}", temperature=float(arg))
            except ValueError:
                out.write("(usage: /temp 0.7)\n")
        else:
            out.write(f"(commands: {COMMANDS})\n")
        return True


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from recurrent_depth.serving.protocol import APIError

    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    chat = Chat(load_for_serving(args), args)
    chat.scheduler.start()
    interactive = stdin.isatty()
    out.write(f"rdepth chat: {chat.served.model_id}; {COMMANDS}; Ctrl-C stops a reply\n")
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
            out.flush()
            try:
                steps = chat.reply(line, out)
            except APIError as err:
                out.write(_refusal(err, chat.served.block_size))
                continue
            except RuntimeError as err:  # the engine failed this reply; the conversation is kept
                out.write(f"\n(error while generating: {err}; the message was not kept)\n")
                continue
            _summary(chat, steps, out)
    finally:
        chat.scheduler.stop()
    return 0


def _refusal(err, block_size: int) -> str:
    """Why a message was not sent; a full context names the way out (/reset) instead of dropping old turns."""
    if err.code == "context_length_exceeded":
        return (f"(not sent: the conversation no longer fits the model's context of {block_size} tokens; /reset "
                "clears it and starts over)\n")
    return f"(error: {err.message})\n"


def _summary(chat: Chat, steps: list[int], out: TextIO) -> None:
    mean = sum(steps) / len(steps) if steps else 0.0
    if chat.stopped:
        out.write("\n  (reply stopped)")
    out.write(f"\n  [{len(steps)} tokens; steps per token: {' '.join(map(str, steps))}; mean {mean:.1f}]\n")
    if chat.context_used >= chat.served.block_size:
        out.write(f"  (the context of {chat.served.block_size} tokens is now full: /reset to go on)\n")
    out.flush()
