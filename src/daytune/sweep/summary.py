"""What a sweep reports: every trial (parameters, state, objective and test values, its run), the best trial and
the starting recipe's trial, how well the validation objective predicts the test suite (Spearman rank correlation
over the finished trials) and Optuna's own field importances; sweep.json, best.yaml and the HTML page."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daytune.fileio import write_text_atomic
from daytune.units import format_duration

if TYPE_CHECKING:
    from daytune.sweep.runner import Sweep


def suite_value(summary: dict, metric: str | None) -> float | None:
    """A suite summary's value: the mean of `metric` (each scenario's main metric when None) over the
    scenarios that have it."""
    values = []
    for sc in summary.get("scenarios", {}).values():
        m = (sc.get("metrics") or {}).get(metric or sc.get("main_metric")) or {}
        if isinstance(m.get("value"), (int, float)):
            values.append(float(m["value"]))
    return float(np.mean(values)) if values else None


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks with ties averaged (what Spearman's correlation needs)."""
    arr = np.asarray(values, dtype=float)
    order = np.argsort(arr, kind="stable")
    ranks = np.empty(len(arr))
    ranks[order] = np.arange(1, len(arr) + 1)
    for v in np.unique(arr):
        tied = arr == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (None below 3 pairs, or when one side has no spread)."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _trial_row(t, started: float, sign: float) -> dict[str, Any]:
    a = t.user_attrs
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "objective": t.value,
        "test": (a.get("scores") or {}).get("test"),
        "run_dir": a.get("run_dir"),
        "worker": a.get("worker"),
        "started": round(a["started"] - started, 1) if a.get("started") else None,
        "ended": round(a["ended"] - started, 1) if a.get("ended") else None,
        "eval_seconds": a.get("eval_seconds"),
        "train": a.get("train"),
        "val_loss": {int(k): sign * v for k, v in sorted(t.intermediate_values.items())},
        "starting_recipe": bool(a.get("starting_recipe")),
    }


