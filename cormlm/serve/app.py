"""The HTTP side of ``cormlm serve``: OpenAI's routes over the engine (``scheduler.Engine``).

The engine runs in a thread of its own; each request's events cross into the event loop
through ``call_soon_threadsafe`` onto an asyncio queue, so no handler blocks the loop while
the model computes. A client that goes away (a closed stream, or a dropped connection while
it waits for a whole answer) cancels its request, and the engine frees its row.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import traceback
import uuid

from ..errors import CormlmError, InputError
from . import ServeExtraMissing

try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
except ImportError as exc:
    raise ServeExtraMissing(f"cormlm serve needs FastAPI and uvicorn ({exc.name} is missing): "
                            "pip install 'cormlm[serve]'") from None

from ..chat import render_chat
from .metrics import CONTENT_TYPE, prometheus_text
from .protocol import APIError, ChatRequest, CompletionRequest, validation_error
from .scheduler import Engine, Event, QueueFullError, Request

DEFAULT_COMPLETION_TOKENS = 16  # the API's default max_tokens for /v1/completions
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a whole answer is still there


class _Shape:
    """Response bodies and stream chunks of one request, completions or chat."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _body(self, choices: list[dict], stream: bool, usage: dict | None = None) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def answer(self, text: str, event: Event) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": event.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._body([choice], stream=False, usage=usage(event))

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
        else:
            choice["text"] = text or ""
        return self._body([choice], stream=True)

    def usage_chunk(self, event: Event) -> dict:
        return self._body([], stream=True, usage=usage(event))


def usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def event_error(event: Event) -> APIError:
    """A request that ended without its answer: its own fault (400) or the server's (503)."""
    if event.error_code == "kv_memory_exceeded":
        return APIError(event.error, 400, code=event.error_code)
    return APIError(event.error, 503, code=event.error_code, kind="server_error")


async def read_json(http: HTTPRequest) -> dict:
    raw = await http.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    return data


def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="cormlm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    context = engine.model.config.context_length

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(APIError(str(exc.detail), exc.status_code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception) -> JSONResponse:  # a bug: the client gets the shape, the log the trace
        traceback.print_exception(exc, file=sys.stderr)
        error = APIError(f"internal server error ({type(exc).__name__})", 500, kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "cormlm"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.stats()), media_type=CONTENT_TYPE)

    def parse(kind: type, data: dict):
        try:
            body = kind.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model != model_name:
            raise APIError(f"the model '{body.model}' does not exist; this server serves '{model_name}' "
                           "(GET /v1/models)", param="model", code="model_not_found")
        return body

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Response:
        body = parse(CompletionRequest, await read_json(http))
        prompt = body.single_prompt
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        limit = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        return await run(http, body, ids, limit, _Shape(False, model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Response:
        body = parse(ChatRequest, await read_json(http))
        if not tokenizer.chat_template:
            raise APIError(f"the model '{model_name}' defines no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except InputError as exc:
            raise APIError(str(exc), param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes its own BOS
        limit = body.token_limit if body.token_limit is not None else max(context - len(ids), 1)
        return await run(http, body, ids, limit, _Shape(True, model_name))

    async def run(http: HTTPRequest, body, ids: list[int], max_tokens: int, shape: _Shape) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # engine thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = Request(ids, max_tokens, deliver, temperature=body.temperature,
                          top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, stop=body.stop_strings,
                          id=shape.id)
        try:
            engine.submit(request)
        except QueueFullError as exc:
            raise APIError(str(exc), 429, code="rate_limit_exceeded", kind="rate_limit_error") from None
        except InputError as exc:
            raise APIError(str(exc), param="messages" if shape.chat else "prompt",
                           code=getattr(exc, "code", "invalid_value")) from None
        if body.stream:
            usage_too = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(request.id, events, shape, usage_too), media_type="text/event-stream")
        return await collect(http, request.id, events, shape)

    async def collect(http: HTTPRequest, request_id: str, events: asyncio.Queue, shape: _Shape) -> Response:
        parts = []
        loop = asyncio.get_running_loop()
        check_at = loop.time() + DISCONNECT_POLL
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL)
                    parts.append(event.text)
                    if event.final:
                        break
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= check_at:  # by the clock: events may come faster than any timeout
                    check_at = loop.time() + DISCONNECT_POLL
                    if await http.is_disconnected():
                        engine.cancel(request_id)
                        return Response(status_code=499)  # nobody is there to read it
        except asyncio.CancelledError:
            engine.cancel(request_id)
            raise
        if event.error is not None:
            raise event_error(event)
        return JSONResponse(shape.answer("".join(parts), event))

    async def stream(request_id: str, events: asyncio.Queue, shape: _Shape, usage_too: bool):
        finished = False
        try:
            if shape.chat:
                yield sse(shape.chunk("", role=True))
            while not finished:
                event = await events.get()
                finished = event.final
                if event.error is not None:
                    yield sse(event_error(event).body())
                    break
                if event.text or finished:
                    yield sse(shape.chunk(event.text if event.text or not shape.chat else None,
                                          event.finish_reason))
                if finished and usage_too:
                    yield sse(shape.usage_chunk(event))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client closed the stream: free its row
                engine.cancel(request_id)

    return app


def check_port(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CormlmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                              "or --host") from None


def serve(engine: Engine, tokenizer, model_name: str, host: str, port: int, log_level: str = "warning") -> None:
    """Run the server until Ctrl-C or SIGTERM; the engine's thread lives as long."""
    app = create_app(engine, tokenizer, model_name)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
