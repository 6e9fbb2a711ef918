"""The server under bad input and load, on the tiny model: schemathesis against its own OpenAPI schema (all its
default checks, valid and invalid data), malformed bodies, limits naming the field, auth, queue overflow,
timeouts, 32 concurrent clients x 200 requests with 0 errors, a graceful shutdown and one past the grace time,
hang-ups, and a tokenization that must not stall decoding. All traffic goes to 127.0.0.1 and every loop is
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
from serve_helpers import free_port, live_server, serve_process, wait_healthy

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


def test_schemathesis_finds_no_failure(server):
    """schemathesis generates requests that fit /openapi.json and requests that do not, for every operation, and
    runs all its default checks on each answer: no server error, valid data accepted (2xx), invalid data refused
    (4xx), and status codes, headers and bodies as the schema declares them. Its own app: schemathesis ends an
    ASGI app's lifespan (and so the scheduler) when the test ends."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    app = create_app(server, ServeOptions(max_new_tokens=64))
    # invalid data may also be refused for its size (413, declared in the schema); schemathesis's list lacks it
    config = schemathesis.Config.from_str(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]\n'
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {
        "POST /process",
        "POST /tokenize",
        "POST /decode",
        "GET /health",
    }
    failures, calls = [], []

    def fuzz(operation, mode):
        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy(mode))
        def check(case):
            response = case.call()
            calls.append(response.status_code)
            try:
                case.validate_response(response)
            except BaseException as e:  # schemathesis raises a group of its failures
                failures.append(
                    (operation.label, mode.value, response.status_code, str(e).split("Reproduce")[0][:600])
                )

        try:
            check()
        except Unsatisfiable:  # GET /health has nothing to make invalid
            assert (operation.label, mode) == ("GET /health", schemathesis.GenerationMode.NEGATIVE)

    try:
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                fuzz(operation, mode)
    finally:
        app.state.scheduler.close(5)
    assert len(calls) > 100
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
        # strict types, as the schema says: no string for a number, no number for a boolean
        (b'{"prompt": "a", "max_new_tokens": "4"}', 422, "max_new_tokens"),
        (b'{"prompt": "a", "echo_prompt": 0}', 422, "echo_prompt"),
        (b'{"prompt": "a", "max_new_tokens": 4.5}', 422, "max_new_tokens"),
        (b'{"prompt": "a", "stop_sequences": [1]}', 422, "stop_sequences"),
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


# -- shutdown, floods, hang-ups and races --------------------------------------------------------------------------


def slowed(server, monkeypatch, per_token: float):
    """Make every sequence of `server` take `per_token` seconds per token (a big model in miniature)."""
    sequences = server.sequences

    def slow_sequences(*a, **k):
        seqs, ctx = sequences(*a, **k)
        for s in seqs:
            s.on_token = SlowWatcher(s.on_token, per_token)
        return seqs, ctx

    monkeypatch.setattr(server, "sequences", slow_sequences, raising=False)


class SlowWatcher:
    def __init__(self, inner, delay):
        self.inner, self.delay, self.stops = inner, delay, inner.stops

    def __call__(self, tok):
        time.sleep(self.delay)
        return self.inner(tok)

    def finish(self):
        return self.inner.finish()


def test_shutdown_past_the_grace_answers_503_and_joins_the_worker(server, monkeypatch):
    """A stop with requests that cannot finish in the grace time: each answers 200 or a 503 saying why (no 500
    from a cancelled handler), and the worker has ended when the server has."""
    from daytune.serve.app import Server

    slowed(server, monkeypatch, 0.02)  # 300 tokens: 6 s per request, one at a time
    opts = ServeOptions(port=free_port(), max_batch=1, shutdown_grace=0.5)
    app = create_app(server, opts)
    uv = Server(app, opts, log_level="critical")
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{opts.port}"
    wait_healthy(url)
    answers = []

    def ask(i):
        r = httpx.post(
            f"{url}/process", json={"prompt": f"Q{i}: Weng earns", "max_new_tokens": 300}, timeout=60
        )
        answers.append((r.status_code, r.text, r.headers.get("retry-after")))

    clients = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for c in clients:
        c.start()
    for _ in range(3000):
        if app.state.scheduler.stats()["waiting"] == 3:
            break
        time.sleep(0.01)
    uv.should_exit = True  # what SIGTERM does
    for c in clients:
        c.join(60)
    thread.join(60)
    assert not thread.is_alive() and not app.state.scheduler.thread.is_alive()
    assert len(answers) == 4 and {status for status, _, _ in answers} <= {200, 503}, answers
    refused = [a for a in answers if a[0] == 503]
    assert refused and all("shut down before this request finished" in t and r for _, t, r in refused)


