"""Finding runs: by folder path or by id (the folder's name, or a unique part of it) under the runs root, and the
one-line facts `daytune runs list` shows for each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from daytune.errors import RunError
from daytune.track.runstore import RunDir
from daytune.units import format_duration

RUNS_ENV = "DAYTUNE_RUNS"


def runs_root(given: str | Path | None = None) -> Path:
    """--runs-dir, else $DAYTUNE_RUNS, else ./runs (the recipes' default out_dir)."""
    return Path(given or os.environ.get(RUNS_ENV) or "runs")


def list_runs(root: Path) -> list[RunDir]:
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.yaml").is_file()]


def resolve_run(ref: str | Path, root: str | Path | None = None) -> RunDir:
    """A run folder path, or a run id under the runs root: the full folder name, or a part of it that only one
    run's name contains (e.g. the timestamp, or the recipe name when there is one such run)."""
    path = Path(ref)
    if (path / "config.yaml").is_file():
        return RunDir(path)
    base = runs_root(root)
    runs = list_runs(base)
    exact = [r for r in runs if r.run_id == str(ref)]
    if exact:
        return exact[0]
    matches = [r for r in runs if str(ref) in r.run_id]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(r.run_id for r in matches[:8])
        raise RunError(
            f"run id '{ref}' matches {len(matches)} runs under {base}: {names}; give more of the id"
        )
    if path.exists():
        raise RunError(f"{path} is not a daytune run folder (no config.yaml)")
    raise RunError(
        f"no run '{ref}': not a run folder, and no run id under {base} contains it "
        f"(see `daytune runs list`, or pass --runs-dir / set ${RUNS_ENV})"
    )


def run_facts(run: RunDir) -> dict[str, Any]:
    """What `runs list` shows, as data: id, model, method, data fingerprint, duration/budget, final loss, eval."""
    try:
        cfg = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    summary = run.read_summary()
    train = summary.get("train", {})
    lineage = run.read_json("lineage.json")
    fingerprint = (lineage.get("dataset") or {}).get("fingerprint")
    metrics = run.read_metrics() if not train else []
    elapsed = train.get("elapsed_seconds") or (metrics[-1].get("elapsed") if metrics else None)
    budget = train.get("budget_seconds")
    final_loss = train.get("final_loss", metrics[-1].get("loss") if metrics else None)
    if summary.get("finished"):
        status = "finished"
    elif train:
        status = f"stopped ({train.get('stopped_by')})"
    else:
        status = "running or killed" if metrics else "not started"
    return {
        "id": run.run_id,
        "path": str(run.path),
        "model": cfg.get("model", "?"),
        "method": (cfg.get("train") or {}).get("method", "?"),
        "data": fingerprint.split(":")[-1][:12] if fingerprint else None,  # sha256:<hex> -> 12 hex digits
        "elapsed_seconds": elapsed,
        "budget_seconds": budget,
        "duration": (format_duration(elapsed) if elapsed is not None else "-")
        + (f" / {format_duration(budget)}" if budget else ""),
        "steps": train.get("steps", metrics[-1].get("step") if metrics else None),
        "final_loss": final_loss,
        "eval": eval_headline(summary.get("eval") or _latest_eval(run)),
        "status": status,
    }


def _latest_eval(run: RunDir) -> dict[str, Any]:
    data = run.read_json("eval.json")
    return data.get("results", {}) if data else {}


def eval_headline(results: dict[str, Any] | None) -> str:
    """'acc 0.412 (+0.021)  loss 1.234 (-0.110)': the tuned model, and its change against the base model."""
    if not results:
        return "-"
    side = results.get("tuned") or results.get("base") or {}
    base = results.get("base") if "tuned" in results else None
    parts = []
    scenarios = (side.get("suite") or {}).get("scenarios") or {}
    if scenarios:  # the evaluation suite's headline: MMLU when it ran, else the first scenario
        name = "mmlu" if "mmlu" in scenarios else next(iter(scenarios))
        sc = scenarios[name]
        value = ((sc.get("metrics") or {}).get(sc.get("main_metric")) or {}).get("value")
        if isinstance(value, (int, float)):
            text = f"{name} {value:.3f}"
            ref_sc = (((base or {}).get("suite") or {}).get("scenarios") or {}).get(name) or {}
            ref = ((ref_sc.get("metrics") or {}).get(sc.get("main_metric")) or {}).get("value")
            if isinstance(ref, (int, float)):
                text += f" ({value - ref:+.3f})"
            parts.append(text)
    for label, section, key in (("acc", "multiple_choice", "accuracy"), ("loss", "heldout", "loss")):
        value = (side.get(section) or {}).get(key)
        if value is None:
            continue
        text = f"{label} {value:.3f}"
        ref = ((base or {}).get(section) or {}).get(key)
        if ref is not None:
            text += f" ({value - ref:+.3f})"
        parts.append(text)
    return "  ".join(parts) or "-"
