"""The HTTP routes of the OpenAI-compatible server (Starlette).

    GET  /                      the chat page (static, no build step)
    GET  /health                liveness and load
    GET  /v1/models             the one model served (and /v1/models/{id})
    POST /v1/chat/completions   chat, with the model's own template; SSE when "stream": true
    POST /v1/completions        raw text completion

Requests go to the `Scheduler` (continuous batching on one engine thread); events come back
through an asyncio queue. A client that disconnects cancels its request, which frees its batch
slot at the next step. Every error is OpenAI's error object with the right status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.generate import _encode
from ..errors import FoundryError
from . import protocol
from .protocol import APIError
from .scheduler import QueueFull, Scheduler
from .sequence import Event, GenerationRequest
from .templates import TemplateLimitError, TemplateRenderer

STATIC = Path(__file__).parent / "static"
KEEP_ALIVE_SECONDS = 1.0
log = logging.getLogger("foundry_mlx.server")


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    retry_after_seconds: int = 1


@dataclass
class ServerState:
    config: ServerConfig
    model: Any
    tokenizer: Any
    scheduler: Scheduler
    renderer: TemplateRenderer

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings


def create_app(state: ServerState) -> Starlette:
    routes = [
        Route("/", _page(state), methods=["GET"]),
        Route("/health", _health(state), methods=["GET"]),
        Route("/v1/models", _models(state), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _models(state), methods=["GET"]),
        Route("/v1/chat/completions", _completions(state, chat=True), methods=["POST"]),
        Route("/v1/completions", _completions(state, chat=False), methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _api_error(_request: Request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(_request: Request, error: HTTPException) -> Response:
    message = {404: "No such route; the API is under /v1 (see GET /v1/models).",
               405: "This route does not take that method; see the API's routes in the README."}
    text = message.get(error.status_code, f"{error.detail}; check the request.")
    return JSONResponse(APIError(error.status_code, text).body(), status_code=error.status_code)


async def _server_error(_request: Request, error: Exception) -> Response:
    log.exception("request failed", exc_info=error)
    body = APIError(500, "The server failed on this request; see its log.", kind="server_error").body()
    return JSONResponse(body, status_code=500)


def _page(state: ServerState):
    async def page(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return page


def _health(state: ServerState):
    async def health(_request: Request) -> Response:
        scheduler = state.scheduler
        steps = {"decode_steps": scheduler.steps, "batched_steps": scheduler.batched_steps,
                 "largest_batch": scheduler.max_rows_seen, "batched": scheduler.batched,
                 "fused_batch": scheduler.fused is not None,
                 "engine_seconds": {kind: round(value, 3) for kind, value in scheduler.seconds.items()}}
        return JSONResponse({"status": "ok", "model": state.config.model_id, **scheduler.load, **steps})

    return health


def _models(state: ServerState):
    async def models(request: Request) -> Response:
        _authorize(state, request)
        entry = {"id": state.config.model_id, "object": "model", "created": 0, "owned_by": "foundry-mlx",
                 "context_length": state.context}
        asked = request.path_params.get("model_id")
        if asked is None:
            return JSONResponse({"object": "list", "data": [entry]})
        if asked != state.config.model_id:
            raise APIError(404, f"The model {asked!r} is not served here; use {state.config.model_id!r}.", "model",
                           "model_not_found")
        return JSONResponse(entry)

    return models


def _authorize(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), key.encode()):
        raise APIError(401, "Missing or wrong API key; send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", kind="authentication_error")


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"The request body is larger than {limit} bytes; send a smaller request.", code="body_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "The Content-Length header is not a number; send a valid request.")
        if int(declared) > limit:
            raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "The request body is not valid JSON; send a JSON object.", code="invalid_json") from None


def _completions(state: ServerState, chat: bool):
    async def handle(request: Request) -> Response:
        _authorize(state, request)
        payload = await _read_json(request, state.config.max_body_bytes)
        body = protocol.parse(protocol.ChatCompletionRequest if chat else protocol.CompletionRequest, payload)
        body.refuse_unsupported()
        if body.model != state.config.model_id:
            raise APIError(404, f"The model {body.model!r} is not served here; use {state.config.model_id!r} (GET /v1/models).",
                           "model", "model_not_found")
        ids = await _prompt_ids(state, body, chat)
        generation = GenerationRequest(ids, _token_limit(state, body, len(ids)), _sampling(body), body.stops(),
                                       body.ignore_eos)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            ticket = state.scheduler.submit(generation, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except QueueFull:
            raise APIError(503, "The server is at capacity (every batch slot and queue place is taken); retry shortly.",
                           code="server_busy", kind="server_error",
                           headers={"Retry-After": str(state.config.retry_after_seconds)}) from None
        name = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            stream = _stream_chat if chat else _stream_completion
            return StreamingResponse(stream(queue, ticket, name, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, queue, ticket, name, body, chat)

    return handle


def _sampling(body) -> Any:
    try:
        params = body.sampling()
        params.validate()
        return params
    except FoundryError as error:
        raise APIError(400, str(error)) from None


async def _prompt_ids(state: ServerState, body, chat: bool) -> list[int]:
    tokenizer = state.tokenizer
    try:
        if chat:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
            text = await asyncio.to_thread(state.renderer.render, messages)
            ids = await asyncio.to_thread(tokenizer.encode, text, False)
        else:
            prompt = body.prompt_value()
            if isinstance(prompt, list) and any(not 0 <= i < tokenizer.vocab_size for i in prompt):
                raise APIError(400, f"'prompt' has token ids outside the vocabulary (0..{tokenizer.vocab_size - 1}); fix them.", "prompt")
            ids = prompt if isinstance(prompt, list) else await asyncio.to_thread(_encode, tokenizer, prompt)
    except TemplateLimitError as error:
        raise APIError(400, str(error), "messages", "template_limit") from None
    except FoundryError as error:
        raise APIError(400, str(error), "messages" if chat else "prompt") from None
    if not ids:
        raise APIError(400, "The prompt is empty after tokenization; send some text.", "prompt")
    if len(ids) >= state.context:
        raise APIError(400, f"The prompt is {len(ids)} tokens, which leaves no room in the model's context of "
                       f"{state.context}; shorten it.", "messages" if chat else "prompt", "context_length_exceeded")
    return ids


def _token_limit(state: ServerState, body, prompt_tokens: int) -> int:
    room = state.context - prompt_tokens
    limit = body.token_limit()
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    if limit is None:
        return min(state.config.default_max_tokens, room)
    if limit < 1:
        raise APIError(400, f"'{field}' must be at least 1, got {limit}; ask for one token or more.", field)
    if limit > room:
        raise APIError(400, f"The prompt ({prompt_tokens} tokens) plus '{field}' ({limit}) is more than the model's "
                       f"context of {state.context}; lower '{field}' to {room} or less.", field, "context_length_exceeded")
    return limit


async def _next_event(queue: asyncio.Queue, timeout: float) -> Event | None:
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        return None


async def _collect(request: Request, queue, ticket, name: str, body, chat: bool) -> Response:
    pieces, event = [], None
    checked = time.monotonic()
    try:
        while event is None or event.finish_reason is None:
            event = await _next_event(queue, KEEP_ALIVE_SECONDS)
            if event is None or time.monotonic() - checked > KEEP_ALIVE_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():  # the client gave up: stop generating for it
                    return Response(status_code=499)
            if event is not None:
                pieces.append(event.text)
    finally:
        if event is None or event.finish_reason is None:
            ticket.cancel()
    if event.finish_reason == "error":
        raise APIError(500, event.error, kind="server_error")
    usage = _usage(event)
    text = "".join(pieces)
    if chat:
        return JSONResponse(protocol.chat_response(name, body.model, text, event.finish_reason, usage))
    return JSONResponse(protocol.completion_response(name, body.model, text, event.finish_reason, usage))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(queue):
    """The request's events, and None (an SSE keep-alive comment) each second it waits, so a write
    to a client that went away fails soon and cancels the request."""
    while True:
        event = await _next_event(queue, KEEP_ALIVE_SECONDS)
        yield event
        if event is not None and event.finish_reason is not None:
            return


async def _stream(queue, ticket, chunks, first=None):
    """Server-sent events of one request: `first` (if any), then each event's `chunks(event)`, SSE
    keep-alives while it waits, an error object if the engine failed, and `[DONE]`."""
    try:
        if first is not None:
            yield _sse(first)
        async for event in _events(queue):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event.finish_reason == "error":
                yield _sse(APIError(500, event.error, kind="server_error").body())
                break
            for chunk in chunks(event):
                yield _sse(chunk)
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # a no-op once finished; else the client went away: free the slot


def _usage(event) -> dict:
    return protocol.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)


def _stream_chat(queue, ticket, name: str, body):
    def chunks(event):
        if event.text:
            yield protocol.chat_chunk(name, body.model, {"content": event.text}, None)
        if event.finish_reason is not None:
            yield protocol.chat_chunk(name, body.model, {}, event.finish_reason)
            if body.include_usage():
                yield protocol.chat_chunk(name, body.model, None, None, _usage(event))

    return _stream(queue, ticket, chunks, protocol.chat_chunk(name, body.model, {"role": "assistant", "content": ""}, None))


def _stream_completion(queue, ticket, name: str, body):
    def chunks(event):
        if event.text or event.finish_reason is not None:
            yield protocol.completion_response(name, body.model, event.text, event.finish_reason, None)
        if event.finish_reason is not None and body.include_usage():
            yield protocol.completion_response(name, body.model, None, None, _usage(event))

    return _stream(queue, ticket, chunks)
