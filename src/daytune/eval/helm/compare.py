"""Read a `helm-run` output folder beside daytune's results for the same run entry, and say where they differ.

HELM writes, per run: `scenario_state.json` (each request: the instance, its perturbation, the prompt and the
completion), `per_instance_stats.json` (each instance's scores) and `stats.json` (the aggregates, by split and
perturbation). daytune's `neurips-open` records carry HELM's instance ids, so each request, each score and each
aggregate is matched one to one.
"""

from __future__ import annotations

import json
from pathlib import Path

from daytune.eval.helm.perturbations import GROUPS

_GROUP_FLAG = {"robustness": "robustness", "fairness": "fairness"}


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _perturbation(obj: dict) -> str | None:
    p = obj.get("perturbation")
    return p["name"] if p else None


def compare_run(
    run_dir: str | Path, name: str, scenario: dict, group: str | None = None, tol: float = 1e-6
) -> dict:
    """`scenario`: the results of daytune's scenario `name` (records included, as in results.json); `group`:
    the MMLU subject of this HELM run (daytune's aggregates are recomputed on its records). Returns counts of
    what agrees, the aggregate pairs and a list of every difference."""
    from daytune.eval.scenarios import SCENARIOS

    run = Path(run_dir)
    states = _load(run / "scenario_state.json")["request_states"]
    per_instance = _load(run / "per_instance_stats.json")
    stats = _load(run / "stats.json")
    key = f"{group}/" if group else ""
    records = {r["id"]: r for r in scenario["records"] if r["id"].startswith(key)}
    diffs: list[str] = []
    counts = {"requests": len(states), "prompts_equal": 0, "completions_equal": 0, "scores_equal": 0}
    metric_names = [m for m in scenario["metrics"] if not m.endswith(("_robustness", "_fairness"))]
    metric_names = [m for m in metric_names if not m.startswith("ece_")]

    def ours(inst_id: str, pert: str | None) -> dict | None:
        rec = records.get(key + inst_id)
        if rec is None or pert is None:
            return rec
        return rec["perturbed"].get(pert)

    for st in states:
        inst = st["instance"]
        pert = _perturbation(inst)
        row = ours(inst["id"], pert)
        where = f"{inst['id']} ({pert or 'original'})"
        if row is None:
            diffs.append(f"{where}: HELM sent this request; daytune has no such instance")
            continue
        if row["prompt"] == st["request"]["prompt"]:
            counts["prompts_equal"] += 1
        else:
            diffs.append(f"{where}: prompts differ")
        text = st["result"]["completions"][0]["text"]
        if row["completion"] == text:
            counts["completions_equal"] += 1
        else:
            diffs.append(f"{where}: completion {row['completion']!r} vs HELM's {text!r}")
    run_groups = {
        g for s in states if s["instance"].get("perturbation") for g in GROUPS
        if s["instance"]["perturbation"].get(_GROUP_FLAG[g])
    }  # fmt: skip
    run_perturbations = {n for g in run_groups for n in GROUPS[g]}
    helm_pairs = {(_perturbation(s["instance"]), s["instance"]["id"]) for s in states}
    daytune_pairs = {
        (p, r["helm_id"]) for r in records.values() for p in [None, *r["perturbed"]]
        if p is None or p in run_perturbations
    }  # fmt: skip
    for pert, inst_id in sorted(daytune_pairs - helm_pairs, key=str):
        diffs.append(f"{inst_id} ({pert or 'original'}): daytune scored it; HELM sent no such request")
    for entry in per_instance:
        pert = _perturbation(entry)
        row = ours(entry["instance_id"], pert)
        if row is None:
            continue
        theirs = {s["name"]["name"]: s["mean"] for s in entry["stats"] if "mean" in s}
        bad = [m for m in metric_names if m in theirs and abs(theirs[m] - row[m]) > tol]
        if bad:
            diffs.append(f"{entry['instance_id']} ({pert or 'original'}): scores differ on {', '.join(bad)}")
        else:
            counts["scores_equal"] += 1
    aggregates = []
    for metric, spec in SCENARIOS[name].metrics.items():
        value = spec.fn(list(records.values()))
        base, _, suffix = metric.rpartition("_")
        name, pert = (base, suffix) if suffix in GROUPS else (metric, None)
        if pert and pert not in run_groups:
            continue  # this HELM run has no such perturbation
        helm = [
            s["mean"]
            for s in stats
            if s["name"]["name"] == name
            and (
                (pert is None and "perturbation" not in s["name"])
                or (pert and s["name"].get("perturbation", {}).get("name") == pert
                    and s["name"]["perturbation"].get("computed_on") == "worst")
            )
        ]  # fmt: skip
        if not helm or value != value:  # no such stat, or no value (NaN) on daytune's side
            continue
        ok = abs(helm[0] - value) <= tol
        aggregates.append({"metric": metric, "helm": helm[0], "daytune": value, "equal": ok})
        if not ok:
            diffs.append(f"{metric}: daytune {value} vs HELM {helm[0]}")
    return {"run": run.name, **counts, "aggregates": aggregates, "differences": diffs}


def seed_helm_data(
    data_root: str | Path, output: str | Path, mmlu: list[str] = (), bbq: list[str] = ()
) -> None:
    """Put the datasets folder's copies where `helm-run` looks before it downloads (`<output>/scenarios/...`),
    in the layout HELM downloads: MMLU without a header and with answer letters, TruthfulQA's CSV, GSM8K's
    JSON lines and BBQ's per-category files as they are. HELM then reads them and downloads nothing."""
    import csv
    import shutil

    data, scen = Path(data_root), Path(output) / "scenarios"
    for subject in mmlu:
        for split in ("dev", "val", "test"):
            src = data / "mmlu" / split / f"{subject}_{split}.csv"
            if not src.exists():
                continue
            dst = scen / "mmlu" / "data" / split / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(src, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            with open(dst, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(
                    [r["question"], *(r[f"choice{i}"] for i in range(4)), "ABCD"[int(r["answer"])]]
                    for r in rows
                )
    copies = {
        data / "truthfulqa" / "TruthfulQA.csv": scen / "truthful_qa" / "data" / "TruthfulQA.csv",
        data / "gsm8k" / "train.jsonl": scen / "gsm" / "gsm_data_train",
        data / "gsm8k" / "test.jsonl": scen / "gsm" / "gsm_data_test",
        **{data / "bbq" / f"{c}.jsonl": scen / "bbq" / "data" / c for c in bbq},
    }
    for src, dst in copies.items():
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
