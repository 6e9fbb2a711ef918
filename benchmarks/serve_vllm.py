"""Serving against vLLM, the server a user would pick instead: the same checkpoint, the same requests.

    python benchmarks/serve_vllm.py [--clients 1 8 32] [--max-new-tokens 32] [--vllm-threads N]
                                    [--out benchmarks/results/serve_vllm.json]

Three servers on 127.0.0.1, all up for the whole run and measured in turn at each number of clients (so a change in
the machine's load hits all of them):

- `daytune`: `daytune serve --model smollm2-135m` with its defaults (daytune's engine, batching, prefix cache);
- `vllm`: vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`) from the vLLM venv
  (make vllm-venv) on the same converted SmolLM2 folder, fp32 like daytune on a CPU, its other settings its
  defaults (its CPU backend compiles the model at startup and may use fewer threads than cores);
- `daytune-on-vllm`: `daytune serve --engine vllm` from the vLLM venv: daytune's HELM API with vLLM underneath.

Each client sends HELM-shaped greedy requests one after another (GSM8K questions, no shots, temperature 0 / 1e-7,
`--max-new-tokens` tokens, the top-1 log-probability of each token, no stop sequence); the OpenAI server gets the
same prompt text as /v1/completions. Reports requests/s, p50/p95 latency, daytune's ratio against vLLM, and whether
the greedy texts agree. Ratios matter, not absolute numbers: machines are noisy. Run it alone.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many requests per setting")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--max-batch", type=int, default=16, help="every server's batch limit (vLLM: max-num-seqs)"
    )
    ap.add_argument(
        "--vllm-threads",
        type=int,
        help="OMP_NUM_THREADS for both vLLM servers (default: unset, vLLM's own choice)",
    )
    ap.add_argument(
        "--vllm-eager", action="store_true", help="vLLM without compilation (starts in seconds; slower steps)"
    )
    ap.add_argument(
        "--only", nargs="+", choices=("daytune", "vllm", "daytune-on-vllm"), help="measure only these servers"
    )
    ap.add_argument("--kv-cache-gb", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE for the vLLM servers")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vllm.json")
    args = ap.parse_args()
    vpython = VLLM_VENV / "bin" / "python"
    if not vpython.is_file():
        sys.exit(f"no vLLM venv at {VLLM_VENV}: make vllm-venv (or set DAYTUNE_VLLM_VENV)")
    from daytune.models import resolve_model

    folder = str(resolve_model("smollm2-135m"))
    texts = prompts(64, 0)
    logs = Path(tempfile.mkdtemp(prefix="serve_vllm_"))  # the servers' logs, named in any error
    quiet = {"DAYTUNE_QUIET": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    venv_env = quiet | {"PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb)}
    if args.vllm_threads:
        venv_env["OMP_NUM_THREADS"] = str(args.vllm_threads)
    batch = ["--max-batch", str(args.max_batch), "--max-queue", "1024"]
    daytune = [sys.executable, "-m", "daytune", "serve", "--model", "smollm2-135m", *batch]
    openai = [
        str(vpython),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--dtype",
        "float32",
    ]
    openai += ["--max-num-seqs", str(args.max_batch)]
    on_vllm = [str(vpython), "-m", "daytune", "serve", "--model", folder, "--engine", "vllm", *batch]
    if args.vllm_eager:
        openai += ["--enforce-eager"]
        on_vllm += ["--vllm-option", "enforce_eager=true"]
    specs = {
        "daytune": (daytune, quiet, "process"),
        "vllm": (openai, venv_env, "openai"),
        "daytune-on-vllm": (on_vllm, venv_env, "process"),
    }
    specs = {name: spec for name, spec in specs.items() if not args.only or name in args.only}
    servers, startup = {}, {}
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
        if "vllm" in got:
            ref, peer = got["vllm"]["outputs"], got["vllm"]["requests_per_s"]
            for n in ("daytune", "daytune-on-vllm"):
                if n in got:
                    row[f"{n.replace('-', '_')}_vs_vllm"] = got[n]["requests_per_s"] / peer
                    row[f"{n.replace('-', '_')}_greedy_equal"] = sum(
                        got[n]["outputs"].get(k) == v for k, v in ref.items()
                    )
            row["compared_outputs"] = len(ref)
        rows.append(row)
    print(f"\n{'clients':>7} " + " ".join(f"{n:>16}" for n in specs) + "   ratios to vLLM, same greedy text")
    for r in rows:
        ratios = {k: v for k, v in r.items() if k.endswith("_vs_vllm") or k.endswith("_equal")}
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

    vllm_version = subprocess.run(
        [str(vpython), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    report = {
        "benchmark": "serve_vllm",
        "model": "smollm2-135m",
        "workload": {
            "requests": "GSM8K questions, no shots, greedy, top-1 logprob per token, no stop sequence",
            "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_mean": prompt_tokens(texts),
        },
        "servers": {
            "daytune": f"daytune serve, defaults (max_batch {args.max_batch}, prefix cache 512 MB), fp32",
            "vllm": f"vLLM {vllm_version} OpenAI server, fp32, max-num-seqs {args.max_batch}, "
            f"KV cache {args.kv_cache_gb} GB, OMP_NUM_THREADS {args.vllm_threads or 'unset'}",
            "daytune-on-vllm": "daytune serve --engine vllm (same vLLM settings)",
        },
        "startup_s": startup,
        "rows": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
