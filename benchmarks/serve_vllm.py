"""Serving against vLLM, the server a user would pick instead: the same checkpoint, the same requests.

    python benchmarks/serve_vllm.py [--clients 1 8 32] [--max-new-tokens 32] [--vllm-threads N]
                                    [--dtypes float32 bfloat16] [--wait-policy PASSIVE]
                                    [--out benchmarks/results/serve_vllm.json]

Servers on 127.0.0.1, all up for the whole run and measured in turn at each number of clients (so a change in the
machine's load hits all of them), at each of `--dtypes` (equal settings: each daytune server is compared with the
vLLM server of its dtype):

- `daytune`: `daytune serve --model smollm2-135m` with its defaults (daytune's engine, batching, prefix cache),
  `--dtype` as named (`daytune-bf16`: `--dtype bfloat16`, weights packed once for oneDNN);
- `vllm`: vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) from the vLLM venv
  (make vllm-venv) on the same converted SmolLM2 folder, `--dtype` as named, its other settings its defaults (its
  CPU backend compiles the model at startup and may use fewer threads than cores);
- `daytune-on-vllm`: `daytune serve --engine vllm` from the vLLM venv (fp32): daytune's HELM API with vLLM
  underneath.

Each client sends HELM-shaped greedy requests one after another (GSM8K questions, no shots, temperature 0 / 1e-7,
`--max-new-tokens` tokens, the top-1 log-probability of each token, no stop sequence); the OpenAI server gets the
same prompt text as /v1/completions. Reports requests/s, p50/p95 latency, daytune's ratio against vLLM, whether
the greedy texts agree, and how far bf16's log-probabilities are from fp32's on the same tokens (echoed prompts
scored by both daytune servers). No OpenMP wait policy is set unless `--wait-policy` names one: each server as a
user starts it. Ratios matter, not absolute numbers: machines are noisy. Run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, load, prompt_tokens, prompts, rate_line, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("DAYTUNE_VLLM_VENV", ROOT / ".venv-vllm")).absolute()


def start(name: str, cmd: list[str], env: dict, logs: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [*cmd, "--port", str(port)]
    log = logs / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    wait_up(proc, url, lambda: log.read_text()[-3000:], limit=900)  # vLLM compiles at startup
    return proc, url, time.monotonic() - t0


def openai_request(model: str):
    """The same work as `greedy_request` for vLLM's /v1/completions: greedy, the top-1 logprob of each token."""

    def body(prompt: str, max_new_tokens: int) -> dict:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "logprobs": 1,
        }

    return body


def openai_text(out: dict) -> str:
    return out["choices"][0]["text"]


def measure(
    url: str, kind: str, model: str, texts, clients: int, per_client: int, max_new_tokens: int
) -> dict:
    api = (
        {"path": "/v1/completions", "body": openai_request(model), "text": openai_text}
        if kind == "openai"
        else {}
    )
    return asyncio.run(load(url, texts, clients, per_client, max_new_tokens, **api))


SHORT = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}


