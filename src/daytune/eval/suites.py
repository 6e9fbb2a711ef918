"""Named suites (which scenarios, how many instances, shots and perturbations) and the loop that runs one.

- `quick`: every scenario but summarization on the small samples shipped in examples/data/eval (a few CPU minutes
  for a 135M model); the quickstart's eval step runs it with fewer instances.
- `competition-open`: the challenge's open HELM run entries as closely as the datasets allow: the five MMLU
  subjects and TruthfulQA mc_single with HELM's canonical robustness and fairness perturbations, BBQ, GSM8K
  (5-shot chain of thought, up to 400 new tokens), XSum standing in for CNN/DailyMail, at most 1,000 instances per
  entry (HELM's default), plus OpenBookQA and WikiText-2.
- `full`: everything in the datasets folder: all 57 MMLU subjects, every instance.
- `neurips-open`: the open run entries as `helm-run` builds them (`daytune.eval.scenarios.helm`): HELM's prompts,
  examples, seeds, perturbations and metrics for the five MMLU subjects (robustness, and fairness as far as it
  works offline), TruthfulQA mc_single and GSM8K, at most 1,000 evaluation instances per entry (HELM Lite's cap);
  its numbers are the ones `helm-run` would report for the same model.
- `unseen`: Super-NaturalInstructions tasks held out of training (data recipes' `heldout_tasks:`; by default the
  ten of `data.heldout.UNSEEN_TASKS`), zero-shot, 50 instances per task; a run evaluates exactly the tasks its
  data held out (`with_tasks`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict
from pathlib import Path

from daytune.errors import ConfigError
from daytune.eval.lm import LM, Usage
from daytune.eval.metrics import bootstrap_ci
from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings, default_data_root
from daytune.eval.scenarios.base import SAMPLES
from daytune.eval.scenarios.sni import SNI

RF = ["robustness", "fairness"]

SUITES: dict[str, dict] = {
    "quick": {
        "data": "samples",
        "scenarios": {
            "mmlu": Settings(max_instances=5, perturbations=RF),  # 5 subjects x 5
            "truthfulqa": Settings(max_instances=16, perturbations=["robustness"]),
            "bbq": Settings(max_instances=24),
            "gsm8k": Settings(max_instances=5, max_new_tokens=160),
            "openbookqa": Settings(max_instances=20),
            "wikitext2": Settings(max_instances=3),
        },
    },
    "competition-open": {
        "data": "root",
        "scenarios": {
            "mmlu": Settings(max_instances=1000, perturbations=RF),
            "truthfulqa": Settings(max_instances=1000, perturbations=RF),
            "bbq": Settings(max_instances=1000),
            "gsm8k": Settings(max_instances=1000, max_new_tokens=400),
            "xsum": Settings(max_instances=1000, shots=1, max_words=400, max_new_tokens=64),
            "openbookqa": Settings(max_instances=1000),
            "wikitext2": Settings(),
        },
    },
    "full": {
        "data": "root",
        "scenarios": {
            "mmlu": Settings(subjects=["all"], perturbations=RF),
            "truthfulqa": Settings(perturbations=RF),
            "bbq": Settings(),
            "gsm8k": Settings(max_new_tokens=400),
            "xsum": Settings(shots=1, max_words=400, max_new_tokens=64),
            "openbookqa": Settings(),
            "wikitext2": Settings(),
        },
    },
    "unseen": {"data": "root", "scenarios": {"sni": dataclasses.replace(SNI.defaults(), max_instances=50)}},
    "neurips-open": {
        "data": "root",
        "scenarios": {
            "helm_mmlu": Settings(max_instances=1000, perturbations=RF),
            "helm_truthfulqa": Settings(max_instances=1000, perturbations=RF),
            "helm_gsm8k": Settings(max_instances=1000),
        },
    },
}


def suite_plan(
    suite: str,
    scenarios: list[str] | None = None,
    max_instances: int | None = None,
    subjects: list[str] | None = None,
) -> list[tuple[str, Settings]]:
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: not one of {', '.join(SUITES)}")
    plan = SUITES[suite]["scenarios"]
    names = list(plan)
    if scenarios:
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ConfigError(f"--scenarios: unknown {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
        names = scenarios
    out = []
    for name in names:
        s = copy.deepcopy(plan[name]) if name in plan else SCENARIOS[name].defaults()
        if max_instances is not None:
            s.max_instances = (
                max_instances if s.max_instances is None else min(s.max_instances, max_instances)
            )
        if subjects and SCENARIOS[name].takes_subjects:
            s.subjects = list(subjects)
        out.append((name, s))
    if subjects and not any(SCENARIOS[n].takes_subjects for n, _ in out):
        raise ConfigError(f"--subjects: none of {', '.join(names)} has subjects (mmlu, helm_mmlu, bbq do)")
    return out


def with_tasks(plan: list[tuple[str, Settings]], tasks: list[str] | None) -> list[tuple[str, Settings]]:
    """The plan with its SNI scenario evaluating `tasks` (a run's held-out tasks) instead of the default set."""
    if not tasks:
        return plan
    return [(n, dataclasses.replace(s, subjects=list(tasks)) if n == SNI.name else s) for n, s in plan]


def sni_tasks(plan: list[tuple[str, Settings]]) -> list[str]:
    """The SNI tasks a plan evaluates ([] when it has no SNI scenario)."""
    return [t for n, s in plan if n == SNI.name for t in (s.subjects or SNI.defaults().subjects)]


def suite_data_root(suite: str, data_root: str | Path | None) -> Path:
    if data_root:
        return Path(data_root).expanduser()
    return SAMPLES if SUITES[suite]["data"] == "samples" else default_data_root()


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 6)


