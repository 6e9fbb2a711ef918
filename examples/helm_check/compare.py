"""Compare a HELM run (helm-run against `daytune serve`) with daytune's results for the same run entry.

    python examples/helm_check/compare.py HELM_RUN_DIR DAYTUNE_RESULTS_JSON --scenario helm_mmlu [--subject S]

HELM_RUN_DIR is one folder of benchmark_output/runs/<suite>/; the results file is `daytune eval`'s results.json
of the `neurips-open` suite. Prints how many prompts, completions and per-instance scores are equal, every
aggregate metric beside HELM's, and each difference; exits 1 if there is one. See docs/eval.md.
"""

import argparse
import json
import sys
from pathlib import Path

from daytune.eval.helm.compare import compare_run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("results")
    ap.add_argument(
        "--scenario", default="helm_mmlu", help="daytune's scenario (helm_mmlu, helm_truthfulqa, ...)"
    )
    ap.add_argument("--subject", help="the MMLU subject (BBQ category) of this HELM run")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())["scenarios"][args.scenario]
    c = compare_run(args.run_dir, args.scenario, results, args.subject)
    n = c["requests"]
    print(f"{c['run']}: {n} requests")
    print(
        f"  prompts byte-identical: {c['prompts_equal']}/{n}; completions equal: {c['completions_equal']}/{n}; "
        f"per-instance scores equal: {c['scores_equal']}/{n}"
    )
    for a in c["aggregates"]:
        print(
            f"  {a['metric']:<36} HELM {a['helm']:.6f}  daytune {a['daytune']:.6f}  {'=' if a['equal'] else 'DIFFERS'}"
        )
    for d in c["differences"]:
        print("  difference:", d)
    return 1 if c["differences"] else 0


if __name__ == "__main__":
    sys.exit(main())
