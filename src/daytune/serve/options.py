"""Server settings: where it listens, who may call it, and the limits that keep it responsive under load."""

from __future__ import annotations

import os
from dataclasses import dataclass

TOKEN_ENV = "DAYTUNE_SERVE_TOKEN"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"  # this machine only, unless asked otherwise
    port: int = 8080
    token: str | None = None  # bearer token required on every endpoint but GET /health; None: open
    max_batch: int = 16  # sequences decoded together; 1 serves one request at a time
    max_queue: int = 256  # sequences waiting for a batch slot before the server answers 503
    max_prefill_tokens: int = 8192  # padded prompt tokens prefilled in one step (bounds memory and stalls)
    max_new_tokens: int = 1024  # cap on a request's max_new_tokens
    prefix_cache_mb: int = (
        512  # KV caches of recent prompts kept for requests that share their prefix; 0: off
    )
    request_timeout: float = 600.0  # seconds a /process request may take before it is dropped (HTTP 504)
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies are refused (HTTP 413)
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM/SIGINT

    def __post_init__(self):
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
