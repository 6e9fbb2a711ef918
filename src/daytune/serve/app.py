"""FastAPI app around a ServeModel. `daytune serve` runs it with uvicorn on 127.0.0.1 by default."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from daytune.serve.model import RequestError, ServeModel
from daytune.serve.schemas import (
    DecodeRequest,
    DecodeResponse,
    ProcessRequest,
    ProcessResponse,
    TokenizeRequest,
    TokenizeResponse,
)


def create_app(server: ServeModel) -> FastAPI:
    app = FastAPI(
        title="daytune server", version="1", description="The NeurIPS LLM Efficiency Challenge API."
    )

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(
            status_code=422, content={"detail": [{"loc": ["body", exc.field], "msg": str(exc)}]}
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **server.info()}

    @app.post("/process", response_model=ProcessResponse)
    def process(req: ProcessRequest) -> ProcessResponse:
        t0 = time.perf_counter()
        completions = server.process(req)
        first = completions[0]
        return ProcessResponse(
            text=first.text,
            tokens=first.tokens,
            logprob=first.logprob,
            request_time=time.perf_counter() - t0,
            completions=completions,
        )

    @app.post("/tokenize", response_model=TokenizeResponse)
    def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        t0 = time.perf_counter()
        tokens = server.tokenize(req.text, req.truncation, req.max_length)
        return TokenizeResponse(tokens=tokens, request_time=time.perf_counter() - t0)

    @app.post("/decode", response_model=DecodeResponse)
    def decode(req: DecodeRequest) -> DecodeResponse:
        t0 = time.perf_counter()
        text = server.decode(req.tokens)
        return DecodeResponse(text=text, request_time=time.perf_counter() - t0)

    return app