def score_records(name: str, records: list[dict], bootstrap: int = 1000) -> dict:
    """Each metric of a scenario with its 95% bootstrap CI; metrics with no data are left out."""
    out = {}
    for metric, spec in SCENARIOS[name].metrics.items():
        value = spec.fn(records) if records else float("nan")
        if value is None or math.isnan(value):
            continue
        lo, hi = bootstrap_ci(records, spec.fn, iters=bootstrap) if bootstrap else (float("nan"),) * 2
        out[metric] = {
            "value": _clean(value),
            "ci_low": _clean(lo),
            "ci_high": _clean(hi),
            "higher_is_better": spec.higher_is_better,
        }
    return out


def run_suite(
    lm: LM,
    suite: str = "quick",
    data_root: str | Path | None = None,
    scenarios: list[str] | None = None,
    max_instances: int | None = None,
    bootstrap: int = 1000,
    log=print,
    plan: list[tuple[str, Settings]] | None = None,
    subjects: list[str] | None = None,
) -> dict:
    """Run a suite on one model (or an explicit `plan` of scenario settings); returns the JSON-ready results,
    per-instance records included."""
    plan = plan or suite_plan(suite, scenarios, max_instances, subjects)
    root = DataRoot(suite_data_root(suite, data_root))
    results = {"suite": suite, "model": lm.info(), "data_root": str(root.root), "scenarios": {}}
    t_all = time.perf_counter()
    loaded = [(name, s, SCENARIOS[name]()) for name, s in plan]
    # load every scenario's data first: data errors surface before any compute
    loaded = [(name, s, scen, scen.load(root, s)) for name, s, scen in loaded]
    for name, s, scen, instances in loaded:
        log(f"  {name}: {len(instances)} instances...")
        lm.usage = Usage()
        t0 = time.perf_counter()
        records, example = scen.run(lm, instances, s)
        seconds = time.perf_counter() - t0
        if lm.usage.truncated:  # never silent: the results and the table say how many prompts were cut
            log(f"  {name}: {lm.usage.truncated} requests had their prompt cut to fit the model's context")
        results["scenarios"][name] = {
            "description": scen.description,
            "main_metric": scen.main_metric,
            "n": len(records),
            "settings": asdict(s),
            "metrics": score_records(name, records, bootstrap),
            "efficiency": {**lm.usage.summary(), "wall_seconds": round(seconds, 2)},
            "truncated": lm.usage.truncated,
            "example": example,
            "records": records,
        }
        groups = scen.breakdown(records)
        if groups:
            results["scenarios"][name]["by_task"] = groups
    results["seconds"] = round(time.perf_counter() - t_all, 2)
    return results