def logprob_gap(ref_url: str, url: str, texts: list[str]) -> dict:
    """How far `url`'s log-probabilities are from `ref_url`'s on the same tokens: both score the same prompts
    (echo_prompt, no generation), token by token."""
    import httpx

    diffs: list[float] = []
    for text in texts:
        req = {"prompt": text, "echo_prompt": True, "max_new_tokens": 0, "temperature": 1e-7}
        a, b = (httpx.post(f"{u}/process", json=req, timeout=300).json()["tokens"] for u in (ref_url, url))
        diffs += [abs(x["logprob"] - y["logprob"]) for x, y in zip(a[1:], b[1:])]
    diffs.sort()
    return {
        "tokens": len(diffs),
        "mean_abs": sum(diffs) / len(diffs),
        "p99_abs": diffs[int(0.99 * (len(diffs) - 1))],
        "max_abs": diffs[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many requests per setting")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--max-batch", type=int, default=16, help="every server's batch limit (vLLM: max-num-seqs)"
    )
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=sorted(SHORT),
        help="a daytune and a vLLM server at each (default: float32 bfloat16)",
    )
    ap.add_argument(
        "--vllm-threads",
        type=int,
        help="OMP_NUM_THREADS for the vLLM servers (default: unset, vLLM's own choice)",
    )
    ap.add_argument("--wait-policy", help="OMP_WAIT_POLICY for every server, e.g. PASSIVE (default: unset)")
    ap.add_argument(
        "--vllm-eager", action="store_true", help="vLLM without compilation (starts in seconds; slower steps)"
    )
    ap.add_argument(
        "--bf16-threads",
        type=int,
        default=1,
        help="--threads of the bf16 daytune server (default 1: vLLM's CPU backend binds its engine to one core "
        "and reserves the rest for its front end; measured best for bf16 on 2 cores). 0: PyTorch's choice",
    )
    ap.add_argument("--no-on-vllm", action="store_true", help="leave out daytune serve --engine vllm")
    ap.add_argument("--only", nargs="+", help="measure only these servers (names as printed)")
    ap.add_argument("--kv-cache-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for the vLLM servers")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vllm.json")
    args = ap.parse_args()
    vpython = VLLM_VENV / "bin" / "python"
    if not vpython.is_file():
        sys.exit(f"no vLLM venv at {VLLM_VENV}: make vllm-venv (or set DAYTUNE_VLLM_VENV)")
    from daytune.models import resolve_model

    folder = str(resolve_model("smollm2-135m"))
    texts = prompts(64, 0)
    logs = Path(tempfile.mkdtemp(prefix="serve_vllm_"))  # the servers' logs, named in any error
    quiet = {"DAYTUNE_QUIET": "1"} | ({"OMP_WAIT_POLICY": args.wait_policy} if args.wait_policy else {})
    venv_env = quiet | {"PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb)}
    if args.vllm_threads:
        venv_env["OMP_NUM_THREADS"] = str(args.vllm_threads)
    batch = ["--max-batch", str(args.max_batch), "--max-queue", "1024"]
    openai = [str(vpython), "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    openai += ["--max-num-seqs", str(args.max_batch)] + (["--enforce-eager"] if args.vllm_eager else [])
    specs: dict[str, tuple[list[str], dict, str]] = {}
    pairs: dict[str, str] = {}  # daytune server -> the vLLM server it is compared with (same dtype)
    for dtype in args.dtypes:
        d, v = f"daytune{SHORT[dtype]}", f"vllm{SHORT[dtype]}"
        daytune = [sys.executable, "-m", "daytune", "serve", "--model", "smollm2-135m", *batch]
        threads = ["--threads", str(args.bf16_threads)] if dtype != "float32" and args.bf16_threads else []
        specs[d] = (daytune + ["--dtype", dtype] + threads, quiet, "process")
        specs[v] = (openai + ["--dtype", dtype], venv_env, "openai")
        pairs[d] = v
    if not args.no_on_vllm:
        on_vllm = [str(vpython), "-m", "daytune", "serve", "--model", folder, "--engine", "vllm", *batch]
        on_vllm += ["--dtype", "float32"] + (
            ["--vllm-option", "enforce_eager=true"] if args.vllm_eager else []
        )
        specs["daytune-on-vllm"] = (on_vllm, venv_env, "process")
        pairs["daytune-on-vllm"] = "vllm"
    if args.only:
        specs = {name: spec for name, spec in specs.items() if name in args.only}
    servers, startup = {}, {}
    gaps = {}
    try:
        for name, (cmd, env, _) in specs.items():  # one at a time: vLLM compiles at startup, alone
            proc, url, seconds = start(name, cmd, env, logs)
            servers[name], startup[name] = (proc, url), seconds
            print(f"{name}: up in {seconds:.0f} s", flush=True)
        for name, (_, url) in servers.items():  # warm-up
            measure(url, specs[name][2], folder, texts[:1], 1, 1, args.max_new_tokens)
        results: dict[str, list[dict]] = {name: [] for name in specs}
        for c in args.clients:
            per_client = max(1, -(-args.min_requests // c))
            for name, (_, url) in servers.items():
                r = measure(url, specs[name][2], folder, texts, c, per_client, args.max_new_tokens)
                results[name].append(r)
                print(rate_line(f"{name:16s} {c:3d} clients ", r), flush=True)
        for dtype in args.dtypes:
            name = f"daytune{SHORT[dtype]}"
            if dtype != "float32" and name in servers and "daytune" in servers:
                gaps[name] = logprob_gap(servers["daytune"][1], servers[name][1], texts[:16])
                print(f"{name} logprobs vs fp32 (same tokens): {gaps[name]}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    for i, c in enumerate(args.clients):
        got = {name: results[name][i] for name in specs}
        row = {"clients": c, "requests": next(iter(got.values()))["requests"]}
        row |= {n: {k: r[k] for k in ("requests_per_s", "p50_s", "p95_s", "errors")} for n, r in got.items()}
        for n, peer in pairs.items():
            if n in got and peer in got:
                key = f"{n.replace('-', '_')}_vs_{peer.replace('-', '_')}"
                row[key] = got[n]["requests_per_s"] / got[peer]["requests_per_s"]
                ref = got[peer]["outputs"]
                row[f"{key}_greedy_equal"] = sum(got[n]["outputs"].get(k) == v for k, v in ref.items())
                row["compared_outputs"] = len(ref)
        if "daytune-bf16" in got and "vllm" in got:  # bf16 daytune against vLLM's fp32 server
            row["daytune_bf16_vs_vllm"] = (
                got["daytune-bf16"]["requests_per_s"] / got["vllm"]["requests_per_s"]
            )
        rows.append(row)
    print(f"\n{'clients':>7} " + " ".join(f"{n:>16}" for n in specs) + "   ratios, same greedy text")
    for r in rows:
        ratios = {k: v for k, v in r.items() if "_vs_" in k}
        print(
            f"{r['clients']:7d} "
            + " ".join(f"{r[n]['requests_per_s']:16.2f}" for n in specs)
            + "   "
            + ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}/{r.get('compared_outputs')}"
                for k, v in ratios.items()
            )
        )
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from pinned import cpu_kernel  # the torch build, its CPU capability, the CPU model and its kernel flags

    vllm_version = subprocess.run(
        [str(vpython), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    described = {
        "daytune": f"daytune serve, defaults (max_batch {args.max_batch}, prefix cache 512 MB), --dtype float32",
        "daytune-bf16": "the same with --dtype bfloat16 (fast path, weights packed once for oneDNN), --threads "
        f"{args.bf16_threads or 'unset'}",
        "daytune-fp16": "the same with --dtype float16",
        "vllm": f"vLLM {vllm_version} OpenAI server, --dtype float32, max-num-seqs {args.max_batch}, "
        f"KV cache {args.kv_cache_gb} GB, OMP_NUM_THREADS {args.vllm_threads or 'unset'}",
        "vllm-bf16": "the same with --dtype bfloat16",
        "vllm-fp16": "the same with --dtype float16",
        "daytune-on-vllm": "daytune serve --engine vllm --dtype float32 (same vLLM settings)",
    }
    report = {
        "benchmark": "serve_vllm",
        "model": "smollm2-135m",
        "workload": {
            "requests": "GSM8K questions, no shots, greedy, top-1 logprob per token, no stop sequence",
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_mean": prompt_tokens(texts),
        },
        "servers": {n: described[n] for n in specs},
        "omp_wait_policy": args.wait_policy or "unset",
        "startup_s": startup,
        "rows": rows,
        "logprobs_vs_fp32": gaps,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu": cpu_kernel(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
