"""Serving throughput and latency: the batching server vs the same server forced to one request at a time.

    python benchmarks/serve_throughput.py [--clients 1 8 32] [--requests-per-client 1] [--max-new-tokens 32]
                                          [--shots 0] [--threads N] [--out benchmarks/results/serve_throughput.json]

Starts `daytune serve --model smollm2-135m` twice on 127.0.0.1 (`--max-batch 16` and `--max-batch 1`, both up
for the whole run, measured alternately so that the machine's load changes hit both), and for each number of
concurrent clients sends the same HELM-shaped greedy requests (GSM8K questions, `--shots`
worked examples before each, temperature 1e-7, `max_new_tokens` tokens, no stop sequence, so every request
does the same work in both servers). Reports requests/s and p50/p95 latency per setting, the speed-up, and
checks that every greedy output of the batched server equals the one-at-a-time server's. Prints a table and
writes JSON. Ratios matter, not absolute numbers: machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "gsm8k_train.jsonl"


def prompts(n: int, shots: int) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[: n + shots]]
    prefix = "".join(f"Question: {r['instruction']}\nAnswer: {r['output']}\n\n" for r in rows[:shots])
    return [f"{prefix}Question: {r['instruction']}\nAnswer:" for r in rows[shots:]]


def prompt_tokens(texts: list[str]) -> float:
    from daytune.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))
    return statistics.mean(len(tok(t)["input_ids"]) for t in texts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    max_batch: int, threads: int | None, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "daytune",
        "--quiet",
        "serve",
        "--model",
        "smollm2-135m",
        "--port",
        str(port),
    ]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "1024"]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url, lambda: proc.stderr.read()[-2000:], limit=120)
    return proc, url


def wait_up(proc: subprocess.Popen, url: str, output, limit: float) -> None:
    """Return once GET /health answers 200; a server that exits or stays down raises, with `output()` (the end
    of what it printed)."""
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {output()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"{url}: server not up in {limit:g} s: {output()}")


def greedy_request(prompt: str, max_new_tokens: int, top_k_per_token: int = 1, stop: list[str] = ()) -> dict:
    """A HELM-shaped greedy /process body (temperature 1e-7, as HELM asks for greedy decoding), no echo."""
    return {
        "prompt": prompt,
        "temperature": 1e-7,
        "num_return_sequences": 1,
        "max_new_tokens": max_new_tokens,
        "top_p": 1,
        "echo_prompt": False,
        "top_k_per_token": top_k_per_token,
        "stop_sequences": list(stop),
    }


def rates(latencies: list[float], wall: float) -> dict:
    """Requests, seconds, requests/s and p50/p95 latency of one load run."""
    latencies = sorted(latencies)
    n = len(latencies)
    return {
        "requests": n,
        "seconds": wall,
        "requests_per_s": n / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(n - 1, round(0.95 * (n - 1)))],
    }


def rate_line(label: str, r: dict) -> str:
    return (
        f"  {label} {r['requests']:4d} requests  {r['requests_per_s']:6.2f} req/s  "
        f"p50 {r['p50_s']:6.2f} s  p95 {r['p95_s']:6.2f} s  errors {r['errors']}"
    )


def stop_servers(servers: dict) -> None:
    for proc, _ in servers.values():
        proc.terminate()
        proc.wait(30)


async def timed_post(http, url: str, body: dict, latencies: list[float]) -> dict | None:
    """POST /process, its latency appended to `latencies`; the response's JSON, or None for an HTTP error."""
    t0 = time.perf_counter()
    resp = await http.post(f"{url}/process", json=body)
    latencies.append(time.perf_counter() - t0)
    return resp.json() if resp.status_code == 200 else None


def helm_text(out: dict) -> str:
    return out["text"]


