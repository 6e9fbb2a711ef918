"""Log-likelihood throughput on MMLU 5-shot: daytune's engine vs lm-evaluation-harness's HFLM, same requests.

    python benchmarks/eval_throughput.py [--subjects 5] [--limit 10] [--batch-size 8] [--data-root DIR]
                                         [--out benchmarks/results/eval_throughput.json]

The requests are lm-eval's own: its `mmlu_<subject>` tasks (5-shot, first-n examples from the dev split), built
offline from local files, `--limit` questions per subject, 4 one-letter continuations each. Both sides score every
request of that list on the same SmolLM2-135M model object (fp32, CPU): lm-eval's `HFLM.loglikelihood` (length-
sorted batches, one pass per context for one-token continuations) and daytune's `LocalLM` through
`engine.score.loglikelihood_detailed` (length-sorted batches, the shared few-shot prefix run once per subject and
reused through the KV cache). Per-request log-likelihoods must agree within 1e-4 and the greedy flags exactly.
Prints a table and writes JSON. Ratios matter, not absolute numbers: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_requests(subjects: list[str], limit: int, data_root: Path, work: Path) -> list:
    from lm_eval.tasks import TaskManager, get_task_dict

    from daytune.eval.harness import prepare_tasks
    from daytune.eval.scenarios import DataRoot

    tasks = [f"mmlu_{s}" for s in subjects]
    prepare_tasks(tasks, DataRoot(data_root), work)
    task_dict = get_task_dict(tasks, TaskManager(include_path=str(work), include_defaults=False))
    requests = []
    for name in tasks:
        task = task_dict[name]
        task.set_config(key="num_fewshot", value=5)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += task.instances
    return requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=5, help="the first N of the five core MMLU subjects")
    ap.add_argument("--limit", type=int, default=10, help="questions per subject")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-root", default=None, help="datasets folder (default: the shipped samples)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_throughput.json"))
    args = ap.parse_args()

    import torch

    from daytune.eval.harness import harness_lm, hf_reference
    from daytune.eval.lm import LocalLM
    from daytune.eval.scenarios.base import SAMPLES
    from daytune.eval.scenarios.multiple_choice import MMLU_CORE
    from daytune.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m", log=lambda *a: None)
    lm = LocalLM(
        load_model(path).eval(), load_tokenizer(path), name="smollm2-135m", batch_size=args.batch_size
    )
    with tempfile.TemporaryDirectory() as work:
        requests = build_requests(
            MMLU_CORE[: args.subjects], args.limit, Path(args.data_root or SAMPLES), Path(work)
        )
    tokens = sum(len(lm._encode(r.args[0] + r.args[1])) for r in requests)
    hf = hf_reference(lm, batch_size=args.batch_size)
    ours = harness_lm(lm)
    with torch.no_grad():
        ours.loglikelihood(requests[:4])  # warm-up (one-time checks, allocator)
        t0 = time.perf_counter()
        ref = hf.loglikelihood(requests, disable_tqdm=True)
        t_hf = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = ours.loglikelihood(requests)
        t_ours = time.perf_counter() - t0
    diffs = [abs(a[0] - b[0]) for a, b in zip(got, ref)]
    greedy_same = all(a[1] == b[1] for a, b in zip(got, ref))
    result = {
        "benchmark": "eval_throughput",
        "workload": f"MMLU 5-shot log-likelihood, {args.subjects} subjects x {args.limit} questions x 4 letters",
        "model": "smollm2-135m (fp32)",
        "requests": len(requests),
        "request_tokens": tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "lm_eval_hflm": {"seconds": round(t_hf, 2), "requests_per_s": round(len(requests) / t_hf, 2)},
        "daytune": {"seconds": round(t_ours, 2), "requests_per_s": round(len(requests) / t_ours, 2)},
        "speedup": round(t_hf / t_ours, 2),
        "max_abs_diff": max(diffs),
        "greedy_flags_equal": greedy_same,
    }
    print(f"{'':16s} {'seconds':>9s} {'requests/s':>11s}")
    print(f"{'lm-eval HFLM':16s} {t_hf:9.2f} {len(requests) / t_hf:11.2f}")
    print(f"{'daytune':16s} {t_ours:9.2f} {len(requests) / t_ours:11.2f}")
    print(f"speedup {result['speedup']}x over {len(requests)} requests ({tokens} tokens as sent); ", end="")
    print(f"max |Δ log-likelihood| {max(diffs):.2e}; greedy flags equal: {greedy_same}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if max(diffs) > 1e-4 or not greedy_same:
        raise SystemExit("per-request log-likelihoods differ by more than 1e-4")


if __name__ == "__main__":
    main()
