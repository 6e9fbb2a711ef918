"""Finding runs: by folder path or by id (the folder's name, or a unique part of it) under the runs root; the model
a run (or a W&B artifact) gives eval, serve, export and submit; the one-line facts `daytune runs list` shows for
each run, and what `daytune runs show` prints for one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from daytune.config import load_run_config
from daytune.errors import RunError
from daytune.models.trained import ModelSource
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


def model_source(
    run: str | Path | None = None,
    model: str | None = None,
    adapter: str | Path | None = None,
    *,
    runs_dir: str | Path | None = None,
    log=print,
) -> ModelSource:
    """What a command loads: --run RUN_DIR|run-id (the run's model and its adapter/ or model/), --model
    wandb:ENTITY/PROJECT/NAME:VERSION (the artifact's base model and adapter, pulled from W&B), or
    --model REF [--adapter DIR]. It lives here, not in models/, because runs and W&B artifacts are track's."""
    if run is not None:
        found = resolve_run(run, runs_dir)
        return ModelSource.of_run(
            found.path, load_run_config(found.path / "config.yaml").model, found.trained
        )
    if model.startswith("wandb:"):
        from daytune.track.artifacts import pull_wandb_model

        base, trained = pull_wandb_model(model, log)
        return ModelSource(base, trained)
    return ModelSource.of_model(model, adapter)


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
    elif summary.get("failed"):  # kept because it has checkpoints or metrics; resumable
        status = "failed"
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


RUNS_COLUMNS = [
    "id",
    "model",
    "method",
    "data",
    "time / budget",
    "steps",
    "final loss",
    "eval (tuned, Δ base)",
]


def _runs_rows(facts: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for f in facts:
        loss = "-" if f["final_loss"] is None else f"{f['final_loss']:.4f}"
        # a folder shows as its name
        model = Path(str(f["model"])).name if "/" in str(f["model"]) else str(f["model"])
        rows.append(
            [f["id"], model, f["method"], f["data"] or "-", f["duration"], f["steps"], loss, f["eval"]]
        )
    return [["-" if v is None else str(v) for v in row] for row in rows]


def runs_text(facts: list[dict[str, Any]]) -> str:
    """`runs list` piped: plain aligned columns, never cut to a terminal width."""
    rows = [RUNS_COLUMNS, *_runs_rows(facts)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(RUNS_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def runs_table(facts: list[dict[str, Any]], root: Path):
    """`runs list` on a terminal: a rich table."""
    from rich.table import Table

    table = Table(title=f"runs in {root}")
    for col in RUNS_COLUMNS:
        right = col in ("steps", "final loss")
        table.add_column(col, justify="right" if right else "left", no_wrap=col != RUNS_COLUMNS[-1])
    for row in _runs_rows(facts):
        table.add_row(*row)
    return table


def run_card(run: RunDir) -> str:
    """`runs show`: config, environment, results and lineage of one run, as rich markup."""
    from rich.markup import escape

    f = run_facts(run)
    summary, lineage = run.read_summary(), run.read_json("lineage.json")
    env, tracking = run.read_json("env.json"), run.read_json("tracking.json")
    train = summary.get("train", {})
    lines = [
        f"[bold]{escape(f['id'])}[/bold]  ({f['status']})",
        f"  folder     {run.path}",
        f"  model      {f['model']}  method {f['method']}",
        f"  data       {((lineage.get('dataset') or {}).get('train') or {}).get('path', '-')}  sha256 {f['data'] or '-'}",
        f"  time       {f['duration']}  steps {f['steps']}  stopped by {train.get('stopped_by', '-')}",
        f"  loss       final {f['final_loss']}  best val {train.get('best_val_loss')}",
        f"  speed      {train.get('tokens_per_s', '-')} tokens/s  padding {train.get('padding_waste', '-')}",
        f"  eval       {f['eval']}",
        f"  device     {env.get('device_name', '-')}  torch {env.get('torch', '-')}  cuda {env.get('cuda')}",
        f"  MFU peak   {tracking.get('peak_source', '-')}",
    ]
    command_file = run.path / "command.txt"
    command = command_file.read_text(encoding="utf-8").splitlines() if command_file.is_file() else []
    if command:
        lines.append(f"  command    {command[0]}")
    for name, ref in tracking.get("backends", {}).items():
        where = ref.get("url") or ref.get("dir") or ref.get("tracking_uri") or ""
        lines.append(f"  {name:<10} {'FAILED: ' + ref['error'] if ref.get('error') else where}")
    for out in lineage.get("outputs", []):
        refs = ", ".join(f"{k}: {v}" for k, v in (out.get("artifacts") or {}).items())
        lines.append(
            f"  output     {out['path']}/ (step {out.get('step')})" + (f"  [{refs}]" if refs else "")
        )
    kept = [c for c in lineage.get("checkpoints", []) if (run.path / c["path"]).is_dir()]
    lines.append(f"  checkpoints {len(lineage.get('checkpoints', []))} saved, {len(kept)} kept")
    for ev in lineage.get("evaluations", []):
        lines.append(f"  evaluated  {ev['time']} -> {ev['results']}")
    return lines[0] + "\n" + escape("\n".join(lines[1:]))  # paths and commands hold [brackets]


def run_findings(run: RunDir) -> list:
    """The doctor's findings for a run: those it saved (doctor.json), else diagnosed now."""
    from daytune.track.doctor import Finding, diagnose

    doctor = run.read_json("doctor.json")
    return [Finding(**x) for x in doctor.get("findings", [])] if doctor else diagnose(run)
