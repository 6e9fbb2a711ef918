"""Does fine-tuning with daytune make the model better at tasks it never trained on? Train a recipe, then score the
base and the tuned model on the unseen suite and the quick suite, instance by instance, and compare them.

    python benchmarks/outcome.py [--recipe examples/instruct-mix.yaml] [--unseen-instances 50] [--quick-instances N]
    python benchmarks/outcome.py --smoke      # the test suite's tiny random model, seconds of training: the script
                                              # works end to end; its numbers mean nothing

Steps: `daytune run`'s data and train stages on the recipe (a new run folder), then `daytune eval --run RUN
--with-base` on each suite: the unseen suite scores exactly the tasks the run's data held out. For every scenario
and metric the JSON has the base and tuned values with their 95% bootstrap CIs, the difference with its 95% CI
from a paired bootstrap over the instances both scored, its p-value and whether the CI excludes 0; then the
targets of the recipe (docs/eval.md): on the unseen suite, exact match up by at least 0.20 and rank accuracy up,
both beyond the CI, with at least 90% of the tuned answers a valid label (the exact match of the tasks with a label
set, and of all ten tasks, are judged apart); no quick-suite scenario worse beyond its CI. Wall times of each stage and the machine's load are recorded with them.

Writes benchmarks/results/outcome.json (--smoke: a temporary folder unless --out is given).
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


def smoke_recipe(work: Path) -> tuple[Path, list[str]]:
    """The instruct mix on the tiny random model of the test suite, a few seconds of training."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model

    model = build_tiny_model(work / "tiny-model")
    overrides = [
        f"model={model}",
        "data.max_seq_len=512",  # the tiny model's context
        "train.budget=15s",
        "train.eval_every=null",
        "train.checkpoint_every=1000",
        f"out_dir={work / 'runs'}",
    ]
    return ROOT / "examples" / "instruct-mix.yaml", overrides


def train(recipe: Path, overrides: list[str], reporter) -> tuple[object, dict]:
    """The data and train stages of `daytune run`: a new run folder with its prepared data and trained model."""
    from daytune.config import load_run_config
    from daytune.pipeline import start_or_resume, train_run

    cfg = load_run_config(recipe, overrides)
    t0 = time.perf_counter()
    cfg, run, _ = start_or_resume(cfg, ["benchmarks/outcome.py", str(recipe), *overrides], None, reporter)
    data_s = time.perf_counter() - t0
    result = train_run(cfg, run, reporter)
    return run, {"data_seconds": round(data_s, 1), "train_seconds": round(time.perf_counter() - t0 - data_s, 1),
                 "steps": result.steps, "stopped_by": result.stopped_by, "final_loss": result.final_loss,
                 "padding_waste": result.padding_waste, "examples": result.examples}  # fmt: skip


def score(run, suite: str, max_instances: int | None, bootstrap: int, out: Path, reporter) -> dict:
    """Base and tuned on one suite (daytune eval --run RUN --with-base); per-scenario values and paired deltas."""
    from daytune.models.trained import ModelSource
    from daytune.pipeline import SuiteRequest, evaluate_suite
    from daytune.track.runs import model_source

    source: ModelSource = model_source(run.path, log=reporter.log)
    req = SuiteRequest(suite, max_instances=max_instances, bootstrap=bootstrap)
    t0 = time.perf_counter()
    results = evaluate_suite(source, req, out / suite, reporter, with_base=True)
    seconds = time.perf_counter() - t0
    rows = json.loads((out / suite / "compare.json").read_text())["rows"]
    scenarios: dict[str, dict] = {}
    for r in rows:
        name, metric = r["scenario"], r["metric"]
        base = results["base"]["scenarios"][name]["metrics"][metric]
        tuned = results["tuned"]["scenarios"][name]["metrics"][metric]
        sc = scenarios.setdefault(
            name,
            {"n": r["n"], "main_metric": results["tuned"]["scenarios"][name]["main_metric"], "metrics": {}},
        )
        sc["metrics"][metric] = {
            "base": base["value"], "base_ci": [base["ci_low"], base["ci_high"]],
            "tuned": tuned["value"], "tuned_ci": [tuned["ci_low"], tuned["ci_high"]],
            "delta": r["delta"], "delta_ci": [r["ci_low"], r["ci_high"]], "p": r["p"],
            "significant": r["significant"], "better": r["better"], "higher_is_better": r["higher_is_better"],
        }  # fmt: skip
    return {"seconds": round(seconds, 1), "max_instances": max_instances, "scenarios": scenarios}


