"""System metrics sampled by a background thread every few seconds: this process's CPU % and resident memory, the
machine's memory, PyTorch's CUDA memory, and through NVML (when a GPU is present) each GPU's utilization, memory,
temperature and power. Each sample is one line of system.jsonl; the tracker forwards them to the backends from
the training thread, so the backends are only ever called from one thread."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from daytune.fileio import append_jsonl


def _nvml():
    """The NVML module with the library initialised, or None (no NVIDIA driver, no nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:
        return None


def gpu_samples(nvml) -> list[dict[str, Any]]:
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        gpu: dict[str, Any] = {"index": i}
        readers = {
            "util": lambda h=h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_used_mb": lambda h=h: round(nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20, 1),
            "mem_total_mb": lambda h=h: round(nvml.nvmlDeviceGetMemoryInfo(h).total / 2**20, 1),
            "temp_c": lambda h=h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "power_w": lambda h=h: round(nvml.nvmlDeviceGetPowerUsage(h) / 1000, 1),
        }
        for key, read in readers.items():
            try:
                gpu[key] = read()
            except Exception:  # some boards do not report power or temperature
                gpu[key] = None
        out.append(gpu)
    return out


class SystemSampler:
    """`start()` takes a first sample at once, then one every `every` seconds until `stop()` (which takes a last one)."""

    def __init__(self, path: Path, every: float = 5.0, t0: float | None = None):
        self.path, self.every = Path(path), every
        self.t0 = time.monotonic() if t0 is None else t0
        self.pending: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._process = None
        self.errors = 0

    def start(self) -> SystemSampler:
        import psutil

        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the reference point
        psutil.cpu_percent(None)
        self._nvml = _nvml()
        self._thread = threading.Thread(target=self._run, name="daytune-system", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> dict[str, Any]:
        import psutil
        import torch

        mem = psutil.virtual_memory()
        proc = self._process or psutil.Process()
        s: dict[str, Any] = {
            "time": round(time.time(), 3),
            "elapsed": round(time.monotonic() - self.t0, 3),
            "cpu_percent": round(proc.cpu_percent(None), 1),  # this process; 100 = one core busy
            "cpu_system_percent": round(psutil.cpu_percent(None), 1),  # the machine, all cores = 100
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "ram_used_mb": round((mem.total - mem.available) / 2**20, 1),
            "ram_total_mb": round(mem.total / 2**20, 1),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            s["torch_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            s["torch_reserved_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
            s["torch_peak_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        if self._nvml is not None:
            s["gpus"] = gpu_samples(self._nvml)
        return s

    def _record(self) -> None:
        try:
            s = self.sample()
        except Exception:  # a sampler must never take the run down
            self.errors += 1
            return
        append_jsonl(self.path, s)
        self.pending.put(s)

    def _run(self) -> None:
        self._record()
        while not self._stop.wait(self.every):
            self._record()

    def drain(self) -> list[dict[str, Any]]:
        """Samples taken since the last drain, oldest first."""
        out = []
        while True:
            try:
                out.append(self.pending.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        self._thread = None
        self._record()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def flatten_system(sample: dict[str, Any]) -> dict[str, float]:
    """One sample as flat metric names for the backends: system/cpu_percent, system/gpu.0.util, ..."""
    out = {}
    for key, value in sample.items():
        if key in ("time", "gpus") or not isinstance(value, (int, float)):
            continue
        out[f"system/{key}"] = float(value)
    for gpu in sample.get("gpus", []):
        for key, value in gpu.items():
            if key != "index" and isinstance(value, (int, float)):
                out[f"system/gpu.{gpu['index']}.{key}"] = float(value)
    return out
