"""System metrics sampled by a background thread every few seconds: this process's CPU % and resident memory, the
machine's memory, PyTorch's CUDA memory, and through NVML (when a GPU is present) each GPU's utilization, memory,
temperature and power. Each sample is one line of system.jsonl; the tracker forwards them to the backends from
the training thread, so the backends are only ever called from one thread.

NVML numbers every GPU of the machine in PCI order and knows nothing of CUDA_VISIBLE_DEVICES; CUDA numbers only
the visible ones, in its own order. Each GPU the run uses (by its CUDA index) is found in NVML by its UUID, so
the samples, and the doctor's averages, cover exactly those GPUs, indexed as the run sees them."""

from __future__ import annotations

import os
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


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_uuids() -> list[str] | None:
    """The UUID of each visible CUDA device, in CUDA's numbering ("GPU-..." as NVML spells it), or None when
    this PyTorch cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        out = []
        for i in range(torch.cuda.device_count()):
            uuid = _text(torch.cuda.get_device_properties(i).uuid)
            out.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        return out
    except Exception:  # an old PyTorch without .uuid, a driver problem: fall back to CUDA_VISIBLE_DEVICES
        return None


def visible_gpus(nvml, devices: list[int] | None = None) -> list[tuple[int, Any]]:
    """[(CUDA index, NVML handle)] of the GPUs a run uses (`devices`: CUDA indices; None: every visible one),
    matched by UUID. Without UUIDs from PyTorch: CUDA_VISIBLE_DEVICES (indices or UUID prefixes), else all."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    by_uuid = {}
    for h in handles:
        try:
            by_uuid[_text(nvml.nvmlDeviceGetUUID(h))] = h
        except Exception:
            pass
    uuids = cuda_uuids()
    if uuids is not None and by_uuid:
        visible = [by_uuid.get(u) for u in uuids]
    else:
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
        if spec is None:
            visible = handles
        else:
            visible = []
            for entry in (e.strip() for e in spec.split(",") if e.strip()):
                if entry.isdigit():
                    visible.append(handles[int(entry)] if int(entry) < len(handles) else None)
                else:
                    visible.append(next((h for u, h in by_uuid.items() if u.startswith(entry)), None))
    wanted = range(len(visible)) if devices is None else devices
    return [(i, visible[i]) for i in wanted if i < len(visible) and visible[i] is not None]


def gpu_samples(nvml, gpus: list[tuple[int, Any]] | None = None) -> list[dict[str, Any]]:
    """One reading of each GPU in `gpus` ([(CUDA index, NVML handle)]; None: every GPU NVML sees)."""
    if gpus is None:
        gpus = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
    out = []
    for i, h in gpus:
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
    """`start()` takes a first sample at once, then one every `every` seconds until `stop()` (which takes a last one).
    `devices`: the CUDA indices of the GPUs the run uses (None: every visible one)."""

    def __init__(
        self, path: Path, every: float = 5.0, t0: float | None = None, devices: list[int] | None = None
    ):
        self.path, self.every = Path(path), every
        self.devices = devices
        self._gpus: list[tuple[int, Any]] = []
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
        if self._nvml is not None:
            try:
                self._gpus = visible_gpus(self._nvml, self.devices)
            except Exception:
                self._nvml = None
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
        if self._nvml is not None and self._gpus:
            s["gpus"] = gpu_samples(self._nvml, self._gpus)
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
