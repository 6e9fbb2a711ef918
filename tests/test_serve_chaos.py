"""The server under everything at once, on the tiny model: normal HELM-shaped requests from several clients, a
/tokenize flood, malformed and oversized bodies, clients that hang up, bursts that overflow the queue, and a
SIGTERM while all of it is in flight. Every answer is a documented status (no 5xx but 503 and 504), every greedy
or seeded answer that completes equals the one the server gave the same request alone, and the process exits 0.
127.0.0.1 only; bounded in requests per client and in time."""

import json
import random
import signal
import threading
import time
from collections import Counter

import httpx
import pytest
from serve_helpers import serve_process

pytestmark = pytest.mark.slow

PROMPTS = [
    "Natalia sold clips to 48 of her friends",
    "Weng earns $12 an hour for babysitting.",
    "Betty is saving money for a new wallet",
    "How",
    "James writes a 3-page letter to 2 different friends twice a week.",
    "Question: what is 7 times 8? Answer:",
]
CHAOS_SECONDS = 12  # traffic before the SIGTERM
PER_CLIENT = 200  # requests at most per client thread


def request_body(i: int) -> dict:
    """Request i of the fixed set: greedy or seeded samples, with and without echo and stop sequences."""
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "temperature": 1e-7 if i % 3 else 0.9,
        "seed": i,
        "num_return_sequences": 1 + i % 2,
        "max_new_tokens": 4 + (7 * i) % 29,
        "echo_prompt": i % 4 == 0,
        "top_k_per_token": 1 + i % 3,
        "stop_sequences": [] if i % 5 else ["\n"],
    }


def answer(body: dict) -> list[str]:
    return [c["text"] for c in body["completions"]]


def test_chaos_then_sigterm(tiny_model_dir):
    args = ("--threads", "1", "--max-batch", "8", "--max-queue", "24", "--shutdown-grace", "2")
    with serve_process(str(tiny_model_dir), *args, "--request-timeout", "20") as (url, proc):
        alone = {}
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(24):  # each request by itself: the answers everything else is checked against
                r = c.post("/process", json=request_body(i))
                assert r.status_code == 200, r.text
                alone[i] = answer(r.json())

        statuses, mismatches, stop = Counter(), [], threading.Event()
        lock = threading.Lock()

        def record(kind: str, status) -> None:
            with lock:
                statuses[(kind, status)] += 1

        def normal(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=60) as c:
                for _ in range(PER_CLIENT):
                    if stop.is_set():
                        return
                    i = rng.randrange(24)
                    try:
                        r = c.post("/process", json=request_body(i))
                    except httpx.TransportError as e:  # the server has stopped listening
                        record("normal", type(e).__name__)
                        return
                    record("normal", r.status_code)
                    if r.status_code == 200 and answer(r.json()) != alone[i]:
                        mismatches.append((i, answer(r.json()), alone[i]))

        def flood(seed: int) -> None:
            rng = random.Random(seed)
            text = "Natalia sold clips to 48 of her friends. " * 5000  # 210 k characters
            bad = [
                (b"{not json", {}),
                (b'{"prompt": "a", "max_new_tokens": "4"}', {}),
                (b'{"prompt": "a", "top_k": -1}', {}),
                (b"x" * 5_000_000, {}),  # over the 4 MB limit, with a length
            ]
            with httpx.Client(base_url=url, timeout=60) as c:
                for n in range(PER_CLIENT):
                    if stop.is_set():
                        return
                    try:
                        if n % 3 == 0:
                            r = c.post("/tokenize", json={"text": text, "truncation": False})
                        elif n % 3 == 1:
                            content, _ = rng.choice(bad)
                            r = c.post(
                                "/process", content=content, headers={"content-type": "application/json"}
                            )
                        else:  # a chunked body over the limit
                            chunks = iter([b'{"prompt": "'] + [b"x" * 1_000_000] * 5 + [b'"}'])
                            r = c.post(
                                "/process", content=chunks, headers={"content-type": "application/json"}
                            )
                    except httpx.ConnectError:  # the server has stopped listening
                        record("flood", "ConnectError")
                        return
                    except httpx.TransportError as e:  # a refused oversized body may reset the connection
                        record("flood", type(e).__name__)
                        continue
                    record("flood", r.status_code)

        def hang_up(seed: int) -> None:
            for n in range(PER_CLIENT):
                if stop.is_set():
                    return
                body = {"prompt": PROMPTS[(seed + n) % len(PROMPTS)], "max_new_tokens": 400}
                try:
                    r = httpx.post(f"{url}/process", json=body, timeout=0.3)
                    record("hang_up", r.status_code)
                except httpx.TimeoutException:
                    record("hang_up", "hung up")
                except httpx.TransportError as e:
                    record("hang_up", type(e).__name__)
                    return

        def burst(seed: int) -> None:
            while not stop.is_set():
                threads = [threading.Thread(target=normal_once, args=(seed * 100 + k,)) for k in range(16)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                time.sleep(0.5)

        def normal_once(seed: int) -> None:
            i = seed % 24
            try:
                r = httpx.post(
                    f"{url}/process", json=dict(request_body(i), num_return_sequences=4), timeout=60
                )
            except httpx.TransportError as e:
                record("burst", type(e).__name__)
                return
            record("burst", r.status_code)

        workers = (
            [threading.Thread(target=normal, args=(s,)) for s in range(6)]
            + [threading.Thread(target=flood, args=(s,)) for s in range(3)]
            + [threading.Thread(target=hang_up, args=(s,)) for s in range(2)]
            + [threading.Thread(target=burst, args=(1,))]
        )
        for w in workers:
            w.start()
        time.sleep(CHAOS_SECONDS)
        proc.send_signal(signal.SIGTERM)  # mid-flight
        out, err = proc.communicate(timeout=60)
        stop.set()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers)

    served = {status for (_, status) in statuses if isinstance(status, int)}
    assert not {s for s in served if s >= 500} - {503, 504}, statuses
    assert statuses[("normal", 200)] > 0 and statuses[("flood", 413)] > 0, statuses
    assert any(s == 503 for (kind, s) in statuses if kind == "burst"), statuses  # the queue overflowed
    assert not mismatches, mismatches[:3]
    assert proc.returncode == 0, err[-3000:]
    assert "terminate called" not in err and "Server stopped." in out
    print(json.dumps({f"{k}:{s}": n for (k, s), n in sorted(statuses.items(), key=str)}))