def targets(unseen: dict, quick: dict) -> dict:
    """The recipe's targets, each true or false, with the numbers it was judged on."""
    sni = unseen["scenarios"].get("sni", {}).get("metrics", {})
    em, rank, valid = sni.get("exact_match"), sni.get("rank_accuracy"), sni.get("valid_label")
    em_labels = sni.get("exact_match_labels")

    def up_020(m):
        return bool(m and m["delta"] >= 0.20 and m["delta_ci"][0] > 0)

    out = {
        # the tasks with a label set: where "a valid label" (the target's other half) is defined
        "unseen_exact_match_labels_up_0.20_beyond_ci": up_020(em_labels),
        # all ten tasks, free-text generation (summaries, rewrites) included
        "unseen_exact_match_up_0.20_beyond_ci": up_020(em),
        "unseen_rank_accuracy_up_beyond_ci": bool(rank and rank["delta_ci"][0] > 0),
        "unseen_valid_labels_at_least_0.90": bool(valid and valid["tuned"] >= 0.90),
    }
    regressions = [
        f"{name} {sc['main_metric']}"
        for name, sc in quick["scenarios"].items()
        if (m := sc["metrics"].get(sc["main_metric"])) and m["significant"] and m["better"] is False
    ]
    out["quick_no_regression_beyond_ci"] = not regressions
    out["quick_regressions"] = regressions
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "examples" / "instruct-mix.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    ap.add_argument("--unseen-instances", type=int, default=50, help="per held-out task")
    ap.add_argument(
        "--quick-instances", type=int, help="cap the quick suite's scenarios (default: the suite's)"
    )
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, seconds of training")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/outcome.json)")
    args = ap.parse_args()
    from daytune.progress import Reporter

    reporter = Reporter(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="daytune-outcome-"))
    recipe, overrides = (args.recipe, list(args.set))
    unseen_n, quick_n = args.unseen_instances, args.quick_instances
    if args.smoke:
        recipe, overrides = smoke_recipe(work)
        overrides += list(args.set)
        unseen_n, quick_n = 2, 2
    out = args.out or (
        work / "outcome.json" if args.smoke else ROOT / "benchmarks" / "results" / "outcome.json"
    )
    t0 = time.perf_counter()
    run, trained = train(recipe, overrides, reporter)
    unseen = score(run, "unseen", unseen_n, args.bootstrap, run.path / "outcome", reporter)
    quick = score(run, "quick", quick_n, args.bootstrap, run.path / "outcome", reporter)
    import torch

    result = {
        "benchmark": "outcome",
        "smoke": args.smoke,
        "recipe": str(
            recipe.resolve().relative_to(ROOT) if recipe.resolve().is_relative_to(ROOT) else recipe
        ),
        "overrides": overrides,
        "run": str(run.path),
        "train": trained,
        "unseen": unseen,
        "quick": quick,
        "targets": targets(unseen, quick),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    sni = unseen["scenarios"].get("sni", {}).get("metrics", {})
    for metric in ("exact_match", "exact_match_labels", "rank_accuracy", "valid_label"):
        if metric in sni:
            m = sni[metric]
            print(f"unseen {metric}: base {m['base']:.3f} -> tuned {m['tuned']:.3f}, Δ {m['delta']:+.3f} "
                  f"[{m['delta_ci'][0]:+.3f}, {m['delta_ci'][1]:+.3f}]")  # fmt: skip
    print(f"targets: {json.dumps(result['targets'])}")
    print(f"wall {result['wall_seconds']:.0f}s; results: {out}")


if __name__ == "__main__":
    main()
