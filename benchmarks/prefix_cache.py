"""The server's prefix cache on HELM-shaped traffic: the same server with `--prefix-cache-mb` on and off.

    python benchmarks/prefix_cache.py [--subjects 2] [--questions 24] [--clients 8] [--rounds 2]
                                      [--threads N] [--out benchmarks/results/prefix_cache.json]

The requests are the ones HELM's MMLU run entries send: daytune's MMLU scenario builds each prompt (its five
solved questions of the subject, then the question: HELM's `multiple_choice_joint` layout), one new token,
greedy (temperature 1e-7), stop sequence a newline, top 5 alternatives per token, no echo. The subjects are sent
one after another, as HELM runs them; `--clients` clients send each subject's questions concurrently. Two
`daytune serve --model smollm2-135m` servers (cache off: `--prefix-cache-mb 0`; on: the default) stay up for the
whole run and are measured alternately, round after round, so a change in the machine's load hits both. Reports
requests/s of each, the ratio, the tokens each prompt reused (the server's /health), and checks that every
answer's token and its log-probabilities (chosen and top 5) are equal to 1e-4. Ratios matter, not absolute
numbers: machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # noqa: E402
    greedy_request,
    prompt_tokens,
    rate_line,
    rates,
    start_server,
    stop_servers,
    timed_post,
)

TOLERANCE = 1e-4


def mmlu_prompts(subjects: int, questions: int) -> list[list[str]]:
    """Per subject, the prompts daytune's MMLU scenario (HELM's layout, 5 shots) builds for its first questions."""
    from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings, default_data_root
    from daytune.eval.scenarios.multiple_choice import MMLU_CORE

    scenario = SCENARIOS["mmlu"]()
    out = []
    for subject in MMLU_CORE[:subjects]:
        settings = Settings(max_instances=questions, subjects=[subject])
        out.append([scenario.prompt(inst) for inst in scenario.load(DataRoot(default_data_root()), settings)])
    return out


async def send(url: str, subjects: list[list[str]], clients: int) -> dict:
    """Each subject's prompts through `clients` concurrent clients, subject after subject."""
    import httpx

    answers: dict[tuple[int, int], dict] = {}
    latencies: list[float] = []
    errors = 0

    async def client(c: int, s: int, texts: list[str], http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in range(c, len(texts), clients):
            body = greedy_request(texts[i], 1, top_k_per_token=5, stop=["\n"])
            out = await timed_post(http, url, body, latencies)
            if out is None:
                errors += 1
                continue
            answers[(s, i)] = out["completions"][0]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        t0 = time.perf_counter()
        for s, texts in enumerate(subjects):
            await asyncio.gather(*(client(c, s, texts, http) for c in range(clients)))
        wall = time.perf_counter() - t0
        health = (await http.get(f"{url}/health")).json()
    return {
        "errors": errors,
        **rates(latencies, wall),
        "answers": answers,
        "prefix_cache": health.get("prefix_cache"),
    }


def compare(a: dict, b: dict) -> dict:
    """Tokens equal and log-probabilities (chosen and top alternatives) within TOLERANCE, answer by answer."""
    common = sorted(set(a) & set(b))
    same_tokens, worst = 0, 0.0
    for k in common:
        ta, tb = a[k]["tokens"], b[k]["tokens"]
        if [t["text"] for t in ta] != [t["text"] for t in tb]:
            continue
        same_tokens += 1
        for x, y in zip(ta, tb):
            worst = max(worst, abs(x["logprob"] - y["logprob"]))
            if set(x["top_logprob"]) != set(y["top_logprob"]):
                worst = float("inf")
                continue
            for t in x["top_logprob"]:
                worst = max(worst, abs(x["top_logprob"][t] - y["top_logprob"][t]))
    return {
        "compared": len(common),
        "same_tokens": same_tokens,
        "max_logprob_difference": worst,
        "equal": same_tokens == len(common) and worst <= TOLERANCE,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--subjects", type=int, default=2, help="MMLU subjects, sent one after another (at most 5)"
    )
    ap.add_argument("--questions", type=int, default=24, help="questions per subject")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurements of each server")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, help="the servers' --threads (default: PyTorch's choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_cache.json")
    args = ap.parse_args()
    from daytune.eval.scenarios.multiple_choice import MMLU_CORE

    os.environ.setdefault("DAYTUNE_QUIET", "1")
    subjects = mmlu_prompts(args.subjects, args.questions)
    texts = [t for s in subjects for t in s]
    modes = {"cache_off": ("--prefix-cache-mb", "0"), "cache_on": ()}
    servers = {mode: start_server(args.max_batch, args.threads, extra) for mode, extra in modes.items()}
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        warm = [[f"Question: warm-up {i}\nAnswer:" for i in range(2)]]
        for _, url in servers.values():
            asyncio.run(send(url, warm, 1))
        for r in range(args.rounds):
            for mode, (_, url) in servers.items():
                res = asyncio.run(send(url, subjects, args.clients))
                results[mode].append(res)
                print(rate_line(f"round {r + 1} {mode:9s}", res), flush=True)
    finally:
        stop_servers(servers)
    rps = {m: statistics.median(r["requests_per_s"] for r in results[m]) for m in modes}
    agreement = [
        compare(off["answers"], on["answers"]) for off, on in zip(results["cache_off"], results["cache_on"])
    ]
    errors = sum(r["errors"] for m in modes for r in results[m])
    cache = results["cache_on"][-1]["prefix_cache"] or {}
    reused = cache.get("tokens_reused", 0) / max(
        1, cache.get("tokens_reused", 0) + cache.get("tokens_prefilled", 0)
    )
    report = {
        "benchmark": "prefix_cache",
        "model": "smollm2-135m",
        "workload": {
            "scenario": "mmlu, 5 shots (HELM's multiple_choice_joint layout)",
            "subjects": MMLU_CORE[: args.subjects],
            "questions_per_subject": args.questions,
            "clients": args.clients,
            "max_new_tokens": 1,
            "prompt_tokens_mean": prompt_tokens(texts),
        },
        "max_batch": args.max_batch,
        "threads": args.threads,
        "rounds": {
            m: [{k: r[k] for k in ("requests_per_s", "p50_s", "p95_s", "errors")} for r in results[m]]
            for m in modes
        },
        "requests_per_s": rps,
        "speedup": rps["cache_on"] / rps["cache_off"],
        "prefix_cache_after_run": cache,
        "prompt_tokens_reused_fraction": reused,
        "agreement": agreement,
        "all_equal": all(a["equal"] for a in agreement) and errors == 0,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    detail = ", ".join(
        f"{a['same_tokens']}/{a['compared']} same tokens, max |dlogprob| {a['max_logprob_difference']:.1e}"
        for a in agreement
    )
    print(
        f"\ncache off {rps['cache_off']:.2f} req/s, cache on {rps['cache_on']:.2f} req/s: "
        f"{report['speedup']:.2f}x; prompt tokens reused {reused:.0%}; answers equal: {report['all_equal']} "
        f"({detail})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