def test_sigterm_past_the_grace_exits_0(tiny_model_dir):
    """The process, as `daytune serve` runs it: SIGTERM with more work in flight than the grace allows ends
    with exit code 0 (not an abort with a thread still inside torch) and only 200s and 503s."""
    with serve_process(
        str(tiny_model_dir), "--threads", "1", "--max-batch", "1", "--shutdown-grace", "1"
    ) as (
        url,
        proc,
    ):
        answers = []

        def ask(i):
            body = {"prompt": f"Q{i}: Weng earns", "max_new_tokens": 500}
            answers.append(httpx.post(f"{url}/process", json=body, timeout=120).status_code)

        clients = [
            threading.Thread(target=ask, args=(i,)) for i in range(16)
        ]  # 8,000 steps: past 1 s anywhere
        for c in clients:
            c.start()
        for _ in range(3000):
            if httpx.get(f"{url}/health").json()["queue"]["waiting"] >= 12:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(120)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "terminate called" not in err and "Server stopped." in out
    assert len(answers) == 16 and set(answers) <= {200, 503} and 503 in answers, answers


class Gated:
    """The server's tokenizer, except that encoding the text "BLOCK" waits for a gate: a huge /tokenize body
    in miniature."""

    def __init__(self, inner):
        self.inner = inner
        self.gate, self.entered, self.left = threading.Event(), threading.Event(), threading.Event()
        self.seen: list[int] = []  # lengths of the texts encoded

    def __call__(self, text, *a, **k):
        self.seen.append(len(text))
        if text == "BLOCK":
            self.entered.set()
            self.gate.wait(20)
            self.left.set()
        return self.inner(text, *a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def test_a_long_tokenization_blocks_neither_requests_nor_decoding(server, monkeypatch):
    """While one /tokenize call is inside the tokenizer, a /process request (its own tokenization, and the
    worker's per-token stop check) completes."""
    gated = Gated(server.tokenizer)
    monkeypatch.setattr(server, "tokenizer", gated)
    with live_server(server) as url:
        flood = threading.Thread(
            target=lambda: httpx.post(f"{url}/tokenize", json={"text": "BLOCK"}, timeout=60)
        )
        flood.start()
        try:
            assert gated.entered.wait(30)
            body = {"prompt": "Natalia sold clips", "max_new_tokens": 8, "stop_sequences": ["zzz"]}
            r = httpx.post(f"{url}/process", json=body, timeout=60)
            assert r.status_code == 200 and len(r.json()["tokens"]) == 8
            assert not gated.left.is_set()  # answered while the tokenization was still running
        finally:
            gated.gate.set()
            flood.join(60)


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client, server, monkeypatch):
    gated = Gated(server.tokenizer)
    monkeypatch.setattr(server, "tokenizer", gated)
    prompt = "x" * (server.max_prompt_chars + 1)
    r = client.post("/process", json={"prompt": prompt, "max_new_tokens": 1})
    assert r.status_code == 422 and "prompt" in r.text, r.text
    assert len(prompt) not in gated.seen


def test_a_client_that_hangs_up_leaves_the_batch_at_the_next_step(server, monkeypatch):
    """A client asks for 400 tokens and closes the connection: its row stops decoding at once, not at 400."""
    import socket

    slowed(server, monkeypatch, 0.02)  # 400 tokens: 8 s
    with live_server(server) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "Weng earns", "max_new_tokens": 400}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

        def queue():
            return httpx.get(f"{url}/health").json()["queue"]

        for _ in range(3000):
            if queue()["running"]:
                break
            time.sleep(0.01)
        sock.close()
        for _ in range(3000):
            if not queue()["running"]:
                break
            time.sleep(0.01)
        assert queue()["running"] == 0 and queue()["decode_steps"] < 200, queue()


