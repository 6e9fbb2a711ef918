"""FastAPI app around a ServeModel and its Scheduler. `daytune serve` runs it with uvicorn (`Server`) on 127.0.0.1 by
default.

Errors: invalid values -> 422 naming the field; a body that is not UTF-8 JSON -> 400; a body over the size limit
(declared or chunked) -> 413; a missing or wrong bearer token -> 401; a full queue or a stopping server -> 503 with
Retry-After; a request past its time limit -> 504. A client that hangs up has its sequences dropped at the next
step. On a stop signal, requests get `shutdown_grace` seconds; those still running then answer 503 and the worker
ends between two steps before the process exits."""

import asyncio
import errno
import hmac
import json
import socket
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from daytune.errors import DaytuneError
from daytune.serve.model import RequestError, ServeModel
from daytune.serve.options import ServeOptions
from daytune.serve.scheduler import QueueFull, ShuttingDown
from daytune.serve.schemas import (
    DecodeResponse,
    ErrorResponse,
    HealthResponse,
    InvalidResponse,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
    server_requests,
)

OPEN_PATHS = {"/health"}  # with a token, every other path (the schema and the docs too) needs it
RESPONSE_MARGIN = 5.0  # seconds past the shutdown grace for unfinished requests to send their 503

ERRORS = {
    400: {"model": ErrorResponse, "description": "the body is not UTF-8 encoded JSON"},
    413: {"model": ErrorResponse, "description": "the body is larger than the server's limit"},
}
TOKEN_ERROR = {
    401: {
        "model": ErrorResponse,
        "description": "missing or wrong bearer token",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    }
}
PROCESS_ERRORS = {
    422: {
        "model": InvalidResponse,
        "description": "an invalid field, or prompt tokens + max_new_tokens beyond the model's context",
    },
    503: {
        "model": ErrorResponse,
        "description": "the queue is full, or the server is stopping",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
    504: {"model": ErrorResponse, "description": "the request took longer than the server's limit"},
}


class Guard:
    """ASGI middleware: the bearer token (when set) and the request body size limit, before any parsing. The body
    is read here, counted (a chunked body has no length to check up front), then handed on."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.token = token.encode() if token else None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            credentials.strip(), self.token
        )  # RFC 7235

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token and scope["path"] not in OPEN_PATHS:
            if not self._authorized(headers.get(b"authorization", b"")):
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
        too_large = {"detail": f"request body exceeds the limit of {self.max_body} bytes"}
        if length > self.max_body:
            too_large["detail"] = f"request body of {length} bytes exceeds the limit of {self.max_body} bytes"
            return await _send_json(send, 413, too_large)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client hung up before its body was complete
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                return await _send_json(send, 413, too_large)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)


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
    scheduler = server.scheduler(options)

    ProcessRequest, DecodeRequest = server_requests(
        max_prompt_chars=server.max_prompt_chars,
        max_new_tokens=min(options.max_new_tokens, server.max_context - 1),
        vocab=server.vocab,
        max_sequences=min(16, options.max_queue),
    )
    guarded = ERRORS | (TOKEN_ERROR if options.token else {})
    # with a token the schema declares it (Guard checks it), so /docs and clients know to send it
    auth = [Depends(HTTPBearer(auto_error=False))] if options.token else []

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

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        return HealthResponse(
            status="stopping" if scheduler.stopping else "ok",
            max_new_tokens=options.max_new_tokens,
            queue=scheduler.stats(),
            prefix_cache=scheduler.prefix_cache_info(),
            **server.info(),
        )

    @app.post(
        "/process", response_model=ProcessResponse, responses=guarded | PROCESS_ERRORS, dependencies=auth
    )
    async def process(req: ProcessRequest, request: Request) -> ProcessResponse:
        t0 = time.perf_counter()
        deadline = time.monotonic() + options.request_timeout
        seqs, ctx = await run_in_threadpool(server.sequences, req, options.max_new_tokens, deadline)
        if req.max_new_tokens > 0 or any(s.score_prompt is not None for s in seqs):
            scheduler.submit(seqs)
            outcome = await _outcome(seqs, request, deadline)
            if outcome == "gone":
                return _error(499, None, "the client closed the connection")  # nobody reads it
            if outcome == "timeout":
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

    @app.post("/tokenize", response_model=TokenizeResponse, responses=guarded, dependencies=auth)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        t0 = time.perf_counter()
        tokens = await run_in_threadpool(server.tokenize, req.text, req.truncation, req.max_length)
        return TokenizeResponse(tokens=tokens, request_time=time.perf_counter() - t0)

    @app.post("/decode", response_model=DecodeResponse, responses=guarded, dependencies=auth)
    async def decode(req: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        text = await run_in_threadpool(server.decode, req.tokens)
        return DecodeResponse(text=text, request_time=time.perf_counter() - t0)

    app.add_middleware(Guard, token=options.token, max_body=options.max_body_bytes)
    return app


async def _hung_up(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outcome(seqs, request: Request, deadline: float) -> str:
    """Wait for the sequences: "done", "timeout" or "gone" (the client hung up), whichever comes first; a
    sequence's error (the server stopping) is raised. Sequences left unfinished leave the batch at the next step."""
    done = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(s.future) for s in seqs)))
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        finished, _ = await asyncio.wait(
            {done, gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            for s in seqs:
                s.cancelled = True
    if done in finished:
        try:
            done.result()
        except TimeoutError:  # the worker saw the deadline first
            return "timeout"
        return "done"
    return "gone" if gone in finished else "timeout"


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first starts the scheduler's drain: requests get the grace time, those
    still running then answer 503 from their own handlers (uvicorn would cancel them into a 500 a little later),
    and the lifespan's close waits for the worker to end between two steps, so no thread is inside torch when the
    process exits."""

    def __init__(self, app: FastAPI, options: ServeOptions, **config):
        timeout = options.shutdown_grace + RESPONSE_MARGIN
        super().__init__(
            uvicorn.Config(
                app, host=options.host, port=options.port, timeout_graceful_shutdown=timeout, **config
            )
        )
        self.scheduler, self.grace = app.state.scheduler, options.shutdown_grace

    async def shutdown(self, sockets=None) -> None:
        self.scheduler.drain(self.grace)
        await super().shutdown(sockets)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for `Server.run(sockets=...)`, or a DaytuneError naming the flag."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DaytuneError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DaytuneError(
                f"--port {port}: already in use on {host} (another server?); pick another"
            ) from None
        raise DaytuneError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock
