"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health.

    app = create_app(load_served_model("ckpt/"), Limits(), max_batch=8, api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `rdepth serve` does

Requests are validated (`protocol`), turned into `Sequence`s (one per prompt and choice) and handed to the
`Scheduler`, which batches them continuously on its own thread. Non-streaming answers wait for every choice;
streaming answers are server-sent events (`data: {chunk}` ... `data: [DONE]`), one chunk per token, each carrying
the token's `recurrence_steps`. A client that disconnects has its sequences cancelled and their rows freed.
Every error is an OpenAI-style JSON body with a 4xx status; an unexpected failure is a 500 with the same shape and
the server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from recurrent_depth.serving.engine import BatchEngine, Sequence
from recurrent_depth.serving.model import ServedModel
from recurrent_depth.serving.protocol import (
    APIError,
    Limits,
    ParsedRequest,
    new_id,
    now,
    parse_chat,
    parse_completion,
    usage,
)
from recurrent_depth.serving.scheduler import AsyncHandle, QueueFull, Scheduler

log = logging.getLogger(__name__)


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message that quotes a client's string can always be sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return _ASCIIJSONResponse(err.body(), status_code=err.status, headers=headers)


def check_api_key(api_key: str | None) -> None:
    """None means no key; a key must be non-empty with no surrounding whitespace (an empty one would let an empty
    `Authorization: Bearer ` in)."""
    if api_key is not None and (not api_key or api_key.strip() != api_key):
        problem = "is empty" if not api_key.strip() else "has surrounding whitespace"
        raise ValueError(f"the API key {problem}: it must be a non-empty string without surrounding whitespace")


def create_app(served: ServedModel, limits: Limits | None = None, max_batch: int = 8,
               api_key: str | None = None) -> FastAPI:
    """The app around one model. The scheduler thread starts with the app (lifespan) and stops with it."""
    check_api_key(api_key)
    limits = limits or Limits()
    engine = BatchEngine(served.model, served.tokenizer, max_rows=max_batch)
    scheduler = Scheduler(engine, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="recurrent_depth", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.served, app.state.limits = scheduler, served, limits

    # ------------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(APIError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, f"invalid request: {err.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _ASCIIJSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    # -------------------------------------------------------------------------------------------- auth
    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            raise APIError(413, f"request body larger than {limits.max_body_bytes} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"request body larger than {limits.max_body_bytes} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as err:
            raise APIError(400, f"could not parse the JSON body: {str(err)[:200]}", code="invalid_json") from None

    def check_model(name: str) -> None:
        if name != served.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served.model_id!r}",
                           param="model", code="model_not_found")

    # ----------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if scheduler.running else "stopped", "model": served.model_id, **scheduler.load}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        check_key(request)
        check_model(model_id)
        return served.card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        body = await read_json(request)
        parsed = parse_completion(body, served.tokenize, served.vocab_size, served.block_size,
                                  served.default_num_steps, limits, served.stop_token_ids)
        check_model(parsed.model)
        return await _run(request, parsed)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        body = await read_json(request)
        parsed = parse_chat(body, served.render, served.tokenize_chat, served.block_size, served.default_num_steps,
                            limits, served.stop_token_ids, served.template_stop)
        check_model(parsed.model)
        return await _run(request, parsed)

    # ------------------------------------------------------------------------------------------ running
    def submit(parsed: ParsedRequest) -> tuple[AsyncHandle, list[int]]:
        seqs, prompt_of = [], []
        for p_idx, prompt in enumerate(parsed.prompts):
            for _ in range(parsed.n):
                sampling = dataclasses.replace(parsed.sampling, seed=parsed.seeds[len(seqs)])
                seqs.append(Sequence(prompt, parsed.depth, sampling))
                prompt_of.append(p_idx)
        try:
            handle = scheduler.submit(seqs, loop=asyncio.get_running_loop())
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}; retry later", code="server_busy",
                           type="rate_limit_error") from None
        return handle, prompt_of

    async def _run(request: Request, parsed: ParsedRequest) -> Any:
        handle, prompt_of = submit(parsed)
        if parsed.stream:
            return StreamingResponse(_stream(request, parsed, handle), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, parsed, handle)

    async def _watch(request: Request, handle: AsyncHandle) -> None:
        """Cancel the request's sequences when its client disconnects."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return

    async def _collect(request: Request, parsed: ParsedRequest, handle: AsyncHandle) -> Any:
        texts = [""] * len(handle.seqs)
        reasons: list[str | None] = [None] * len(handle.seqs)
        watcher = asyncio.ensure_future(_watch(request, handle))
        try:
            async for i, event in handle.events():
                texts[i] += event.text
                if event.finish_reason is not None:
                    reasons[i] = event.finish_reason
                    if event.finish_reason == "error":
                        raise APIError(500, f"generation failed: {event.text}", type="server_error")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if not handle.done:
                handle.cancel()
        seqs = handle.seqs
        if parsed.kind == "completion":
            obj, choices = "text_completion", [
                {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i],
                 "recurrence_steps": s.token_steps} for i, s in enumerate(seqs)]
        else:
            obj, choices = "chat.completion", [
                {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                 "finish_reason": reasons[i], "recurrence_steps": s.token_steps} for i, s in enumerate(seqs)]
        return {"id": new_id("cmpl" if parsed.kind == "completion" else "chatcmpl"), "object": obj,
                "created": now(), "model": served.model_id, "choices": choices,
                "usage": _usage(parsed, seqs)}

    def _usage(parsed: ParsedRequest, seqs: list[Sequence]) -> dict[str, Any]:
        return usage(sum(len(p) for p in parsed.prompts), sum(len(s.tokens) for s in seqs),
                     sum(s.total_steps for s in seqs))

    async def _stream(request: Request, parsed: ParsedRequest, handle: AsyncHandle) -> AsyncIterator[str]:
        chat = parsed.kind == "chat"
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": rid, "object": obj, "created": created, "model": served.model_id, "choices": choices,
                    **extra}
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:  # the first chunk of each choice carries the role, as OpenAI's does
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(handle.seqs))])
            async for i, event in handle.events():
                if event.finish_reason == "error":
                    err = APIError(500, f"generation failed: {event.text}", type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                if not event.text and event.finish_reason is None and event.steps is None:
                    continue
                steps = [] if event.steps is None else [event.steps]
                piece = ({"delta": {"content": event.text} if event.text else {}} if chat else {"text": event.text})
                yield chunk([{"index": i, **piece, "logprobs": None, "finish_reason": event.finish_reason,
                              "recurrence_steps": steps}])
            if parsed.include_usage:
                yield chunk([], usage=_usage(parsed, handle.seqs))
            yield "data: [DONE]\n\n"
        finally:
            if not handle.done:
                handle.cancel()

    return app
