"""The tracker: what the training loop calls to record a run. `start` once, `log` every step, `checkpoint` after each
save, `finish` at the end; `record_eval` when a stage evaluates the run.

It writes the run folder (env.json, code/, metrics.jsonl enriched with samples/s, FLOPs and MFU, system.jsonl from
a background sampler, lineage.json, tracking.json, doctor.json) and forwards the same numbers to the configured
backends (W&B, MLflow). A backend that raises warns once and is switched off; training goes on. On the non-main
processes of a multi-process run the tracker is disabled: only the main process records.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from daytune.fileio import sha256_file, write_json_atomic
from daytune.track.backends import StartInfo, make_backend
from daytune.track.runstore import RunDir

# Run store key -> backend metric name. Names match the lit-gpt logger of the W&B starter kit where they overlap
# (its finetune scripts: loss, learning_rate, iter_time, tokens, total_tokens, val_loss, val_ppl; its SpeedMonitor:
# throughput/*, time/* in seconds, samples); the others keep daytune's names.
BACKEND_NAMES = {
    "loss": "loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens": "tokens",
    "total_tokens": "total_tokens",
    "step_seconds": "iter_time",
    "tokens_per_s": "throughput/tokens_per_sec",
    "samples_per_s": "throughput/samples_per_sec",
    "flops_per_s": "throughput/flops_per_sec",
    "mfu": "throughput/device/mfu",
    "train_seconds": "time/train",
    "elapsed": "time/total",
    "total_samples": "samples",
    "val_loss": "val_loss",
    "padding": "padding",
    "data_seconds": "data_seconds",
    "budget_left": "budget_left",
    "total_steps": "total_steps",
    "flops": "flops",
}


def backend_metrics(record: dict[str, Any], world: int = 1) -> dict[str, float]:
    out = {
        BACKEND_NAMES[k]: float(v)
        for k, v in record.items()
        if k in BACKEND_NAMES and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if "val_loss" in out:
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    for key in ("tokens_per_sec", "samples_per_sec", "flops_per_sec"):
        if f"throughput/{key}" in out:
            out[f"throughput/device/{key}"] = out[f"throughput/{key}"] / world
    return out


def file_fingerprint(path: str | Path | None) -> dict[str, Any] | None:
    """sha256 and size of a data file: the dataset's identity in lineage.json and `runs list`."""
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        return {"path": str(path), "missing": True}
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def folder_manifest(folder: Path, hash_limit: int = 256 * 2**20) -> dict[str, Any]:
    """Files of a saved model or checkpoint with sizes, and sha256 for files up to `hash_limit` bytes."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            entry: dict[str, Any] = {"bytes": p.stat().st_size}
            if entry["bytes"] <= hash_limit:
                entry["sha256"] = sha256_file(p)
            files[str(p.relative_to(folder))] = entry
    return files


class _Guarded:
    """Calls into a backend; the first exception warns once and switches the backend off."""

    def __init__(self, backend, warn):
        self.backend, self.warn = backend, warn
        self.name = getattr(backend, "name", type(backend).__name__)
        self.failed: str | None = None

    def call(self, method: str, *args, **kwargs):
        if self.failed:
            return None
        try:
            return getattr(self.backend, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of a tracking service must not stop training
            self.failed = f"{type(e).__name__}: {e}"
            self.warn(
                f"warning: tracking backend {self.name} failed in {method} ({self.failed}); it is off for the rest "
                "of this run; the run folder still records everything"
            )
            return None


def _default_warn(message: str) -> None:
    print(f"daytune: {message}", file=sys.stderr, flush=True)


class Tracker:
    def __init__(
        self, run: RunDir, cfg, enabled: bool = True, warn=_default_warn, backends: list | None = None
    ):
        self.run, self.cfg, self.enabled, self.warn = run, cfg, enabled, warn
        self._backends_given = backends  # tests inject backends; otherwise built from cfg.track.backends
        self.backends: list[_Guarded] = []
        self.sampler = None
        self.flops = None
        self.peak, self.peak_source = None, None
        self.world = 1
        self.step = 0
        self.totals = {"total_tokens": 0, "total_samples": 0, "train_seconds": 0.0}
        self.finished = False

    # -- start ------------------------------------------------------------------------------------------------
    def start(self, model, device, precision: str, world: int = 1, data: dict | None = None) -> Tracker:
        """Record the environment, measure the device, open the backends. Random states are left exactly as they
        were (the peak measurement draws random matrices, libraries may draw ids): a resumed run must replay."""
        if not self.enabled:
            return self
        import random

        import numpy as np
        import torch

        py_state, np_state = random.getstate(), np.random.get_state()
        devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                return self._start(model, device, precision, world, data or {})
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _start(self, model, device, precision: str, world: int, data: dict) -> Tracker:
        from daytune.hardware import device_peak
        from daytune.track.env import environment, snapshot_code
        from daytune.track.flops import ModelFlops
        from daytune.track.system import SystemSampler

        tc, path = self.cfg.track, self.run.path
        self.world = world
        previous = self.run.read_metrics()
        if previous:  # a resumed run: counters go on from the kept metrics
            last = previous[-1]
            self.step = int(last.get("step", 0))
            for key in self.totals:
                self.totals[key] = type(self.totals[key])(last.get(key, 0) or 0)
        env = environment()
        env_name = "env.json" if not (path / "env.json").is_file() else f"env.resumed-step-{self.step}.json"
        write_json_atomic(path / env_name, env)
        if tc.code_snapshot and not (path / "code").is_dir():
            snapshot_code(path / "code")
        self.flops = ModelFlops.of(model)
        self.peak, self.peak_source = device_peak(device, precision, tc.peak_tflops)
        self._write_lineage_start(data)
        self.sampler = SystemSampler(self.run.system_file, tc.system_every, devices=_run_gpus(device, world))
        self.sampler.start()
        tracking = self.run.read_json("tracking.json")
        tracking.update(
            {
                "flops": {
                    "matmul_params": self.flops.matmul_params,
                    "trainable_matmul_params": self.flops.trainable_matmul_params,
                    "layers": self.flops.layers,
                    "attention_dim": self.flops.attention_dim,
                    "per_token": self.flops.per_token(),
                },
                "peak_flops": self.peak,
                "peak_source": self.peak_source,
                "world": world,
                "device_name": env["device_name"],
                "memory_mb": (env["gpus"][0]["memory_mb"] if env["gpus"] else env["memory_mb"]),
                "torch_threads": env["torch_threads"],
            }
        )
        refs = tracking.setdefault("backends", {})
        backends = self._backends_given
        if backends is None:
            backends = []
            for name in tc.backends:
                try:
                    backends.append(make_backend(name, tc))
                except Exception as e:  # noqa: BLE001
                    self.warn(
                        f"warning: tracking backend {name} unavailable ({e}); training goes on without it"
                    )
        for backend in backends:
            guarded = _Guarded(backend, self.warn)
            info = self._start_info("train", refs.get(guarded.name, {}))
            ref = guarded.call("start", info)
            if ref is not None:
                refs[guarded.name] = ref
                self.backends.append(guarded)
            else:
                refs[guarded.name] = {**refs.get(guarded.name, {}), "error": guarded.failed}
        write_json_atomic(path / "tracking.json", tracking)
        atexit.register(self.abandon)
        return self

    def _start_info(self, job: str, previous: dict[str, Any]) -> StartInfo:
        from daytune.config import RunConfig

        cfg: RunConfig = self.cfg
        return StartInfo(
            run_id=self.run.run_id,
            run_path=self.run.path,
            out_dir=self.run.path.parent,
            config=cfg.to_dict(),
            job=job,
            previous=previous,
            step=self.step,
            tags={"daytune.model": cfg.model, "daytune.method": cfg.train.method, "daytune.name": cfg.name},
        )

    def _write_lineage_start(self, data: dict) -> None:
        """`data` is what the loop read (path, rows, fingerprint: the data stage's sha256 over the files)."""
        lineage = self.run.read_json("lineage.json")
        if "dataset" not in lineage:
            dc = self.cfg.data
            train = file_fingerprint(data.get("train") or dc.train)
            lineage.update(
                {
                    "dataset": {
                        "fingerprint": data.get("fingerprint") or (train or {}).get("sha256"),
                        "rows": data.get("rows"),
                        "train": train,
                        "val": file_fingerprint(dc.val),
                        "settings": {
                            "template": dc.template,
                            "max_seq_len": dc.max_seq_len,
                            "max_rows": dc.max_rows,
                            "val_fraction": dc.val_fraction,
                            "packing": dc.packing,
                        },
                    },
                    "run": {
                        "id": self.run.run_id,
                        "base_model": self.cfg.model,
                        "method": self.cfg.train.method,
                    },
                    "checkpoints": [],
                    "outputs": [],
                    "evaluations": [],
                }
            )
            write_json_atomic(self.run.path / "lineage.json", lineage)

    # -- every step -------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any], lengths: list[int] | None = None) -> dict[str, Any]:
        """Add samples/s, FLOPs, MFU and running totals to a step's record, write it, forward it."""
        if not self.enabled:
            return record
        dt = record.get("step_seconds") or 0.0
        self.step = int(record.get("step", self.step + 1))
        if lengths is not None:
            record["samples"] = len(lengths)
        samples = record.get("samples", 0)
        self.totals["total_tokens"] += int(record.get("tokens", 0))
        self.totals["total_samples"] += int(samples)
        self.totals["train_seconds"] = round(self.totals["train_seconds"] + dt, 4)
        if dt > 0:
            record["samples_per_s"] = round(samples / dt, 3)
        if self.flops is not None and lengths is not None and dt > 0:
            flops = self.flops.step(sum(lengths), sum(n * n for n in lengths))
            record["flops"] = flops
            record["flops_per_s"] = round(flops / dt, 1)
            record["mfu"] = round(flops / dt / (self.peak * self.world), 5) if self.peak else None
        record.update(self.totals)
        record["time"] = round(time.time(), 3)  # wall clock: lines steps up with system.jsonl
        self.run.log(record)
        samples_taken = self.sampler.drain() if self.sampler else []
        self._forward(record, samples_taken)
        return record

    def _forward(self, record: dict[str, Any], system: list[dict[str, Any]]) -> None:
        if not self.backends:
            return
        from daytune.track.system import flatten_system

        metrics = backend_metrics(record, self.world)
        flat = [{**flatten_system(s), "time": s.get("time", time.time())} for s in system]
        for b in self.backends:
            if flat:
                b.call("log_system", flat, self.step)
            b.call("log_metrics", metrics, self.step)

    # -- checkpoints and the final model ----------------------------------------------------------------------
    def checkpoint(self, folder: Path, step: int) -> None:
        if not self.enabled:
            return
        entry = {"step": step, "path": str(Path(folder).relative_to(self.run.path)), "time": _now()}
        entry["artifacts"] = self._log_artifact(folder, "checkpoint", "checkpoint", step, final=False)
        lineage = self.run.read_json("lineage.json")
        lineage.setdefault("checkpoints", []).append(entry)
        write_json_atomic(self.run.path / "lineage.json", lineage)

    def _log_artifact(self, folder: Path, name: str, kind: str, step: int, final: bool) -> dict[str, str]:
        refs = {}
        meta = {
            "run_id": self.run.run_id,
            "base_model": self.cfg.model,
            "method": self.cfg.train.method,
            "step": step,
            "dataset_fingerprint": self.run.read_json("lineage.json").get("dataset", {}).get("fingerprint"),
            "content": "model" if (Path(folder) / "config.json").is_file() else "adapter",
        }
        for b in self.backends:
            policy = getattr(self.cfg.track, b.name).log_model if hasattr(self.cfg.track, b.name) else "final"
            if policy == "none" or (policy == "final" and not final):
                continue
            ref = b.call("log_artifact", Path(folder), name, kind, meta)
            if ref:
                refs[b.name] = ref
        return refs

    def finish(self, result: dict[str, Any], output_dir: Path | None, status: str = "finished") -> list:
        """Stop the sampler, log the final model and summary, run the utilization doctor; returns its findings."""
        if not self.enabled or self.finished:
            return []
        self.finished = True
        from daytune.track.doctor import diagnose, findings_json

        if self.sampler is not None:
            self.sampler.stop()
            self._forward_system_only(self.sampler.drain())
        lineage = self.run.read_json("lineage.json")
        if output_dir is not None and Path(output_dir).is_dir():
            out = {
                "path": str(Path(output_dir).relative_to(self.run.path)),
                "step": result.get("steps"),
                "time": _now(),
                "files": folder_manifest(Path(output_dir)),
                "artifacts": self._log_artifact(
                    Path(output_dir), Path(output_dir).name, "model", result.get("steps"), True
                ),
            }
            lineage.setdefault("outputs", []).append(out)
            write_json_atomic(self.run.path / "lineage.json", lineage)
        try:
            findings = diagnose(self.run)
            write_json_atomic(self.run.path / "doctor.json", findings_json(findings))
        except Exception as e:  # noqa: BLE001 - the doctor's opinion is not worth a failed run
            self.warn(
                f"warning: the utilization doctor failed ({type(e).__name__}: {e}); run `daytune runs doctor`"
            )
            findings = []
        summary = {
            f"final/{k}": v
            for k, v in result.items()
            if isinstance(v, (int, float, str))
            and not isinstance(v, bool)
            and k not in ("run_dir", "output_dir")
        }
        for f in findings:
            if f.value is not None:
                summary[f"doctor/{f.check}"] = f.value
        tracking = self.run.read_json("tracking.json")
        for b in self.backends:
            b.call("log_summary", summary)
            b.call("finish", status)
            if b.failed:
                tracking.setdefault("backends", {}).setdefault(b.name, {})["error"] = b.failed
        write_json_atomic(self.run.path / "tracking.json", tracking)
        return findings

    def _forward_system_only(self, samples: list[dict[str, Any]]) -> None:
        from daytune.track.system import flatten_system

        flat = [{**flatten_system(s), "time": s.get("time", time.time())} for s in samples]
        if flat:
            for b in self.backends:
                b.call("log_system", flat, self.step)

    def abandon(self) -> None:
        """At interpreter exit without `finish` (a crash): stop sampling and mark the backends' runs failed."""
        if self.finished or not self.enabled:
            return
        self.finished = True
        if self.sampler is not None:
            self.sampler.stop()
        for b in self.backends:
            b.call("finish", "failed")


def _run_gpus(device, world: int) -> list[int]:
    """The CUDA indices of the GPUs this machine's processes of the run use: the one device of a single
    process, each local rank's under a multi-process launch (accelerate gives rank r the device r), none on CPU."""
    import os

    import torch

    if getattr(device, "type", None) != "cuda":
        return []
    if world == 1:
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return list(range(min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count())))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def record_eval(
    run: RunDir,
    cfg,
    results: dict[str, Any],
    out: Path | None,
    model_ref: str,
    trained: Path | None,
    warn=None,
) -> None:
    """Lineage (run -> evaluation results) and the backends: each evaluation of a run is linked to it."""
    if int(os.environ.get("RANK", "0")) != 0:  # a multi-process launch: the main process records
        return
    warn = warn or _default_warn
    eval_cfg = cfg.eval
    entry = {
        "time": _now(),
        "results": str(out) if out is not None else "summary.json#eval",
        "model": model_ref,
        "trained": str(trained) if trained else None,
        "datasets": {
            "heldout": file_fingerprint(eval_cfg.heldout),
            "multiple_choice": file_fingerprint(eval_cfg.multiple_choice),
        },
        "headline": eval_metrics(results),
    }
    lineage = run.read_json("lineage.json")
    lineage.setdefault("evaluations", []).append(entry)
    write_json_atomic(run.path / "lineage.json", lineage)
    tracking = run.read_json("tracking.json")
    refs = tracking.get("backends", {})
    last = run.read_metrics()
    step = int(last[-1]["step"]) if last else 0
    for name in cfg.track.backends:
        try:
            backend = make_backend(name, cfg.track)
        except Exception as e:  # noqa: BLE001
            warn(
                f"warning: tracking backend {name} unavailable ({e}); evaluation results stay in the run folder"
            )
            continue
        b = _Guarded(backend, warn)
        tracker = Tracker(run, cfg)
        tracker.step = step
        previous = {k: v for k, v in refs.get(name, {}).items() if k != "error"}
        if b.call("start", tracker._start_info("eval", previous)) is None:
            continue
        b.call("log_summary", entry["headline"])
        b.call("finish", "finished")


def eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{'tuned': {'heldout': {'loss': ..}}} -> {'eval/tuned/heldout_loss': ..} (numbers only)."""
    out = {}
    for side, sections in results.items():
        if not isinstance(sections, dict):
            continue
        for section, values in sections.items():
            # suite: scenario -> metric -> {value, ci_low, ci_high}
            if section == "suite" and isinstance(values, dict):
                for name, sc in (values.get("scenarios") or {}).items():
                    for metric, m in (sc.get("metrics") or {}).items():
                        if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
                            out[f"eval/{side}/{name}/{metric}"] = m["value"]
            elif isinstance(values, dict):
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        out[f"eval/{side}/{section}_{key}"] = value
    return out
