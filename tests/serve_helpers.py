"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that need HTTP and concurrency."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from daytune.serve.app import Server, create_app
from daytune.serve.options import ServeOptions

# HELM in its own venv (make helm-venv; .ci/run builds it)
HELM_VENV = Path(os.environ.get("DAYTUNE_HELM_VENV", Path(__file__).resolve().parents[1] / ".venv-helm"))
HELM_PYTHON = HELM_VENV / "bin" / "python"


def require_helm_venv() -> None:
    """Skip without the HELM venv on a developer's machine; in CI (.ci/run builds it) its absence is a failure."""
    if HELM_PYTHON.is_file():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but there is no HELM venv at {HELM_VENV}: .ci/run builds it (make helm-venv)")
    pytest.skip("no HELM venv (make helm-venv)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(serve_model, **options):
    """Yield the base URL of a server bound to 127.0.0.1 only; stops it (and its scheduler) on exit."""
    opts = ServeOptions(port=free_port(), **options)
    app = create_app(serve_model, opts)
    server = Server(app, opts, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{opts.port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.scheduler.close(5)


def wait_healthy(url: str, proc=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout} s")


@contextmanager
def serve_process(model: str, *args: str, env: dict | None = None):
    """`daytune serve` in its own process on a free loopback port; yields (url, process); killed on exit."""
    import os
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "daytune", "serve", "--model", model, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DAYTUNE_QUIET": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