def _importances(study) -> dict[str, Any]:
    """Optuna's field importances over the finished trials (its default evaluator)."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {"error": f"needs at least 2 finished trials ({len(done)} so far)"}
    try:
        return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def state(sw: Sweep, study, final: bool = False) -> dict[str, Any]:
    """sweep.json: the whole sweep as it stands (rewritten after every trial and at the end)."""
    attrs = study.user_attrs
    shared = attrs["sweep"]
    direction = sw.spec.direction()
    sign = -1.0 if direction == "maximize" else 1.0
    trials = [_trial_row(t, shared["started"], sign) for t in study.get_trials(deepcopy=False)]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    better = max if direction == "maximize" else min
    best = better(done, key=lambda t: t["value"]) if done else None
    out: dict[str, Any] = {
        "name": sw.spec.name,
        "spec_file": sw.spec.file,
        "folder": str(sw.folder.resolve()),
        "storage": sw.storage,
        "study": study.study_name,
        "direction": direction,
        "objective": vars(sw.spec.objective),
        "test": vars(sw.spec.test) if sw.spec.test else None,
        "budget_seconds": sw.spec.budget_seconds(),
        "trial_budget_seconds": sw.trial_budget,
        "started": shared["started"],
        "deadline": shared["deadline"],
        "final": final,
        "calibration": {k: attrs.get(k) for k in ("data_seconds", "eval_seconds", "base")},
        "trials": trials,
        "counts": {
            s: sum(1 for t in trials if t["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
        },
        "best": best,
        "starting_recipe": next((t for t in trials if t["starting_recipe"]), None),
        "rank_correlation": _correlation(done, direction, sw),
        "importances": _importances(study),
        "pruning": _pruning(done, sw),
    }
    if final:
        import time

        out["ended"] = time.time()
        out["wall_seconds"] = round(out["ended"] - shared["started"], 2)
    if best and best["run_dir"] and Path(best["run_dir"]).is_dir():
        from daytune.sweep.runner import best_recipe

        path = write_text_atomic(sw.folder / "best.yaml", best_recipe(sw, Path(best["run_dir"])))
        out["retrain"] = {
            "recipe": str(path),
            "command": f"daytune run {path}  (or: daytune sweep {sw.folder} --retrain)",
        }
    return out


def _pruning(done: list[dict], sw: Sweep) -> dict[str, Any]:
    """Could the pruner act at all? It sees a trial only at its validation losses: trials too short to reach
    the first one cannot be stopped early, and the user should know the pruner did nothing for that reason."""
    steps = [(t.get("train") or {}).get("steps") for t in done]
    steps = [n for n in steps if n is not None]
    seen = sum(1 for t in done if t["val_loss"])
    out: dict[str, Any] = {
        "kind": sw.spec.pruner.kind,
        "eval_every": sw.spec.pruner.eval_every,
        "min_resource": sw.spec.pruner.min_resource,
        "trials_with_validation": seen,
        "trial_steps": [min(steps), max(steps)] if steps else None,
        "note": None,
    }
    if done and not seen and sw.spec.pruner.kind != "none":
        out["note"] = (
            f"no finished trial reached its first validation loss (pruner.eval_every {sw.spec.pruner.eval_every}; "
            f"trials made {min(steps, default=0)}-{max(steps, default=0)} steps): nothing could be pruned. Lower "
            "pruner.eval_every (and min_resource) or raise trial_budget"
        )
    return out


def _correlation(done: list[dict], direction: str, sw: Sweep) -> dict[str, Any]:
    """Does the validation objective rank trials as the test suite does? Both sides are oriented so that higher
    is better before ranking: +1 means the same order, 0 none, -1 the reverse."""
    from daytune.sweep.spec import objective_direction

    pairs = [
        (t["objective"], t["test"]) for t in done if t["objective"] is not None and t["test"] is not None
    ]
    if sw.spec.test is None:
        return {"spearman": None, "n": 0, "note": "no test suite"}
    test_dir = objective_direction(sw.spec.test)
    x = [v if direction == "maximize" else -v for v, _ in pairs]
    y = [v if test_dir == "maximize" else -v for _, v in pairs]
    r = spearman(x, y)
    note = None if r is not None else "needs at least 3 finished trials whose values differ"
    return {"spearman": None if r is None else round(r, 4), "n": len(pairs), "note": note}


def write_best(sw: Sweep, study, reporter) -> None:
    """After every finished trial: sweep.json and best.yaml as they stand (a sweep cut short keeps them)."""
    from daytune.sweep.runner import _write_state

    _write_state(sw, study)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def text(st: dict) -> str:
    """The sweep's closing table for the terminal."""
    lines = [f"sweep {st['name']}: {', '.join(f'{n} {s.lower()}' for s, n in st['counts'].items() if n)}"]
    lines.append("trial  state     objective  test      steps  stopped by       params")
    for t in st["trials"]:
        train = t.get("train") or {}
        mark = " (recipe)" if t["starting_recipe"] else ""
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t["params"].items())
        lines.append(
            f"{t['number']:<6} {t['state']:<9} {_fmt(t['objective']):<10} {_fmt(t['test']):<9} "
            f"{_fmt(train.get('steps')):<6} {_fmt(train.get('stopped_by')):<16} {params}{mark}"
        )
    if st["best"]:
        b, s = st["best"], st["starting_recipe"]
        lines.append(f"best: trial {b['number']} objective {_fmt(b['value'])} ({b['run_dir']})")
        if s and s["state"] == "COMPLETE" and s["number"] != b["number"]:
            lines.append(f"  vs the starting recipe (trial {s['number']}): {_fmt(s['value'])}")
    rc = st["rank_correlation"]
    lines.append(
        f"validation vs test: Spearman {_fmt(rc['spearman'])} over {rc['n']} trials"
        + (f" ({rc['note']})" if rc.get("note") else "")
    )
    if (st.get("pruning") or {}).get("note"):
        lines.append(f"pruning: {st['pruning']['note']}")
    imp = st["importances"]
    lines.append(
        "importances: "
        + (imp["error"] if "error" in imp else ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    )
    if st.get("wall_seconds") is not None:
        lines.append(
            f"wall time {format_duration(st['wall_seconds'])} of a {format_duration(st['budget_seconds'])} budget"
        )
    return "\n".join(lines)


def write_report(folder: Path, st: dict) -> Path:
    from daytune.track import RunDir
    from daytune.track.report import write_sweep_report

    runs = [
        RunDir(Path(t["run_dir"]))
        for t in st["trials"]
        if t["run_dir"] and (Path(t["run_dir"]) / "config.yaml").is_file()
    ]
    return write_sweep_report(st, runs, folder / "report.html")
