"""The server under bad input and load, on the tiny model: a property-based fuzzer against its own OpenAPI
schema (0 server errors), malformed bodies, limits naming the field, auth, queue overflow, timeouts, 32 concurrent
clients x 200 requests with 0 errors, and a graceful shutdown. All traffic goes to 127.0.0.1 and every loop is
bounded."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import free_port, serve_process, wait_healthy

from daytune.serve.app import create_app
from daytune.serve.model import ServeModel
from daytune.serve.options import TOKEN_ENV, ServeOptions


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return ServeModel(str(tiny_model_dir), device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def app(server):
    app = create_app(server, ServeOptions(max_new_tokens=64))
    yield app
    app.state.scheduler.close(5)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def test_fuzz_the_openapi_schema_finds_no_server_error(app):
    """schemathesis generates valid and invalid requests for every operation from /openapi.json."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []

    def fuzz(operation):
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append((operation.label, case.body, response.status_code, response.text[:300]))
            elif response.status_code == 200:
                case.validate_response(response, checks=[schemathesis.checks.response_schema_conformance])

        check()

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /process",
        "POST /tokenize",
        "POST /decode",
        "GET /health",
    }
    for operation in operations:
        fuzz(operation)
    assert not failures, failures[:5]


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b"{not json", 422, "JSON"),
        (b'{"prompt": "caf\xe9"}', 400, "body"),  # latin-1, not UTF-8
        (b'{"prompt": "\\ud800 lone surrogate"}', 422, "prompt"),
        (b'{"prompt": "a", "max_new_tokens": ' + b"9" * 5000 + b"}", 400, "body"),
        (b'{"prompt": "a", "max_new_tokens": 1e400}', 422, "max_new_tokens"),
        (b'{"prompt": "a", "temperature": NaN}', 422, "temperature"),
        (b'{"prompt": "a", "seed": 99999999999999999999999}', 422, "seed"),
        (b'{"prompt": "a", "top_k": -1}', 422, "top_k"),
        (b'{"prompt": "a", "stop_sequences": "x"}', 422, "stop_sequences"),
        (b"[]", 422, "body"),
        (b"", 422, "body"),
        (b'{"prompt": ""}', 422, "prompt"),
    ],
)
def test_malformed_bodies_get_a_4xx_naming_the_problem(client, body, status, needle):
    r = client.post("/process", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_limits_name_the_field(client, server):
    base = {"prompt": "Natalia sold clips", "max_new_tokens": 4}
    r = client.post("/process", json=dict(base, max_new_tokens=65))  # over this server's cap of 64
    assert r.status_code == 422 and "max_new_tokens" in r.text and "64" in r.text
    r = client.post(
        "/process", json=dict(base, prompt="word " * 600)
    )  # over the tiny model's 512-token context
    assert r.status_code == 422 and "context" in r.text
    r = client.post("/process", json=dict(base, top_k=10**6))
    assert r.status_code == 422 and "top_k" in r.text
    r = client.post("/process", json=dict(base, num_return_sequences=17))
    assert r.status_code == 422 and "num_return_sequences" in r.text
    r = client.post("/decode", json={"tokens": [-1]})
    assert r.status_code == 422 and "tokens" in r.text
    r = client.post("/tokenize", json={"text": "a", "max_length": 0})
    assert r.status_code == 422 and "max_length" in r.text
    # an empty prompt is fine when nothing is generated
    r = client.post("/process", json={"prompt": "", "max_new_tokens": 0, "echo_prompt": True})
    assert r.status_code == 200 and r.json()["text"] == "" and r.json()["tokens"] == []


def test_oversized_body_is_refused_before_parsing(server):
    app = create_app(server, ServeOptions(max_body_bytes=1000))
    try:
        r = TestClient(app).post("/process", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and "1000" in r.text
    finally:
        app.state.scheduler.close(5)


def test_bearer_token(server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    app = create_app(server, ServeOptions())  # the token comes from the environment
    try:
        c = TestClient(app)
        req = {"prompt": "Weng earns", "max_new_tokens": 2}
        r = c.post("/process", json=req)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/process", json=req, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/process", json=req, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/tokenize", json={"text": "a"}).status_code == 401
        assert c.get("/health").status_code == 200  # liveness checks need no token
    finally:
        app.state.scheduler.close(5)


def test_default_binds_loopback_only():
    from daytune.cli import _parser

    assert ServeOptions().host == "127.0.0.1"
    assert _parser().parse_args(["serve", "--model", "x"]).host == "127.0.0.1"


def test_full_queue_answers_503_with_retry_after_and_slow_requests_time_out(server):
    app = create_app(server, ServeOptions(max_batch=1, max_queue=1, request_timeout=1.5))
    sched = app.state.scheduler
    gate = threading.Event()
    try:
        c = TestClient(app)
        long = {"prompt": "Weng earns", "max_new_tokens": 64}
        # hold the worker: the first request's every token waits on the gate
        server_on_token = server.sequences

        def slow_sequences(*a, **k):
            seqs, ctx = server_on_token(*a, **k)
            for s in seqs:
                inner = s.on_token
                s.on_token = lambda t, inner=inner: gate.wait(0.05) or inner(t)
            return seqs, ctx

        server.sequences = slow_sequences
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("first", c.post("/process", json=long)))
        t.start()
        for _ in range(500):
            if sched.running:
                break
            time.sleep(0.01)
        t2 = threading.Thread(target=lambda: results.setdefault("second", c.post("/process", json=long)))
        t2.start()
        for _ in range(500):
            if sched.waiting:
                break
            time.sleep(0.01)
        r = c.post("/process", json=long)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        t.join(30)
        t2.join(30)
        assert results["first"].status_code == 504 and "1.5 s" in results["first"].text
        assert results["second"].status_code == 504
    finally:
        del server.sequences
        gate.set()
        sched.close(5)


def test_32_clients_x_200_requests_without_errors(tiny_model_dir):
    """6,400 HELM-shaped requests (greedy and sampled, with and without echo) from 32 concurrent keep-alive
    clients against a server process; greedy answers under load equal the answers to a lone request."""
    import http.client

    def body(c, r):
        return {
            "prompt": f"Question {c}-{r}: Natalia sold clips",
            "temperature": 1e-7 if r % 2 else 0.8,
            "num_return_sequences": 1,
            "max_new_tokens": 1 + (c + r) % 4,
            "top_p": 1,
            "echo_prompt": r % 5 == 0,
            "top_k_per_token": 1,
            "stop_sequences": [],
            "seed": r,
        }

    def post(conn, path, payload):
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    errors, greedy = [], {}
    deadline = time.monotonic() + 240

    def client(c, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for r in range(200):
            if time.monotonic() > deadline:
                errors.append("deadline")
                return
            status, data = post(conn, "/process", body(c, r))
            if status != 200:
                errors.append((status, data[:200]))
            elif r % 2 and r % 5:
                greedy[(c, r)] = json.loads(data)["text"]
        conn.close()

    with serve_process(str(tiny_model_dir), "--threads", "1", "--max-batch", "16") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        threads = [threading.Thread(target=client, args=(c, port)) for c in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == [], errors[:5]
        assert httpx.get(f"{url}/health").json()["queue"]["finished"] >= 6400
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for c, r in list(greedy)[:: max(1, len(greedy) // 8)]:
            status, data = post(conn, "/process", body(c, r))
            assert json.loads(data)["text"] == greedy[(c, r)]


def test_graceful_shutdown_finishes_in_flight_requests(tiny_model_dir, tmp_path):
    """SIGTERM: the server stops accepting, lets the running request finish, and exits cleanly."""
    port = free_port()
    env = dict(os.environ, DAYTUNE_QUIET="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daytune", "serve", "--model", str(tiny_model_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        result = {}
        body = {"prompt": "Natalia sold clips", "max_new_tokens": 400, "temperature": 1e-7}
        t = threading.Thread(
            target=lambda: result.setdefault("r", httpx.post(f"{url}/process", json=body, timeout=60))
        )
        t.start()
        for _ in range(500):
            if httpx.get(f"{url}/health").json()["queue"]["running"]:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        out, err = proc.communicate(timeout=60)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["tokens"]) > 0
        assert proc.returncode == 0, err[-2000:]
        assert "Server stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
