"""Results files and tables: results.json (machine-readable, per-instance records included), a markdown table,
the comparison of two results files with per-scenario deltas, paired-bootstrap CIs and significance, and the
lm-eval harness tasks' table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from daytune.errors import DataError
from daytune.eval.metrics import paired_bootstrap
from daytune.eval.scenarios import SCENARIOS
from daytune.fileio import write_json_atomic, write_text_atomic


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if abs(v) >= 100 else f"{v:.4f}"


def _ci(m: dict) -> str:
    if m.get("ci_low") is None:
        return ""
    return f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"


def markdown_table(results: dict) -> str:
    """One row per (scenario, metric): value, 95% CI, instances; then efficiency per scenario."""
    title = results.get("title") or results.get("model", {}).get("name", "model")
    lines = [
        f"## {title}: suite `{results.get('suite')}`",
        "",
        "| scenario | metric | value | 95% CI | n |",
        "|---|---|---:|---|---:|",
    ]
    for name, sc in results["scenarios"].items():
        for metric, m in sc["metrics"].items():
            hib = m.get("higher_is_better", True)
            arrow = "" if hib else " (lower is better)" if hib is False else " (0 is unbiased)"
            lines.append(f"| {name} | {metric}{arrow} | {_fmt(m['value'])} | {_ci(m)} | {sc['n']} |")
    for name, sc in results["scenarios"].items():
        if sc.get("by_task"):
            lines += [
                "",
                f"{name} by task:",
                "",
                "| task | n | exact match | ROUGE-L | rank accuracy | valid label |",
            ]
            lines.append("|---|---:|---:|---:|---:|---:|")
            for task, t in sc["by_task"].items():
                cells = [_fmt(t.get(k)) for k in ("exact_match", "rouge_l", "rank_accuracy", "valid_label")]
                lines.append(f"| {task} | {t['n']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| scenario | requests | prompts cut to fit | latency/request (s) | tokens/s | wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, sc in results["scenarios"].items():
        e = sc["efficiency"]
        lines.append(
            f"| {name} | {e['requests']} | {sc.get('truncated', 0)} | {_fmt(e['latency_mean_s'])} "
            f"| {_fmt(e['tokens_per_s'])} | {e['wall_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    j = write_json_atomic(out_dir / "results.json", results)
    m = write_text_atomic(out_dir / "results.md", markdown_table(results))
    return j, m


def load_results(path: str | Path) -> dict:
    """A results.json, or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise DataError(f"results file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), dict):
        raise DataError(f"{p}: not a daytune results file (no 'scenarios')")
    data["_path"] = str(p)
    return data


MIN_PAIRED = 10  # instances both runs scored, for a significance verdict


def compare(a: dict, b: dict, iters: int = 1000) -> list[dict]:
    """B minus A for every metric both have, on the instances both scored (paired bootstrap over instances)."""
    rows = []
    for name, sa in a["scenarios"].items():
        sb = b["scenarios"].get(name)
        if sb is None or name not in SCENARIOS:
            continue
        ra = {r["id"]: r for r in sa.get("records", [])}
        rb = {r["id"]: r for r in sb.get("records", [])}
        shared = [i for i in ra if i in rb]
        for metric, spec in SCENARIOS[name].metrics.items():
            if metric not in sa["metrics"] or metric not in sb["metrics"]:
                continue
            row = {
                "scenario": name,
                "metric": metric,
                "n": len(shared),
                "higher_is_better": spec.higher_is_better,
            }
            if shared:
                xa, xb = [ra[i] for i in shared], [rb[i] for i in shared]
                va, vb = spec.fn(xa), spec.fn(xb)
                lo, hi, p = paired_bootstrap(xa, xb, spec.fn, iters=iters)
            else:  # no common instances: the stored values, no test
                va, vb = sa["metrics"][metric]["value"], sb["metrics"][metric]["value"]
                lo = hi = p = float("nan")
            delta = vb - va
            # a bootstrap over a handful of instances understates the spread: no verdict below MIN_PAIRED
            significant = len(shared) >= MIN_PAIRED and not math.isnan(lo) and (lo > 0 or hi < 0)
            if not significant:
                better = None
            elif spec.higher_is_better is None:  # bias: closer to 0 is better
                better = abs(vb) < abs(va)
            else:
                better = (delta > 0) == spec.higher_is_better
            row.update(
                a=va, b=vb, delta=delta, ci_low=lo, ci_high=hi, p=p, significant=significant, better=better
            )
            rows.append(row)
    return rows


def compare_markdown(rows: list[dict], a_name: str, b_name: str) -> str:
    lines = [
        f"## {b_name} vs {a_name}",
        "",
        f"Δ = B - A on the instances both scored; 95% CI from a paired bootstrap; * = the CI excludes 0 "
        f"(judged only with at least {MIN_PAIRED} instances).",
        "",
        "| scenario | metric | A | B | Δ | 95% CI of Δ | p | n |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        mark = " *" if r["significant"] else ""
        ci = "" if math.isnan(r["ci_low"]) else f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        p = "" if math.isnan(r["p"]) else f"{r['p']:.3f}"
        verdict = "" if r["better"] is None else (" (better)" if r["better"] else " (worse)")
        lines.append(
            f"| {r['scenario']} | {r['metric']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {r['delta']:+.4f}{mark}{verdict} "
            f"| {ci} | {p} | {r['n']} |"
        )
    return "\n".join(lines) + "\n"


def harness_markdown(summary: dict) -> str:
    """lm-eval tasks' metrics (`harness_summary`): one row per (task, metric)."""
    lines = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in summary.items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(lines)
