"""OpenAI-compatible request parsing and validation, and the response bodies.

Every check a request can fail raises `APIError` with an HTTP status (400 invalid value, 401 key, 404 unknown
model, 413 body too large, 429 queue full) and an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` that names the field. Nothing here touches the model.

Standard fields follow the OpenAI API: `max_tokens` (completions default 16; chat default: the rest of the context,
capped by `--max-tokens`), `temperature` in [0, 2] (0 = greedy), `top_p` in [0, 1], `stop` (a string or up to 4),
`seed`, `n`, `stream`, `stream_options.include_usage`. Fields the server cannot honour (`logprobs`, `echo`,
penalties, `logit_bias`, tools, ...) are accepted only at their neutral value, and anything unknown is rejected.

Recurrent-depth fields (pass them in `extra_body` with the openai client):
    num_steps       recurrences per token (default: the model's mean_recurrence), 0..--max-num-steps
    exit_criterion  none | kl | minp-kl | entropy-diff | latent-diff | cosine | argmax-stability
    exit_threshold  the criterion's threshold (default: the criterion's own; needs exit_criterion)
    warm_start      false | true ("latent": start from the previous token's ln_f(s)) | "raw"
    kv_sharing      "auto" (default: "latest" with an exit criterion, else "full") | "full" | "latest" | k (k
                    recurrence slots per core layer, reused cyclically)
    init_scale      std scale of the random initial state, 0..4 (default 0: zero state, deterministic)
"""

from __future__ import annotations

import math
import reprlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from recurrent_depth.inference.defaults import INIT_SCALE, resolve_kv_sharing
from recurrent_depth.inference.exit import EXIT_CRITERIA
from recurrent_depth.inference.params import DepthParams, SamplingParams

DEPTH_FIELDS = ("num_steps", "exit_criterion", "exit_threshold", "warm_start", "kv_sharing", "init_scale")
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", *DEPTH_FIELDS}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store"}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_SEED = 2**64


class APIError(Exception):
    """An error answered to the client: HTTP status plus an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts (set from `rdepth serve` flags)."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_num_steps: int = 128
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_queue: int = 256


@dataclass
class ParsedRequest:
    """A validated request: token prompts, choices per prompt, sampling and depth."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[list[int]]
    n: int
    stream: bool
    include_usage: bool
    sampling: SamplingParams
    depth: DepthParams
    seeds: list[int | None] = field(default_factory=list)  # one per sequence (prompt-major, then choice)


