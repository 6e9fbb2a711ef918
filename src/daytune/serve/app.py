"""FastAPI app around a ServeModel and its Scheduler. `daytune serve` runs it with uvicorn on 127.0.0.1 by default.

Errors: invalid values -> 422 naming the field; a body over the size limit -> 413; a missing or wrong bearer token
-> 401; a full queue or a stopping server -> 503 with Retry-After; a request past its time limit -> 504."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from daytune.serve.model import RequestError, ServeModel
from daytune.serve.options import ServeOptions
from daytune.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from daytune.serve.schemas import (
    DecodeRequest,
    DecodeResponse,
    HealthResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)

OPEN_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the bearer token (when set) and the request body size limit, before any parsing."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _send_json(
                    send,
                    401,
                    {"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                    [(b"www-authenticate", b"Bearer")],
                )
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"detail": "content-length header is not a number"})
        if length > self.max_body:
            return await _send_json(
                send,
                413,
                {"detail": f"request body of {length} bytes exceeds the limit of {self.max_body} bytes"},
            )
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge(f"request body exceeds the limit of {self.max_body} bytes")
            return message

        return await self.app(scope, counted, send)


async def _send_json(send, status: int, body: dict, headers=()):
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _error(status: int, field: str | None, msg: str, headers: dict | None = None) -> JSONResponse:
    detail = [{"loc": ["body", field], "msg": msg, "type": "value_error"}] if field else msg
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def create_app(server: ServeModel, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app. Its route functions are defined here, closing over the model, the scheduler and the
    options (FastAPI's own idiom for per-app state): that is why this one function runs to about 100 lines."""
    options = options or ServeOptions()
    scheduler = Scheduler(
        server.model,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        max_prefill_tokens=options.max_prefill_tokens,
        pad_id=server.pad_id,
    )

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.close, options.shutdown_grace)

    app = FastAPI(
        title="daytune server",
        version="1",
        description="The NeurIPS LLM Efficiency Challenge API, as HELM's HTTPModelClient speaks it.",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error(422, exc.field, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        return _error(503, None, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request: Request, exc: ShuttingDown):
        return _error(503, None, str(exc), {"Retry-After": "30"})

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(413, None, str(exc))

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(
            status="stopping" if scheduler.stopping else "ok",
            max_new_tokens=options.max_new_tokens,
            queue=scheduler.stats(),
            **server.info(),
        )

    @app.post("/process", response_model=ProcessResponse)
    async def process(req: ProcessRequest) -> ProcessResponse:
        t0 = time.perf_counter()
        deadline = time.monotonic() + options.request_timeout
        seqs, ctx = await run_in_threadpool(server.sequences, req, options.max_new_tokens, deadline)
        if req.max_new_tokens > 0 or any(s.score_prompt is not None for s in seqs):
            scheduler.submit(seqs)
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(asyncio.wrap_future(s.future) for s in seqs)), options.request_timeout
                )
            except TimeoutError:
                for s in seqs:
                    s.cancelled = True
                return _error(
                    504,
                    None,
                    f"the request took longer than this server's limit of {options.request_timeout:g} s",
                )
        completions = await run_in_threadpool(server.complete, req, seqs, ctx)
        first = completions[0]
        return ProcessResponse(
            text=first.text,
            tokens=first.tokens,
            logprob=first.logprob,
            request_time=time.perf_counter() - t0,
            completions=completions,
        )

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        t0 = time.perf_counter()
        tokens = await run_in_threadpool(server.tokenize, req.text, req.truncation, req.max_length)
        return TokenizeResponse(tokens=tokens, request_time=time.perf_counter() - t0)

    @app.post("/decode", response_model=DecodeResponse)
    async def decode(req: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        text = await run_in_threadpool(server.decode, req.tokens)
        return DecodeResponse(text=text, request_time=time.perf_counter() - t0)

    app.add_middleware(Guard, token=options.token, max_body=options.max_body_bytes)
    return app