async def load(
    url: str,
    texts: list[str],
    clients: int,
    per_client: int,
    max_new_tokens: int,
    *,
    path: str = "/process",
    body=greedy_request,
    text=helm_text,
) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests one after another: `body(prompt,
    max_new_tokens)` to `path`, the answer's text read by `text(json)` (another server's API: other functions)."""
    import httpx

    latencies: list[float] = []
    outputs: dict[int, str] = {}
    errors = 0

    async def client(c: int, http: httpx.AsyncClient):
        nonlocal errors
        for r in range(per_client):
            i = (c * per_client + r) % len(texts)
            t0 = time.perf_counter()
            resp = await http.post(f"{url}{path}", json=body(texts[i], max_new_tokens))
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors += 1
                continue
            outputs[i] = text(resp.json())

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "errors": errors, **rates(latencies, wall), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--min-requests", type=int, default=4, help="at least this many requests per setting")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    ap.add_argument("--shots", type=int, default=0, help="worked GSM8K examples before each question")
    ap.add_argument("--threads", type=int, help="the servers' --threads (default: PyTorch's choice)")
    ap.add_argument(
        "--prefix-cache-mb",
        type=int,
        help="both servers' --prefix-cache-mb (default: the server's, 512; 0 = off)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("DAYTUNE_QUIET", "1")
    texts = prompts(64, args.shots)
    modes = {"batched": args.max_batch, "one_at_a_time": 1}
    # Both servers stay up and the settings alternate between them, so a change in the machine's load hits both.
    extra = () if args.prefix_cache_mb is None else ("--prefix-cache-mb", str(args.prefix_cache_mb))
    servers = {mode: start_server(mb, args.threads, extra) for mode, mb in modes.items()}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for _, url in servers.values():
            asyncio.run(load(url, texts[:1], 1, 1, args.max_new_tokens))  # warm-up
        for c in args.clients:
            per_client = max(args.requests_per_client, -(-args.min_requests // c))
            for mode, (_, url) in servers.items():
                r = asyncio.run(load(url, texts, c, per_client, args.max_new_tokens))
                results[mode].append(r)
                print(rate_line(f"{mode:14s} {c:3d} clients ", r), flush=True)
    finally:
        stop_servers(servers)
    rows, same = [], True
    for b, s in zip(results["batched"], results["one_at_a_time"]):
        common = set(b["outputs"]) & set(s["outputs"])
        equal = all(b["outputs"][i] == s["outputs"][i] for i in common)
        same &= equal and b["errors"] == 0 and s["errors"] == 0
        rows.append(
            {
                "clients": b["clients"],
                "requests": b["requests"],
                "batched": {k: b[k] for k in ("requests_per_s", "p50_s", "p95_s", "errors")},
                "one_at_a_time": {k: s[k] for k in ("requests_per_s", "p50_s", "p95_s", "errors")},
                "speedup": b["requests_per_s"] / s["requests_per_s"],
                "greedy_outputs_equal": equal,
                "compared_outputs": len(common),
            }
        )
    print(
        f"\n{'clients':>7} {'batched req/s':>14} {'p50':>7} {'p95':>7} | {'1-at-a-time req/s':>18} {'p50':>7} "
        f"{'p95':>7} | {'speed-up':>8}  same greedy outputs"
    )
    for r in rows:
        b, s = r["batched"], r["one_at_a_time"]
        print(
            f"{r['clients']:7d} {b['requests_per_s']:14.2f} {b['p50_s']:7.2f} {b['p95_s']:7.2f} | "
            f"{s['requests_per_s']:18.2f} {s['p50_s']:7.2f} {s['p95_s']:7.2f} | {r['speedup']:7.2f}x  "
            f"{r['greedy_outputs_equal']} ({r['compared_outputs']})"
        )
    import torch

    report = {
        "benchmark": "serve_throughput",
        "model": "smollm2-135m",
        "max_new_tokens": args.max_new_tokens,
        "batched_max_batch": args.max_batch,
        "shots": args.shots,
        "threads": args.threads,
        "prefix_cache_mb": args.prefix_cache_mb,  # None: the server's default (512)
        "prompt_tokens_mean": prompt_tokens(texts),
        "rows": rows,
        "all_greedy_outputs_equal": same,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
