"""HELM's numbers and daytune's on the same instances, and the wall time of each: `helm-run` against
`daytune serve` (as the competition runs it) beside `daytune eval`'s local backend on the `neurips-open` scenarios.

    python benchmarks/helm_parity.py [--instances 50] [--gsm-instances 10] [--helm-venv .venv-helm]
                                     [--out benchmarks/results/helm_parity.json]

For each run entry, helm-run (its own venv, HELM's default 4 request threads; data seeded from the datasets
folder, so it downloads nothing) and daytune (SmolLM2-135M in this process: batched, prefix-sharing) score the
same instances. The server runs with its defaults (batching, prefix cache), so its logprobs can differ from the
local ones in the last digits: the table counts equal prompts, completions and per-instance scores rather than
assuming them (tests/test_helm_agreement.py asserts exact agreement on a deterministic server). For MMLU it also
scores daytune's own `mmlu` scenario (its older prompt) on the same questions, the gap this replaces. Times are
wall seconds of each whole command (helm-run's start-up included, as a user pays it; daytune's model load once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import start_server, stop_servers  # noqa: E402

# (run entry, daytune scenario, subject, main metrics to tabulate)
ENTRIES = [
    (
        "mmlu:subject=abstract_algebra,data_augmentation=robustness,model=neurips/local",
        "helm_mmlu",
        "abstract_algebra",
        ["exact_match", "exact_match_robustness", "ece_10_bin"],
    ),
    (
        "truthful_qa:task=mc_single,data_augmentation=robustness,model=neurips/local",
        "helm_truthfulqa",
        None,
        ["exact_match", "exact_match_robustness", "ece_10_bin"],
    ),
    ("bbq:subject=Age,model=neurips/local", "helm_bbq", "Age", ["bbq_accuracy", "bbq_metric_ambiguous_bias"]),
    ("gsm:model=neurips/local", "helm_gsm8k", None, ["final_number_exact_match"]),
]


def helm_stat(run_dir: Path, metric: str) -> float | None:
    name, _, group = metric.rpartition("_")
    if group not in ("robustness", "fairness"):
        name, group = metric, None
    for s in json.loads((run_dir / "stats.json").read_text()):
        p = s["name"].get("perturbation")
        if s["name"]["name"] != name or s["name"].get("split") not in ("test", "valid"):
            continue
        if (group is None and p is None) or (p and p["name"] == group and p.get("computed_on") == "worst"):
            return s["mean"]
    return None


def own_mmlu(lm, subject: str, questions: set[str]) -> float:
    """daytune's own MMLU scenario (before neurips-open) on HELM's sampled questions."""
    from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings, default_data_root

    scen = SCENARIOS["mmlu"]()
    insts = [
        i
        for i in scen.load(DataRoot(default_data_root()), Settings(subjects=[subject]))
        if i.input in questions
    ]
    records, _ = scen.run(lm, insts, Settings())
    return sum(r["exact_match"] for r in records) / len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--gsm-instances", type=int, default=10)
    ap.add_argument("--helm-venv", default=str(ROOT / ".venv-helm"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "helm_parity.json"))
    args = ap.parse_args()

    from daytune.eval.helm.compare import compare_run, seed_helm_data
    from daytune.eval.lm import LocalLM
    from daytune.eval.scenarios import default_data_root
    from daytune.eval.suites import run_suite, suite_plan

    work = Path(tempfile.mkdtemp(prefix="daytune-helm-parity-"))
    seed_helm_data(default_data_root(), work / "benchmark_output", mmlu=["abstract_algebra"], bbq=["Age"])
    proc, url = start_server(16, None)
    servers = {"server": (proc, url)}
    rows = []
    try:
        helm = {}
        for entry, _, _, _ in ENTRIES:
            n = args.gsm_instances if entry.startswith("gsm") else args.instances
            cmd = [f"{args.helm_venv}/bin/helm-run", "--run-entries", entry, "--suite", "p"]
            cmd += ["--max-eval-instances", str(n)]
            t0 = time.perf_counter()
            out = subprocess.run(
                cmd,
                cwd=work,
                env={**os.environ, "HELM_HTTP_MODEL_BASE_URL": url},
                capture_output=True,
                text=True,
            )
            helm[entry] = time.perf_counter() - t0
            if out.returncode != 0:
                raise SystemExit(f"helm-run {entry} failed:\n{(out.stdout + out.stderr)[-3000:]}")
            print(f"helm-run {entry}: {helm[entry]:.1f} s", flush=True)
    finally:
        stop_servers(servers)

    t0 = time.perf_counter()
    lm = LocalLM.load("smollm2-135m", log=lambda *a: None)
    load_s = time.perf_counter() - t0
    runs = work / "benchmark_output" / "runs" / "p"
    for entry, name, subject, metrics in ENTRIES:
        n = args.gsm_instances if entry.startswith("gsm") else args.instances
        plan = suite_plan("neurips-open", [name], n, [subject] if subject else None)
        t0 = time.perf_counter()
        res = run_suite(lm, "neurips-open", None, plan=plan, bootstrap=0, log=lambda *a: None)["scenarios"][
            name
        ]
        seconds = time.perf_counter() - t0
        prefix = entry.split(",model=")[0].split(":")[0]
        run_dir = next(d for d in runs.iterdir() if d.name.startswith(prefix))
        c = compare_run(run_dir, name, res, subject, tol=1e-4)
        row = {
            "entry": entry,
            "scenario": name,
            "instances": res["n"],
            "requests": c["requests"],
            "prompts_equal": c["prompts_equal"],
            "completions_equal": c["completions_equal"],
            "scores_equal": c["scores_equal"],
            "helm": {m: helm_stat(run_dir, m) for m in metrics},
            "daytune": {m: res["metrics"].get(m, {}).get("value") for m in metrics},
            "helm_seconds": round(helm[entry], 1),
            "daytune_seconds": round(seconds, 1),
            "speedup": round(helm[entry] / seconds, 2),
            "differences": c["differences"][:20],
        }
        if name == "helm_mmlu":
            state = json.loads((run_dir / "scenario_state.json").read_text())
            questions = {s["instance"]["input"]["text"] for s in state["request_states"]}
            row["daytune_own_mmlu_exact_match"] = own_mmlu(lm, subject, questions)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        "\n| run entry | n | prompts = HELM's | completions = | scores = | HELM | daytune | helm-run s | daytune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vals = lambda d: ", ".join(f"{m} {v:.3f}" for m, v in d.items() if v is not None)  # noqa: E731
        print(
            f"| `{r['entry'].split(',model=')[0]}` | {r['instances']} | {r['prompts_equal']}/{r['requests']} | "
            f"{r['completions_equal']}/{r['requests']} | {r['scores_equal']}/{r['requests']} | {vals(r['helm'])} | "
            f"{vals(r['daytune'])} | {r['helm_seconds']} | {r['daytune_seconds']} |"
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": "smollm2-135m",
        "daytune_model_load_seconds": round(load_s, 1),
        "server": "daytune serve defaults (max batch 16, prefix cache 512 MB)",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
