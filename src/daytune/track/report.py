"""`daytune runs compare ID1 ID2 ... --out report.html`: one self-contained HTML file (inline CSS and SVG charts
drawn by matplotlib; no script, no font, no image fetched from anywhere) that opens offline in any browser.

Sections: the runs side by side; loss curves (by step and by time), throughput, memory and device load over
time; evaluation tables with 95 % confidence intervals; the configuration keys that differ; the doctor's findings;
provenance (data fingerprint, git commit, device, versions)."""

from __future__ import annotations

import html
import io
import math
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from daytune.errors import DaytuneError
from daytune.fileio import write_text_atomic
from daytune.track.backends import flatten
from daytune.track.doctor import Finding, diagnose
from daytune.track.runs import run_facts
from daytune.track.runstore import RunDir

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
IGNORED_KEYS = ("out_dir",)  # differs between every pair of machines, says nothing about the run

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:6px}
.sub{color:#5b6474;font-size:14px;margin-bottom:18px}
table{border-collapse:collapse;background:#fff;font-size:13.5px;margin:6px 0 12px;box-shadow:0 1px 2px #0001}
th,td{padding:6px 10px;border-bottom:1px solid #e7eaee;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.chart{background:#fff;box-shadow:0 1px 2px #0001;padding:6px} .chart svg{width:100%;height:auto;display:block}
.ok{color:#1a7f37} .warn{color:#b42318;font-weight:600} .info{color:#3b5bdb}
.rec{color:#4a5363;font-size:12.5px} .muted{color:#7a8394} code{font-size:12.5px}
details{margin:4px 0 10px} summary{cursor:pointer;color:#3b5bdb}
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.{digits}g}"
    return str(v)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (honest at small n, unlike acc ± 1.96·stderr)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _system_clock(r) -> list[float]:
    """System sample times on the metrics' clock (seconds since the train stage started), when both have wall time."""
    first = next((m for m in r.metrics if "time" in m), None)
    if first is None:
        return [s["elapsed"] for s in r.system]
    origin = first["time"] - first["elapsed"]
    return [s["time"] - origin for s in r.system]


class _RunData:
    def __init__(self, run: RunDir, index: int):
        self.run, self.color = run, COLORS[index % len(COLORS)]
        self.id = run.run_id
        self.config = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8")) or {}
        self.metrics = run.read_metrics()
        self.system = run.read_system()
        self.summary = run.read_summary()
        self.facts = run_facts(run)
        self.env = run.read_json("env.json")
        self.lineage = run.read_json("lineage.json")
        self.tracking = run.read_json("tracking.json")
        doctor = run.read_json("doctor.json")
        self.findings = (
            [Finding(**f) for f in doctor.get("findings", [])]
            if doctor
            else (diagnose(run) if self.metrics else [])
        )
        self.eval = self.summary.get("eval") or (run.read_json("eval.json").get("results") or {})
        git = (run.path / "git.txt").read_text(encoding="utf-8") if (run.path / "git.txt").is_file() else ""
        self.commit = next(
            (ln.split(": ", 1)[1][:12] for ln in git.splitlines() if ln.startswith("commit: ")), "-"
        )
        self.dirty = "dirty: yes" in git


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG is inlined into HTML


def _chart(
    title: str, xlabel: str, ylabel: str, series: list[tuple[_RunData, list, list, dict]]
) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [s for s in series if s[1]]
    if not series:
        return None
    plt.rcParams.update({"svg.hashsalt": "daytune", "font.size": 9})
    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    for data, xs, ys, style in series:
        if len(xs) < 30:  # a few points: show each one (a single step is otherwise invisible)
            style.setdefault("marker", "o")
            style.setdefault("markersize", 3.5)
        ax.plot(xs, ys, color=data.color, linewidth=1.6, label=style.pop("label", data.id), **style)
    if xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10.5, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e5e8ec", linewidth=0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=7.5, frameon=False)
    out = _svg(fig)
    plt.close(fig)
    return out


def _charts(runs: list[_RunData]) -> list[str]:
    charts = []
    loss = []
    for r in runs:
        loss.append(
            (r, [m["step"] for m in r.metrics], [m["loss"] for m in r.metrics], {"label": f"{r.id} train"})
        )
        val = [m for m in r.metrics if m.get("val_loss") is not None]
        if val:
            loss.append(
                (
                    r,
                    [m["step"] for m in val],
                    [m["val_loss"] for m in val],
                    {"label": f"{r.id} val", "ls": "--"},
                )
            )
    charts.append(_chart("Training loss by optimizer step", "step", "loss (response tokens)", loss))
    charts.append(
        _chart(
            "Training loss by wall-clock time",
            "seconds since the train stage started",
            "loss",
            [(r, [m["elapsed"] for m in r.metrics], [m["loss"] for m in r.metrics], {}) for r in runs],
        )
    )
    charts.append(
        _chart(
            "Throughput over time",
            "seconds since the train stage started",
            "non-padding tokens / s",
            [
                (r, [m["elapsed"] for m in r.metrics], [m["tokens_per_s"] for m in r.metrics], {})
                for r in runs
            ],
        )
    )
    gpu = any(s.get("gpus") for r in runs for s in r.system)
    if gpu:
        memory = [
            (
                r,
                [x for x, s in zip(_system_clock(r), r.system) if s.get("gpus")],
                [s["gpus"][0]["mem_used_mb"] / 1024 for s in r.system if s.get("gpus")],
                {},
            )
            for r in runs
        ]
        charts.append(
            _chart(
                "GPU memory over time (NVML, GPU 0)", "seconds since the train stage started", "GiB", memory
            )
        )
        load = [
            (
                r,
                [x for x, s in zip(_system_clock(r), r.system) if s.get("gpus")],
                [s["gpus"][0]["util"] for s in r.system if s.get("gpus")],
                {},
            )
            for r in runs
        ]
        charts.append(
            _chart("GPU utilization over time", "seconds since the train stage started", "% busy", load)
        )
    else:
        memory = [(r, _system_clock(r), [s["rss_mb"] / 1024 for s in r.system], {}) for r in runs]
        charts.append(
            _chart(
                "Memory over time (resident, the training process)",
                "seconds since the train stage started",
                "GiB",
                memory,
            )
        )
        load = [(r, _system_clock(r), [s["cpu_percent"] / 100 for s in r.system], {}) for r in runs]
        charts.append(
            _chart(
                "CPU load over time (the training process)",
                "seconds since the train stage started",
                "cores busy",
                load,
            )
        )
    charts.append(
        _chart(
            "Learning rate",
            "step",
            "lr",
            [(r, [m["step"] for m in r.metrics], [m["lr"] for m in r.metrics], {}) for r in runs],
        )
    )
    return [c for c in charts if c]


def _runs_table(runs: list[_RunData]) -> str:
    head = (
        "<tr><th>run</th><th>model</th><th>method</th><th>steps</th><th>time / budget</th><th>final loss</th>"
        "<th>best val loss</th><th>tokens/s (median)</th><th>MFU (median)</th><th>peak memory</th><th>status</th></tr>"
    )
    rows = []
    for r in runs:
        tps = [m["tokens_per_s"] for m in r.metrics[1:] or r.metrics if m.get("tokens_per_s")]
        mfu = [m["mfu"] for m in r.metrics[1:] or r.metrics if m.get("mfu") is not None]
        train = r.summary.get("train", {})
        peak_gpu = max([g.get("mem_used_mb") or 0 for s in r.system for g in s.get("gpus", [])], default=0)
        peak = (
            f"{peak_gpu / 1024:.1f} GiB GPU"
            if peak_gpu
            else (f"{train['peak_rss_mb'] / 1024:.1f} GiB RAM" if train.get("peak_rss_mb") else "-")
        )
        tps_cell = f"{statistics.median(tps):,.0f}" if tps else "-"
        mfu_cell = f"{100 * statistics.median(mfu):.2f} %" if mfu else "-"
        rows.append(
            f"<tr><td><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</td>"
            f"<td>{html.escape(str(r.facts['model']))}</td><td>{html.escape(str(r.facts['method']))}</td>"
            f"<td class='num'>{_fmt(r.facts['steps'])}</td><td class='num'>{html.escape(r.facts['duration'])}</td>"
            f"<td class='num'>{_fmt(r.facts['final_loss'])}</td><td class='num'>{_fmt(train.get('best_val_loss'))}</td>"
            f"<td class='num'>{tps_cell}</td><td class='num'>{mfu_cell}</td><td class='num'>{peak}</td>"
            f"<td>{html.escape(r.facts['status'])}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _eval_tables(runs: list[_RunData]) -> str:
    rows = []
    for r in runs:
        for side in ("base", "tuned"):
            res = r.eval.get(side)
            if not res:
                continue
            mc, ho = res.get("multiple_choice") or {}, res.get("heldout") or {}
            if mc.get("n"):
                lo, hi = wilson(mc.get("correct", round(mc["accuracy"] * mc["n"])), mc["n"])
                acc = f"{mc['accuracy']:.3f}"
                ci = f"[{lo:.3f}, {hi:.3f}]"
                n = f"{mc['n']}"
            else:
                acc = ci = n = "-"
            rows.append(
                f"<tr><td><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</td>"
                f"<td>{side}</td><td class='num'>{acc}</td><td class='num'>{ci}</td><td class='num'>{n}</td>"
                f"<td class='num'>{_fmt(ho.get('loss'))}</td><td class='num'>{_fmt(ho.get('perplexity'))}</td>"
                f"<td class='num'>{_fmt(ho.get('rows'))}</td><td class='num'>{_fmt(ho.get('tokens'))}</td></tr>"
            )
    suite = _suite_table(runs)
    if not rows:
        return suite or (
            "<p class='muted'>No evaluation recorded for these runs (run <code>daytune eval --run ID</code>).</p>"
        )
    head = (
        "<tr><th>run</th><th>model</th><th>multiple-choice accuracy</th><th>95 % CI (Wilson)</th><th>questions</th>"
        "<th>held-out loss</th><th>perplexity</th><th>rows</th><th>scored tokens</th></tr>"
    )
    note = (
        "<p class='rec'>Accuracy intervals are 95 % Wilson score intervals over the questions asked: two runs whose "
        "intervals overlap widely are not distinguishable on this many questions. Held-out loss is the mean over the "
        "scored response tokens.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{note}{suite}"


def _suite_table(runs: list[_RunData]) -> str:
    """The evaluation suite's scenarios (HELM-style), each metric with its bootstrap 95 % interval."""
    rows = []
    for r in runs:
        for side, key in (("base", "suite"), ("tuned", "suite"), ("tuned (test)", "test_suite")):
            scenarios = ((r.eval.get(side.split()[0]) or {}).get(key) or {}).get("scenarios") or {}
            for name, sc in scenarios.items():
                for metric, m in (sc.get("metrics") or {}).items():
                    if not isinstance(m, dict) or m.get("value") is None:
                        continue
                    lo, hi = m.get("ci_low"), m.get("ci_high")
                    ci = f"[{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "-"
                    main = " (main)" if metric == sc.get("main_metric") else ""
                    rows.append(
                        f"<tr><td><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</td>"
                        f"<td>{side}</td><td>{html.escape(name)}</td><td>{html.escape(metric)}{main}</td>"
                        f"<td class='num'>{_fmt(m['value'])}</td><td class='num'>{ci}</td>"
                        f"<td class='num'>{_fmt(sc.get('n'))}</td></tr>"
                    )
    if not rows:
        return ""
    head = (
        "<tr><th>run</th><th>model</th><th>scenario</th><th>metric</th><th>value</th>"
        "<th>95 % CI (bootstrap)</th><th>instances</th></tr>"
    )
    return f"<h3>Evaluation suite</h3><table>{head}{''.join(rows)}</table>"


def _config_diff(runs: list[_RunData]) -> str:
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats))
    differ = [k for k in keys if k not in IGNORED_KEYS and len({repr(f.get(k)) for f in flats}) > 1]
    same = [k for k in keys if k not in differ and k not in IGNORED_KEYS]
    head = (
        "<tr><th>key</th>"
        + "".join(
            f"<th><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</th>"
            for r in runs
        )
        + "</tr>"
    )

    def rows(ks):
        return "".join(
            f"<tr><td><code>{html.escape(k)}</code></td>"
            + "".join(f"<td>{html.escape(_fmt(f.get(k)))}</td>" for f in flats)
            + "</tr>"
            for k in ks
        )

    if len(runs) == 1:
        body = "<p class='muted'>One run: nothing to compare; its whole configuration follows.</p>"
    elif differ:
        body = f"<table>{head}{rows(differ)}</table>"
    else:
        body = "<p>The runs share the same configuration.</p>"
    label = "the configuration" if len(runs) == 1 else f"{len(same)} keys with the same value in every run"
    opened = " open" if len(runs) == 1 else ""
    return body + f"<details{opened}><summary>{label}</summary><table>{head}{rows(same)}</table></details>"


def _doctor(runs: list[_RunData]) -> str:
    parts = []
    for r in runs:
        if not r.findings:
            continue
        rows = "".join(
            f"<tr><td class='{f.status}'>{f.status}</td><td>{html.escape(f.check.replace('_', ' '))}</td>"
            f"<td>{html.escape(f.summary)}"
            + (f"<div class='rec'>→ {html.escape(f.recommendation)}</div>" if f.recommendation else "")
            + "</td></tr>"
            for f in r.findings
        )
        parts.append(
            f"<h3><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</h3>"
            f"<table><tr><th></th><th>check</th><th>finding</th></tr>{rows}</table>"
        )
    return "".join(parts) or "<p class='muted'>No findings (no metrics recorded).</p>"


def _provenance(runs: list[_RunData]) -> str:
    head = (
        "<tr><th>run</th><th>data fingerprint (sha256)</th><th>git commit</th><th>device</th><th>torch</th>"
        "<th>transformers / peft</th><th>MFU peak from</th><th>tracked in</th></tr>"
    )
    rows = []
    for r in runs:
        fp = (r.lineage.get("dataset") or {}).get("fingerprint") or "-"
        keys = r.env.get("key_packages", {})
        backends = ", ".join(
            f"{name}" + (" (failed)" if ref.get("error") else "")
            for name, ref in r.tracking.get("backends", {}).items()
        )
        rows.append(
            f"<tr><td><span class='swatch' style='background:{r.color}'></span>{html.escape(r.id)}</td>"
            f"<td><code>{html.escape(fp[:16])}</code></td>"
            f"<td><code>{html.escape(r.commit)}</code>{' (+ uncommitted changes)' if r.dirty else ''}</td>"
            f"<td>{html.escape(str(r.env.get('device_name', '-')))}</td><td>{html.escape(str(r.env.get('torch', '-')))}</td>"
            f"<td>{html.escape(str(keys.get('transformers', '-')))} / {html.escape(str(keys.get('peft', '-')))}</td>"
            f"<td>{html.escape(str(r.tracking.get('peak_source', '-')))}</td><td>{html.escape(backends or 'run folder')}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def write_report(runs: list[RunDir], out: str | Path) -> Path:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DaytuneError(
            "runs compare draws its charts with matplotlib, which is missing: reinstall daytune"
        ) from None
    data = [_RunData(r, i) for i, r in enumerate(runs)]
    title = "daytune: " + (
        " vs ".join(d.id for d in data) if len(data) <= 3 else f"{len(data)} runs compared"
    )
    charts = "".join(f"<div class='chart'>{c}</div>" for c in _charts(data))
    body = f"""<main>
<h1>{html.escape(title)}</h1>
<div class="sub">Generated {time.strftime("%Y-%m-%d %H:%M")} by <code>daytune runs compare</code> from the run folders:
{", ".join(f"<code>{html.escape(str(d.run.path))}</code>" for d in data)}</div>
<h2>Runs</h2>{_runs_table(data)}
<h2>Curves</h2><div class="charts">{charts or "<p class='muted'>No metrics recorded.</p>"}</div>
<h2>Evaluation</h2>{_eval_tables(data)}
<h2>Configuration differences</h2>{_config_diff(data)}
<h2>Utilization doctor</h2>{_doctor(data)}
<h2>Provenance</h2>{_provenance(data)}
</main>"""
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
    return write_text_atomic(out, page)


# ---- a sweep's page (daytune sweep): trials, objective over time, field importances, validation vs test ---------
def _figure(title: str, xlabel: str, ylabel: str, draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "daytune", "font.size": 9})
    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=100)
    draw(ax)
    ax.set_title(title, fontsize=10.5, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e5e8ec", linewidth=0.7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, frameon=False)
    out = _svg(fig)
    plt.close(fig)
    return out


def _sweep_charts(st: dict) -> list[str]:
    trials = st["trials"]
    done = sorted(
        (t for t in trials if t["state"] == "COMPLETE" and t["ended"] is not None), key=lambda t: t["ended"]
    )
    charts = []
    if done:
        better = max if st["direction"] == "maximize" else min

        def objective(ax):
            xs, ys = [t["ended"] for t in done], [t["value"] for t in done]
            ax.plot(xs, ys, "o", color=COLORS[0], label="finished trial")
            best = [better(ys[: i + 1]) for i in range(len(ys))]
            ax.step(xs, best, where="post", color=COLORS[1], label="best so far")
            _number_points(ax, [(t["number"], t["ended"], t["value"]) for t in done])

        charts.append(
            _figure("Objective over time", "seconds since the sweep started", "objective", objective)
        )
    curves = [t for t in trials if t["val_loss"]]
    if curves:

        def losses(ax):
            for i, t in enumerate(curves):
                steps = list(t["val_loss"])
                style = "--" if t["state"] == "PRUNED" else "-"
                ax.plot(
                    steps,
                    list(t["val_loss"].values()),
                    style,
                    marker="o",
                    markersize=3,
                    color=COLORS[i % len(COLORS)],
                    label=f"trial {t['number']} ({t['state'].lower()})",
                )

        charts.append(
            _figure("Validation loss by step (what the pruner sees)", "step", "validation loss", losses)
        )
    imp = st.get("importances") or {}
    if imp and "error" not in imp:

        def bars(ax):
            names = list(imp)[::-1]
            ax.barh(names, [imp[n] for n in names], color=COLORS[2])

        charts.append(_figure("Field importance (Optuna)", "importance (sums to 1)", "", bars))
    pairs = [t for t in done if t["test"] is not None]
    if pairs:
        rc = st["rank_correlation"]

        def scatter(ax):
            ax.plot([t["value"] for t in pairs], [t["test"] for t in pairs], "o", color=COLORS[4])
            _number_points(ax, [(t["number"], t["value"], t["test"]) for t in pairs])

        title = f"Validation vs test (Spearman {_fmt(rc.get('spearman'))}, n={rc.get('n')})"
        charts.append(_figure(title, "objective (validation suite)", "test suite", scatter))
    return charts


def _sweep_trials_table(st: dict) -> str:
    keys = sorted({k for t in st["trials"] for k in t["params"]})
    head = (
        "<tr><th>trial</th><th>state</th><th>objective</th><th>test</th><th>steps</th><th>stopped by</th>"
        + "".join(f"<th><code>{html.escape(k)}</code></th>" for k in keys)
        + "<th>run</th><th>worker</th></tr>"
    )
    best = (st.get("best") or {}).get("number")
    rows = []
    for t in st["trials"]:
        train = t.get("train") or {}
        mark = " ★" if t["number"] == best else (" (recipe)" if t["starting_recipe"] else "")
        run = Path(t["run_dir"]).name if t.get("run_dir") else "-"
        rows.append(
            f"<tr><td>{t['number']}{mark}</td><td>{t['state'].lower()}</td><td class='num'>{_fmt(t['value'])}</td>"
            f"<td class='num'>{_fmt(t['test'])}</td><td class='num'>{_fmt(train.get('steps'))}</td>"
            f"<td>{html.escape(str(train.get('stopped_by') or '-'))}</td>"
            + "".join(f"<td class='num'>{html.escape(_fmt(t['params'].get(k)))}</td>" for k in keys)
            + f"<td><code>{html.escape(run)}</code></td><td>{html.escape(str(t.get('worker') or '-'))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _sweep_header(st: dict) -> str:
    counts = ", ".join(f"{n} {s.lower()}" for s, n in st["counts"].items() if n) or "no trials"
    wall = st.get("wall_seconds")
    lines = [
        f"<p>Objective: <code>{html.escape(str(st['objective'].get('suite')))}</code> "
        f"{html.escape(str(st['objective'].get('metric') or 'main metric'))} ({st['direction']}); test: "
        f"<code>{html.escape(str((st.get('test') or {}).get('suite') or '-'))}</code>. Trials: {counts}.</p>",
        f"<p>Budget {_fmt(st['budget_seconds'])} s, each trial trains {_fmt(st['trial_budget_seconds'])} s; "
        + (f"the sweep took {wall:.0f} s." if wall is not None else "still running.")
        + f" Study <code>{html.escape(st['study'])}</code> in <code>{html.escape(st['storage'])}</code>.</p>",
    ]
    base = (st.get("calibration") or {}).get("base") or {}
    if base:
        lines.append("<p>Base model: " + ", ".join(f"{k} {_fmt(v)}" for k, v in base.items()) + ".</p>")
    b, s = st.get("best"), st.get("starting_recipe")
    if b:
        text = f"Best: trial {b['number']}, objective {_fmt(b['value'])}"
        if s and s["state"] == "COMPLETE":
            text += f"; the starting recipe (trial {s['number']}) scored {_fmt(s['value'])}"
        lines.append(
            f"<p><b>{html.escape(text)}.</b> Retrain it: <code>{html.escape((st.get('retrain') or {}).get('command', '-'))}</code></p>"
        )
    imp = st.get("importances") or {}
    if "error" in imp:
        lines.append(f"<p class='muted'>Field importances: {html.escape(imp['error'])}.</p>")
    return "".join(lines)


def write_sweep_report(st: dict, runs: list[RunDir], out: str | Path) -> Path:
    """A sweep's own page: its trials, the objective over time, the pruner's view, Optuna's field importances,
    validation vs test, and the trial runs' curves and configuration differences."""
    data = [_RunData(r, i) for i, r in enumerate(runs)]
    charts = "".join(f"<div class='chart'>{c}</div>" for c in _sweep_charts(st))
    run_charts = "".join(f"<div class='chart'>{c}</div>" for c in _charts(data)) if data else ""
    title = f"daytune sweep: {st['name']}"
    body = f"""<main>
<h1>{html.escape(title)}</h1>
<div class="sub">Generated {time.strftime("%Y-%m-%d %H:%M")} from <code>{html.escape(st["folder"])}</code></div>
{_sweep_header(st)}
<h2>Trials</h2>{_sweep_trials_table(st)}
<h2>Search</h2><div class="charts">{charts or "<p class='muted'>No trial has finished yet.</p>"}</div>
<h2>Trial runs</h2>{_runs_table(data) if data else "<p class='muted'>No trial run on this machine.</p>"}
<div class="charts">{run_charts}</div>
<h2>Evaluation</h2>{_suite_table(data) if data else ""}
<h2>Configuration differences</h2>{_config_diff(data) if len(data) > 1 else ""}
</main>"""
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
    return write_text_atomic(out, page)


def _number_points(ax, points) -> None:
    """Label each (trial number, x, y) point of a sweep plot with its trial number."""
    for number, x, y in points:
        ax.annotate(str(number), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
