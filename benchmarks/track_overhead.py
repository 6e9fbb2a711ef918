"""What tracking costs the training loop per optimizer step, side by side in one run.

    python benchmarks/track_overhead.py [--steps 200]

  runstore   the bare run store: one metrics.jsonl line per step (what the loop did before tracking)
  tracker    daytune's tracker with no backend: FLOPs, MFU, totals, metrics.jsonl, system sampler every 5 s
  +wandb     the tracker forwarding to W&B (offline mode, no network)
  +mlflow    the tracker forwarding to MLflow (SQLite store)
  +both      the tracker forwarding to both

Each row logs the same synthetic step records; the time is wall-clock per `log` call (the backends' own background
work, such as W&B's writer process, is not on the training thread and not counted). Start-up (opening the backends)
is reported separately: it is paid once per run. Writes JSON to benchmarks/results/track_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record(step: int) -> dict:
    return {
        "step": step, "loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5, "tokens": 2000, "tokens_per_s": 1000.0,
        "padding": 0.1, "step_seconds": 2.0, "data_seconds": 0.01, "elapsed": 2.0 * step, "total_steps": 1000,
        "budget_left": 100.0,
    }  # fmt: skip


def measure(backends: list[str] | None, steps: int) -> dict:
    import torch

    from daytune.config import RunConfig
    from daytune.track import RunDir, Tracker

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig()
        cfg.track.backends = backends or []
        run = RunDir.create(tmp, "bench")
        run.write_start("model: x\n", ["bench"])
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        t0 = time.perf_counter()
        tracker = (
            Tracker(run, cfg).start(model, torch.device("cpu"), "32-true") if backends is not None else None
        )
        startup = time.perf_counter() - t0
        lengths = [200] * 10
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            if tracker is None:
                run.log(record(step))
            else:
                tracker.log(record(step), lengths)
        per_step = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        if tracker is not None:
            tracker.finish({"steps": steps}, None)
        finish = time.perf_counter() - t0
    return {
        "startup_s": round(startup, 3),
        "per_step_ms": round(per_step * 1000, 3),
        "finish_s": round(finish, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "track_overhead.json")
    args = ap.parse_args()
    os.environ["WANDB_MODE"] = "offline"
    rows = {
        "runstore": None,
        "tracker": [],
        "+wandb": ["wandb"],
        "+mlflow": ["mlflow"],
        "+both": ["wandb", "mlflow"],
    }
    results = {}
    print(f"{'':10s} {'per step':>10s} {'start-up':>10s} {'finish':>8s}")
    for name, backends in rows.items():
        r = measure(backends, args.steps)
        results[name] = r
        print(
            f"{name:10s} {r['per_step_ms']:8.2f}ms {r['startup_s']:9.2f}s {r['finish_s']:7.2f}s", flush=True
        )
    base = results["runstore"]["per_step_ms"]
    summary = {
        "tracker_vs_runstore_ms": round(results["tracker"]["per_step_ms"] - base, 3),
        "both_backends_vs_runstore_ms": round(results["+both"]["per_step_ms"] - base, 3),
    }
    print(
        f"tracking with both backends adds {summary['both_backends_vs_runstore_ms']:.2f} ms per optimizer step"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"steps": args.steps, "machine": platform.platform(), "cpus": os.cpu_count(), "results": results,
             "summary": summary}, indent=2,
        ) + "\n"
    )  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
