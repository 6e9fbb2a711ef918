"""The utilization doctor: reads a run folder and says where the time and the device went, each finding with a
concrete recommendation. Runs after every training run (printed, and saved as doctor.json) and on demand with
`daytune runs doctor ID`.

Checks: data wait (time building batches on the training thread, measured per step), padding waste, device
utilization (GPU busy % through NVML, or CPU cores busy, and MFU), memory headroom, throughput against the
planner's prediction, and where the time budget went.

The planner's prediction is read from `plan.json` in the run folder when present (written by every training run
from `daytune.plan`, or by hand), a JSON object with any of: `tokens_per_s` (predicted non-padding tokens per
second), `step_seconds`, `peak_memory_mb` (predicted peak memory, MiB), `micro_batch`, `max_micro_batch`
(`with_checkpointing`/`without_checkpointing`), `device`, `source`. Unknown keys are ignored.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from daytune.track.runstore import RunDir

OK, INFO, WARN = "ok", "info", "warn"


@dataclass
class Finding:
    check: str  # data_wait | padding | device_utilization | mfu | memory_headroom | planner | budget
    status: str  # ok | info | warn
    value: float | None  # the measured number the finding is about (a fraction, or a ratio for planner)
    summary: str  # what was measured, in words
    recommendation: str | None = None  # what to change, when something should change


def findings_json(findings: list[Finding]) -> dict[str, Any]:
    return {"findings": [asdict(f) for f in findings]}


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if x >= 0.1 else f"{100 * x:.1f} %"


@dataclass
class _Facts:
    """What the checks read from a run folder."""

    metrics: list[dict]
    system: list[dict]
    summary: dict
    tracking: dict
    plan: dict
    data_cfg: dict
    train_cfg: dict

    @classmethod
    def of(cls, run: RunDir) -> _Facts:
        import yaml

        cfg = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8")) or {}
        return cls(
            metrics=run.read_metrics(),
            system=run.read_system(),
            summary=run.read_summary(),
            tracking=run.read_json("tracking.json"),
            plan=run.read_json("plan.json"),
            data_cfg=cfg.get("data", {}) or {},
            train_cfg=cfg.get("train", {}) or {},
        )

    @property
    def train(self) -> dict:
        return self.summary.get("train", {})

    @property
    def steady(self) -> list[dict]:
        """The steps after the first, which pays for warm-up."""
        return self.metrics[1:] if len(self.metrics) > 2 else self.metrics

    @property
    def t_first(self) -> float:
        """When the first step started (seconds into the train stage)."""
        m = self.metrics
        return (m[0].get("elapsed", 0) - m[0].get("step_seconds", 0)) if m else 0

    @property
    def during(self) -> list[dict]:
        """System samples taken while steps ran (all of them when none fall inside)."""
        t_last = self.metrics[-1].get("elapsed", 0) if self.metrics else 0
        return [s for s in self.system if self.t_first <= s.get("elapsed", -1) <= t_last + 1] or self.system

    @property
    def gpu_utils(self) -> list[float]:
        return [g["util"] for s in self.during for g in s.get("gpus", []) if g.get("util") is not None]


def diagnose(run: RunDir) -> list[Finding]:
    """Everything the run folder lets us say; checks without data are left out."""
    f = _Facts.of(run)
    first = [_data_wait(f), _padding(f)]
    waiting = any(x is not None and x.check == "data_wait" and x.status == WARN for x in first)
    memory, used = _memory(f)
    found = [*first, _device_utilization(f, waiting), _mfu(f), memory, _planner(f, waiting, used), _budget(f)]
    return [x for x in found if x is not None]


def _data_wait(f: _Facts) -> Finding | None:
    """Time building batches on the training thread, against step time."""
    data_cfg, steady = f.data_cfg, f.steady
    step_time = sum(m.get("step_seconds", 0) for m in steady)
    data_time = sum(m.get("data_seconds", 0) or 0 for m in steady)
    if step_time > 0 and any("data_seconds" in m for m in steady):
        frac = data_time / step_time
        stalled = sum(1 for m in steady if (m.get("data_seconds") or 0) > 0.1 * m.get("step_seconds", 1))
        msg = f"building batches takes {_pct(frac)} of step time ({stalled} of {len(steady)} steps over 10 %)"
        if frac > 0.15:
            rec = (
                "batches are built on the training thread: set data.packing: true (fewer, fuller rows to collate "
                "and copy) and keep data.max_seq_len no longer than the data needs"
                if not data_cfg.get("packing")
                else "raise train.micro_batch (and lower train.grad_accum to keep the effective batch): fewer, "
                "larger batches spread the per-batch cost"
            )
            return Finding("data_wait", WARN, round(frac, 4), msg, rec)
        else:
            return Finding("data_wait", OK, round(frac, 4), msg + ": the device is not waiting for data")
    return None


def _padding(f: _Facts) -> Finding | None:
    """Positions computed on padding."""
    metrics, data_cfg, train_cfg, train = f.metrics, f.data_cfg, f.train_cfg, f.train
    waste = train.get("padding_waste")
    if waste is None and metrics:
        waste = statistics.fmean(m.get("padding", 0) for m in metrics)
    if waste is not None:
        msg = f"{_pct(waste)} of the computed positions are padding"
        if waste > 0.1 and not data_cfg.get("packing"):
            method = train_cfg.get("method")
            rec = (
                "set data.group_by_length: true (packing is not possible with virtual-token methods)"
                if method in ("prefix", "prompt", "ptuning")
                else "set data.packing: true (examples share rows, no cross-attention; padding drops to a few %) "
                "or data.group_by_length: true"
            )
            return Finding("padding", WARN, round(waste, 4), msg, rec)
        elif waste > 0.1:
            return Finding(
                "padding",
                INFO,
                round(waste, 4),
                msg + " even with packing (the shortest packed row sets the micro-batch's waste)",
                "lower train.micro_batch: fewer rows per micro-batch are padded to the longest one",
            )
        else:
            return Finding("padding", OK, round(waste, 4), msg)
    return None


def _device_utilization(f: _Facts, waiting: bool) -> Finding | None:
    """GPU busy time (NVML), or CPU cores busy, while training."""
    tracking, gpu_utils, during = f.tracking, f.gpu_utils, f.during
    if gpu_utils:
        util = statistics.fmean(gpu_utils) / 100
        msg = f"the GPU was busy {_pct(util)} of the time while training (NVML, {len(gpu_utils)} samples)"
        if util < 0.7:
            rec = (
                "the data-wait finding above is the first fix"
                if waiting
                else "give the GPU more work per step: raise train.micro_batch (see memory headroom), turn on "
                "data.packing, and use bf16-true precision"
            )
            return Finding("device_utilization", WARN, round(util, 4), msg, rec)
        else:
            return Finding("device_utilization", OK, round(util, 4), msg)
    elif during and tracking.get("torch_threads"):
        threads = tracking["torch_threads"]
        busy = statistics.fmean(s.get("cpu_percent", 0) for s in during) / 100
        frac = busy / threads
        msg = f"the process kept {busy:.1f} of the {threads} cores PyTorch uses busy ({_pct(min(1.0, frac))})"
        machine = statistics.fmean(s.get("cpu_system_percent", 0) for s in during) / 100
        if frac < 0.6 and machine > 0.85:
            rec = (
                f"the machine's CPUs were {_pct(machine)} busy overall: other processes took the cores this run "
                "was given; run it alone, or set train.threads to the cores that are actually free"
            )
            return Finding("device_utilization", WARN, round(frac, 4), msg, rec)
        elif frac < 0.6:
            rec = (
                "the cores idle between matmuls: raise train.micro_batch, or data.max_seq_len with packing "
                "(bigger matmuls)"
            )
            return Finding("device_utilization", WARN, round(frac, 4), msg, rec)
        else:
            return Finding("device_utilization", OK, round(frac, 4), msg)
    return None


def _mfu(f: _Facts) -> Finding | None:
    """Model FLOPs utilization, median over steps."""
    tracking, steady, gpu_utils = f.tracking, f.steady, f.gpu_utils
    mfus = [m["mfu"] for m in steady if m.get("mfu") is not None]
    if mfus:
        mfu = statistics.median(mfus)
        source = tracking.get("peak_source", "the device peak")
        msg = f"model FLOPs utilization {_pct(mfu)} (median over steps; peak from {source})"
        on_gpu = bool(gpu_utils) or "datasheet" in str(source)
        if on_gpu and mfu < 0.2:
            return Finding(
                "mfu",
                WARN,
                round(mfu, 4),
                msg,
                "small matmuls leave tensor cores idle: raise train.micro_batch, pack sequences, and train in "
                "bf16; for LoRA, 30-50 % MFU is reachable on a 7B model",
            )
        else:
            return Finding("mfu", INFO if mfu < 0.2 else OK, round(mfu, 4), msg)
    return None


def _memory(f: _Facts) -> tuple[Finding | None, float]:
    """Peak memory against what the device holds; also the peak used (MiB), which the planner check reports."""
    system, tracking, plan, train_cfg, train = f.system, f.tracking, f.plan, f.train_cfg, f.train
    found = None
    mb = train_cfg.get("micro_batch")
    if not isinstance(mb, int):  # micro_batch: auto; the summary has what the probe chose
        mb = train.get("micro_batch")
    gpu_peak = max(
        [s.get("torch_peak_mb", 0) for s in system]
        + [g.get("mem_used_mb") or 0 for s in system for g in s.get("gpus", [])]
        + [train.get("peak_gpu_reserved_mb") or 0],  # the run's own CUDA peak, between samples too
        default=0,
    )
    gpu_total = max([g.get("mem_total_mb") or 0 for s in system for g in s.get("gpus", [])], default=0)
    if gpu_peak and gpu_total:
        used, total, where = gpu_peak, gpu_total, "GPU memory"
    else:
        rss = max([s.get("rss_mb", 0) for s in system] + [train.get("peak_rss_mb") or 0], default=0)
        total = max([s.get("ram_total_mb", 0) for s in system] + [tracking.get("memory_mb") or 0], default=0)
        used, where = rss, "RAM (peak resident memory of the process)"
    if used and total:
        headroom = 1 - used / total
        msg = f"peak {used / 1024:.1f} of {total / 1024:.1f} GiB {where}: {_pct(max(0.0, headroom))} headroom"
        if headroom < 0.08:
            found = Finding(
                "memory_headroom",
                WARN,
                round(headroom, 4),
                msg,
                "close to out of memory: set train.gradient_checkpointing: true or lower train.micro_batch "
                "(raise train.grad_accum to keep the effective batch)",
            )
        elif headroom > 0.4 and isinstance(mb, int):
            ckpt = "with" if train_cfg.get("gradient_checkpointing") else "without"
            planned = (plan.get("max_micro_batch") or {}).get(f"{ckpt}_checkpointing")
            if isinstance(planned, int) and planned > mb:  # the planner's edge, from the memory model
                grow, how = planned, "the planner's largest micro-batch for this device"
            else:
                grow = max(mb + 1, int(mb * 0.85 * total / used))
                how = "a conservative estimate that scales all memory with the batch"
            found = Finding(
                "memory_headroom",
                INFO,
                round(headroom, 4),
                msg,
                f"memory is not the limit: train.micro_batch {mb} -> about {grow} still fits ({how}); lower "
                "train.grad_accum to keep the effective batch (or set micro_batch: auto)",
            )
        else:
            found = Finding("memory_headroom", OK, round(headroom, 4), msg)

    return found, used


def _planner(f: _Facts, waiting: bool, used: float) -> Finding | None:
    """Measured tokens/s (and peak memory) against the prediction in plan.json."""
    plan, steady = f.plan, f.steady
    found = None
    measured_tps = statistics.median([m["tokens_per_s"] for m in steady if m.get("tokens_per_s")] or [0])
    predicted = plan.get("tokens_per_s")
    if predicted is None and plan.get("step_seconds") and steady:
        predicted = statistics.fmean(m.get("tokens", 0) for m in steady) / plan["step_seconds"]
    if plan and predicted and measured_tps:
        ratio = measured_tps / predicted
        msg = f"{measured_tps:.0f} tokens/s measured vs {predicted:.0f} predicted by the plan ({ratio:.2f}x)"
        if ratio < 0.8:
            rec = "the run is slower than planned: " + (
                "fix the data wait first"
                if waiting
                else "check device utilization above; if the plan used another device or precision, re-run "
                "`daytune plan` on this machine"
            )
            found = Finding("planner", WARN, round(ratio, 4), msg, rec)
        elif ratio > 1.25:
            found = Finding(
                "planner",
                INFO,
                round(ratio, 4),
                msg,
                "faster than planned: the budget fits more steps or a larger model; re-run `daytune plan` to "
                "recalibrate",
            )
        else:
            found = Finding("planner", OK, round(ratio, 4), msg)
        if plan.get("peak_memory_mb") and used:
            found.summary += f"; peak memory {used:.0f} MB vs {plan['peak_memory_mb']:.0f} MB predicted"

    return found


def _budget(f: _Facts) -> Finding | None:
    """Where the train stage's time went, against its budget."""
    metrics, train, t_first = f.metrics, f.train, f.t_first
    elapsed = train.get("elapsed_seconds")
    if elapsed and metrics:
        trained = train.get("train_seconds") or sum(m.get("step_seconds", 0) for m in metrics)
        setup = max(0.0, t_first)
        budget = train.get("budget_seconds")
        frac = trained / elapsed
        msg = (
            f"{_pct(frac)} of the {elapsed:.0f} s train stage ran optimizer steps; setup (loading, tokenizing) "
            f"took {setup:.0f} s, saving and validation the remaining {max(0.0, elapsed - trained - setup):.0f} s"
        )
        if budget:
            msg += f"; {elapsed / budget:.0%} of the {budget:.0f} s budget used"
        rest = max(0.0, elapsed - trained - setup)
        longest = max(m.get("step_seconds", 0) for m in metrics)
        if budget and elapsed > 1.1 * budget:
            rec = (
                f"the run overran its budget: one step took up to {longest:.0f} s, longer than the time left; on "
                "a shared or slow machine give a longer budget, or lower train.micro_batch / train.grad_accum so "
                "single steps are short against the budget"
            )
            return Finding("budget", WARN, round(frac, 4), msg, rec)
        elif frac < 0.6:
            rec = (
                "setup is a fixed cost (loading, tokenizing, starting trackers) that only a short run feels: "
                "give the run a longer budget"
                if setup >= rest
                else "saving and validation dominate: raise train.checkpoint_every (or a time interval like "
                "30m) and validate less often (train.eval_every)"
            )
            return Finding("budget", WARN, round(frac, 4), msg, rec)
        else:
            return Finding("budget", OK, round(frac, 4), msg)
    return None


def format_findings(findings: list[Finding]) -> str:
    """Plain lines for the terminal: one per finding, the recommendation indented below."""
    if not findings:
        return "Utilization doctor: no metrics recorded yet."
    marks = {OK: "ok  ", INFO: "info", WARN: "WARN"}
    lines = ["Utilization doctor:"]
    for f in findings:
        lines.append(f"  {marks.get(f.status, f.status)}  {f.check:<18} {f.summary}")
        if f.recommendation:
            lines.append(f"        {'':<18} -> {f.recommendation}")
    return "\n".join(lines)