def test_a_chunked_body_over_the_limit_gets_413(server):
    app = create_app(server, ServeOptions(max_body_bytes=1000))
    try:
        chunks = (b'{"prompt": "' + b"x" * 600, b"x" * 600 + b'"}')
        r = TestClient(app).post(
            "/process", content=iter(chunks), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and "1000" in r.text, r.text
        ok = TestClient(app).post(  # a chunked body within the limit is served
            "/process",
            content=iter((b'{"prompt": "Weng",', b' "max_new_tokens": 2}')),
            headers={"content-type": "application/json"},
        )
        assert ok.status_code == 200, ok.text
    finally:
        app.state.scheduler.close(5)


def test_a_token_guards_the_schema_and_docs_too_and_its_scheme_is_any_case(server):
    app = create_app(server, ServeOptions(token="s3cret"))
    try:
        c = TestClient(app)
        for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        req = {"prompt": "Weng earns", "max_new_tokens": 2}
        for scheme in ("bearer", "BEARER", "Bearer ", "bEaReR"):
            r = c.post("/process", json=req, headers={"Authorization": f"{scheme} s3cret"})
            assert r.status_code == 200, scheme
        assert c.post("/process", json=req, headers={"Authorization": "Basic s3cret"}).status_code == 401
        schema = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert "401" in schema["paths"]["/process"]["post"]["responses"]
    finally:
        app.state.scheduler.close(5)


def test_health_shows_no_paths(server, tiny_model_dir, tmp_path):
    adapter, old = tmp_path / "my-adapter", server.adapter
    adapter.mkdir()
    server.adapter = str(adapter)
    app = create_app(server)
    try:
        body = TestClient(app).get("/health").json()
    finally:
        server.adapter = old
        app.state.scheduler.close(5)
    assert body["model"] == tiny_model_dir.name and body["adapter"] == "my-adapter"
    assert str(tmp_path) not in json.dumps(body) and str(tiny_model_dir.parent) not in json.dumps(body)


def test_more_return_sequences_than_the_queue_holds_get_422(server):
    app = create_app(server, ServeOptions(max_queue=4))
    try:
        r = TestClient(app).post(
            "/process", json={"prompt": "Weng", "num_return_sequences": 5, "temperature": 1}
        )
        assert r.status_code == 422 and "num_return_sequences" in r.text, r.text
        r = TestClient(app).post(
            "/process", json={"prompt": "Weng", "num_samples": 4, "max_new_tokens": 2, "temperature": 1}
        )
        assert r.status_code == 200 and len(r.json()["completions"]) == 4
    finally:
        app.state.scheduler.close(5)


def test_the_schema_states_this_servers_limits(server):
    app = create_app(server, ServeOptions(max_new_tokens=64, max_queue=8))
    try:
        schema = TestClient(app).get("/openapi.json").json()
    finally:
        app.state.scheduler.close(5)
    process = schema["components"]["schemas"]["ProcessRequest"]["properties"]
    assert process["max_new_tokens"]["maximum"] == 64 and process["max_new_tokens"]["default"] == 64
    assert process["top_k"]["maximum"] == server.vocab
    assert process["num_return_sequences"]["maximum"] == 8
    assert process["prompt"]["maxLength"] == server.max_prompt_chars
    tokens = schema["components"]["schemas"]["DecodeRequest"]["properties"]["tokens"]["items"]
    assert tokens["minimum"] == 0 and tokens["exclusiveMaximum"] == server.vocab
    for path in ("/process", "/tokenize", "/decode"):
        assert {"400", "413", "422"} <= set(schema["paths"][path]["post"]["responses"]), path
    assert {"503", "504"} <= set(schema["paths"]["/process"]["post"]["responses"])


@pytest.mark.parametrize(
    "port,needle", [("70000", "--port: must be between 1 and 65535"), ("busy", "already in use")]
)
def test_a_bad_or_busy_port_is_one_line_and_exit_2(tiny_model_dir, capsys, port, needle):
    import socket

    from daytune.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if port == "busy":
            port = str(busy.getsockname()[1])
        assert main(["serve", "--model", str(tiny_model_dir), "--port", port]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