# ------------------------------------------------------------------------------------------------ field readers
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """A short repr of a client's value for an error message (never the whole of a huge or deep value)."""
    return _REPR.repr(value)


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise _bad(name, f"must be a finite number, got {_show(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"must lie in [{lo:g}, {hi:g}], got {_show(v)}")
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise _bad(name, f"must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"must lie in [{lo}, {hi}], got {v}")
    return v


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {_show(v)}")
    return v


def _neutral(body: dict, name: str, neutral: tuple) -> None:
    """Fields the server does not implement: accepted only at their neutral values."""
    v = body.get(name)
    if v is not None and not any(v == n and type(v) is type(n) for n in neutral):
        raise _bad(name, f"is not supported by this server (only {' or '.join(repr(n) for n in neutral)})",
                   code="unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", "must be a string or a list of strings")
    if len(items) > 4:
        raise _bad("stop", f"at most 4 stop sequences, got {len(items)}")
    if any(not s or len(s) > 1024 for s in items):
        raise _bad("stop", "stop sequences must be non-empty and at most 1024 characters")
    return tuple(items)


def parse_depth(body: dict, default_num_steps: int, limits: Limits) -> DepthParams:
    """The recurrent-depth fields (module docstring) -> DepthParams: the server's own limits checked here, every value
    then validated by `DepthParams` itself (one place for the library, the CLI and the server)."""
    num_steps = _integer(body, "num_steps", min(default_num_steps, limits.max_num_steps), 0, limits.max_num_steps)
    crit = body.get("exit_criterion")
    if crit is not None and (not isinstance(crit, str) or crit not in EXIT_CRITERIA):
        raise _bad("exit_criterion", f"unknown exit criterion {_show(crit)}; valid: {', '.join(EXIT_CRITERIA)}")
    threshold = _number(body, "exit_threshold", None, 0.0, 1e6)
    if threshold is not None and crit is None:
        raise _bad("exit_threshold", "was given without an exit_criterion")
    sharing = body.get("kv_sharing")
    if isinstance(sharing, bool) or not isinstance(sharing, str | int | None) or (isinstance(sharing, int)
                                                                                   and not 1 <= sharing <= 4096):
        raise _bad("kv_sharing", f"must be 'auto', 'full', 'latest' or an integer k in [1, 4096], got "
                   f"{_show(sharing)}")
    if isinstance(sharing, str) and sharing.isdigit() and len(sharing) >= 6:
        sharing = -1
    sharing = resolve_kv_sharing(sharing, crit)
    init_scale = _number(body, "init_scale", INIT_SCALE, 0.0, 4.0)
    warm = body.get("warm_start")
    try:
        return DepthParams(num_steps, crit or "none", threshold, False if warm is None else warm, sharing, init_scale)
    except (ValueError, TypeError) as err:
        field_name = next((f for f in DEPTH_FIELDS if str(err).startswith(f)), "exit_threshold")
        raise _bad(field_name, _show_error(str(err), field_name)) from None


def _show_error(message: str, field_name: str) -> str:
    """A library error for the client: without a leading field name (`_bad` adds it) and cut to a readable size."""
    message = message.removeprefix(field_name).removeprefix(":").lstrip()
    return message if len(message) <= 300 else message[:300] + "..."


def _invalid_text(value: Any, where: str) -> str | None:
    """The path of the first string (key or value) in a parsed JSON body that is not valid Unicode text (a lone
    UTF-16 surrogate such as "\\ud800", which JSON escapes can carry), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str):
            key_path = _invalid_text(key, f"{where} key {_show(key)}")
            if key_path is not None:
                return key_path
        path = _invalid_text(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if path is not None:
            return path
    return None


def check_text(body: Any) -> None:
    """Reject a body holding a string that is not valid Unicode (400 naming the field), before anything uses it."""
    path = _invalid_text(body, "body")
    if path is not None:
        param = path.removeprefix("body.") if path.startswith("body.") else path
        raise _bad(param, "is not valid Unicode text (it holds a lone UTF-16 surrogate, e.g. \\ud800)",
                   code="invalid_text")


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        names = ", ".join(_show(name) for name in unknown[:5])
        raise _bad(unknown[0][:60], f"unrecognized request argument supplied: {names}")


def _common(body: dict, limits: Limits) -> tuple[str, int, bool, bool, float, float, tuple[str, ...], int | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required (a string naming the served model; see GET /v1/models)")
    n = _integer(body, "n", 1, 1, limits.max_n)
    stream = _boolean(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise _bad("stream_options", "must be an object with the one key include_usage")
        include_usage = _boolean(opts, "include_usage", False)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        temperature = 0.0  # only the most likely token is left
    seed = _integer(body, "seed", None, -(2**63), MAX_SEED - 1)
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, -2.0, 2.0)
        _neutral(body, name, (0, 0.0))
    _neutral(body, "logit_bias", ({},))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "must be a string")
    return model, n, stream, include_usage, temperature, top_p, _stop(body), seed


def _max_tokens(value: int | None, prompt_len: int, block_size: int, limits: Limits, default: int | None,
                name: str) -> int:
    room = block_size - prompt_len
    if value is None:
        value = min(limits.max_tokens, room) if default is None else min(default, room)
        if value < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the context length ({block_size})",
                           param="messages" if default is None else "prompt", code="context_length_exceeded")
        return value
    if value > room:
        raise APIError(400, f"this model's context length is {block_size} tokens; the prompt has {prompt_len} and "
                       f"{name} asks for {value}", param=name, code="context_length_exceeded")
    return value


def _check_prompt_len(prompt: list[int], limits: Limits, param: str) -> None:
    if len(prompt) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", param=param, code="context_length_exceeded")


def _seeds(seed: int | None, count: int) -> list[int | None]:
    return [None if seed is None else (seed + i) % MAX_SEED for i in range(count)]


def parse_completion(body: Any, tokenize, vocab_size: int, block_size: int, default_num_steps: int,
                     limits: Limits, stop_token_ids: tuple[int, ...]) -> ParsedRequest:
    """Validate a /v1/completions body. `tokenize(text) -> list[int]`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_text(body)
    _check_fields(body, COMPLETION_FIELDS)
    model, n, stream, include_usage, temperature, top_p, stop, seed = _common(body, limits)
    for name, neutral in (("echo", (False,)), ("suffix", ("",)), ("logprobs", (0,))):
        _neutral(body, name, neutral)
    best_of = _integer(body, "best_of", n, 1, limits.max_n)
    if best_of != n:
        raise _bad("best_of", "is not supported by this server (only best_of == n)", code="unsupported_parameter")
    prompts = _prompts(body.get("prompt"), tokenize, vocab_size)
    if len(prompts) * n > limits.max_n:
        raise _bad("n", f"{len(prompts)} prompts x n={n} choices exceeds this server's limit of {limits.max_n}")
    value = _integer(body, "max_tokens", None, 1, limits.max_tokens)
    max_tokens = min(_max_tokens(value, len(p), block_size, limits, 16, "max_tokens") for p in prompts)
    for p in prompts:
        _check_prompt_len(p, limits, "prompt")
    sampling = SamplingParams(max_tokens, temperature, top_p, seed, stop, stop_token_ids)
    depth = parse_depth(body, default_num_steps, limits)
    return ParsedRequest("completion", model, prompts, n, stream, include_usage, sampling, depth,
                         _seeds(seed, len(prompts) * n))


def _prompts(prompt: Any, tokenize, vocab_size: int) -> list[list[int]]:
    """str | [str] | [int] | [[int]] -> token lists (each non-empty, ids in the vocabulary)."""
    if prompt is None:
        raise _bad("prompt", "is required")
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise _bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of lists")
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise _bad("prompt", "is empty (no text)")
            ids = tokenize(item)
        elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            ids = item
            if any(not 0 <= x < vocab_size for x in ids):
                raise _bad("prompt", f"token ids must lie in [0, {vocab_size})")
        else:
            raise _bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of lists")
        if not ids:
            raise _bad("prompt", "is empty (no tokens)")
        out.append(list(ids))
    return out


def parse_chat(body: Any, render, tokenize, block_size: int, default_num_steps: int, limits: Limits,
               stop_token_ids: tuple[int, ...], extra_stop: tuple[str, ...] = ()) -> ParsedRequest:
    """Validate a /v1/chat/completions body. `render(messages) -> str` applies the chat template."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_text(body)
    _check_fields(body, CHAT_FIELDS)
    model, n, stream, include_usage, temperature, top_p, stop, seed = _common(body, limits)
    _neutral(body, "logprobs", (False,))
    _neutral(body, "top_logprobs", (0,))
    _neutral(body, "tools", ([],))
    _neutral(body, "functions", ([],))
    _neutral(body, "tool_choice", ("none",))
    _neutral(body, "function_call", ("none",))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", "only {'type': 'text'} is supported", code="unsupported_parameter")
    for name in ("parallel_tool_calls", "store"):
        _boolean(body, name, False)
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise _bad("metadata", "must be an object")
    messages = _messages(body.get("messages"))
    try:
        text = render(messages)
    except APIError:
        raise
    except Exception as err:  # a template that rejects the conversation (jinja raise_exception, ...)
        raise _bad("messages", f"the chat template rejected the messages: {str(err)[:300]}") from None
    prompt = tokenize(text)
    if not prompt:
        raise _bad("messages", "the rendered conversation is empty (no tokens)")
    _check_prompt_len(prompt, limits, "messages")
    if n > limits.max_n:
        raise _bad("n", f"must be at most {limits.max_n}")
    value = _integer(body, "max_completion_tokens", None, 1, limits.max_tokens)
    name = "max_completion_tokens"
    if value is None:
        value, name = _integer(body, "max_tokens", None, 1, limits.max_tokens), "max_tokens"
    max_tokens = _max_tokens(value, len(prompt), block_size, limits, None, name)
    sampling = SamplingParams(max_tokens, temperature, top_p, seed, stop + extra_stop, stop_token_ids)
    depth = parse_depth(body, default_num_steps, limits)
    return ParsedRequest("chat", model, [prompt], n, stream, include_usage, sampling, depth, _seeds(seed, n))


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}")
        if set(m) - {"role", "content", "name"}:
            raise _bad(where, f"unsupported keys {sorted(set(m) - {'role', 'content', 'name'})}")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise _bad(f"{where}.name", "must be a string")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content", "only text parts ({'type': 'text', 'text': ...}) are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


# --------------------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, steps: int) -> dict[str, Any]:
    """OpenAI usage plus `recurrence_steps`: core applications spent on the generated tokens (the first token's
    count is the prefill's depth), and their mean per token."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "recurrence_steps": steps,
            "mean_recurrence_steps": steps / completion_tokens if completion_tokens else 0.0}
