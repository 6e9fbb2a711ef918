"""Devices a plan can target: their memory and peak matrix-multiply throughput.

GPU numbers are the vendors' published peaks (dense, no sparsity), cited per device. `cpu` is this machine,
measured: its cores and memory from the OS, its peak from a short matrix-multiply benchmark in fp32 and bf16 (the
best a CPU does on the work a training step is made of). Memory is what the device holds; the CUDA context and
the runtime are counted as framework overhead in the memory plan, not subtracted here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace

from daytune.errors import ConfigError

TFLOPS = 1e12
MIB = 2**20


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # cuda | cpu
    memory: float  # bytes the device holds
    peak: dict[str, float] = field(default_factory=dict)  # FLOP/s by compute dtype: bf16, fp16, fp32
    bandwidth: float | None = None  # bytes/s
    description: str = ""
    source: str = ""
    cores: int | None = None
    available: float | None = None  # CPU: memory free for a new process right now

    def peak_for(self, precision: str) -> float | None:
        """Peak FLOP/s for a recipe precision (bf16-true/-mixed run bf16 matmuls, 32-true fp32 ones)."""
        key = {"32-true": "fp32", "bf16-true": "bf16", "bf16-mixed": "bf16", "16-mixed": "fp16"}.get(
            precision
        )
        return self.peak.get(key) if key else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "memory": round(self.memory),
            "peak_flops": {k: round(v) for k, v in self.peak.items()},
            "bandwidth": self.bandwidth,
            "description": self.description,
            "source": self.source,
            **({"cores": self.cores} if self.cores else {}),
            **({"available": round(self.available)} if self.available else {}),
        }


GPUS: dict[str, Device] = {
    "a100-40gb": Device(
        name="a100-40gb",
        kind="cuda",
        memory=40960 * MIB,
        peak={"bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS},
        bandwidth=1555e9,
        description="NVIDIA A100 SXM4 40GB (HBM2)",
        source="NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 Tensor Core 312 TFLOPS (dense), FP32 19.5 "
        "TFLOPS, 40 GB HBM2, 1,555 GB/s. https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/"
        "pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    "rtx4090-24gb": Device(
        name="rtx4090-24gb",
        kind="cuda",
        memory=24564 * MIB,
        peak={"bf16": 165.2 * TFLOPS, "fp16": 165.2 * TFLOPS, "fp32": 82.6 * TFLOPS},
        bandwidth=1008e9,
        description="NVIDIA GeForce RTX 4090 (24 GB GDDR6X)",
        source="NVIDIA Ada Lovelace GPU architecture whitepaper v2.1, Appendix A, Table 2 (GeForce RTX 4090): "
        "peak BF16/FP16 Tensor TFLOPS with FP32 accumulate 165.2 (dense), FP32 82.6 TFLOPS, 24 GB, 1,008 GB/s. "
        "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
    ),
    "h100-80gb": Device(
        name="h100-80gb",
        kind="cuda",
        memory=81559 * MIB,
        peak={"bf16": 989.4 * TFLOPS, "fp16": 989.4 * TFLOPS, "fp32": 66.9 * TFLOPS},
        bandwidth=3.35e12,
        description="NVIDIA H100 SXM5 80GB (HBM3)",
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity "
        "(989.4 dense), FP32 67 TFLOPS, 80 GB HBM3, 3.35 TB/s. https://resources.nvidia.com/en-us-tensor-core/"
        "nvidia-tensor-core-gpu-datasheet",
    ),
}
NAMES = (*GPUS, "cpu")


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path, encoding="ascii").read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def cpu_memory() -> tuple[float, float]:
    """(total, available now) bytes for a process on this machine (cgroup limit respected)."""
    info = _meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", total)
    limit = _cgroup_limit()
    if limit:
        total, available = min(total, limit), min(available, limit)
    return float(total), float(available)


def _matmul_flops(dtype_name: str, seconds: float = 0.05) -> float:
    """Best-of square-matmul FLOP/s on this CPU: the same measurement the tracker's MFU uses."""
    import torch

    from daytune.track.flops import measure_peak

    return measure_peak(torch.device("cpu"), getattr(torch, dtype_name), seconds)


@functools.lru_cache(maxsize=1)
def cpu_device() -> Device:
    """This machine, measured (about 0.2 s): cores, memory, fp32 and bf16 matmul peaks."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total, available = cpu_memory()
    peak = {"fp32": _matmul_flops("float32")}
    try:
        peak["bf16"] = _matmul_flops("bfloat16")
    except (RuntimeError, TypeError):
        pass
    return Device(
        name="cpu",
        kind="cpu",
        memory=total,
        peak=peak,
        description=f"this machine: {cores} cores ({torch.get_num_threads()} torch threads), "
        f"{total / 2**30:.1f} GiB",
        source="measured: cores and memory from the OS, peaks from a 1024x1024 matmul in this process "
        "(daytune.track.flops.measure_peak)",
        cores=cores,
        available=available,
    )


def get_device(name: str) -> Device:
    key = name.strip().lower()
    if key == "cpu":
        return cpu_device()
    if key in GPUS:
        return GPUS[key]
    raise ConfigError(f"--gpu {name!r}: unknown device; one of {', '.join(NAMES)}")


def detect(torch_device) -> Device:
    """The device a training run uses: a known GPU by name (with its real memory), another GPU with its real
    memory and the datasheet peak of daytune.track.flops when it has one (none: no speed prediction), or this
    CPU measured."""
    if torch_device.type != "cuda":
        return cpu_device()
    import torch

    from daytune.track.flops import table_peak

    props = torch.cuda.get_device_properties(torch_device)
    name = props.name.lower()
    total = float(props.total_memory)
    table = {k: table_peak(props.name, dt) for k, dt in
             (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))}  # fmt: skip
    peak = {k: v for k, v in table.items() if v}
    for key, marker in (("h100-80gb", "h100"), ("a100-40gb", "a100"), ("rtx4090-24gb", "4090")):
        if marker in name and (key != "a100-40gb" or total < 60 * 2**30):
            known = GPUS[key]  # the datasheet table tells the PCIe H100 from the SXM one
            return replace(known, memory=total, peak=peak or known.peak, description=props.name)
    source = "torch.cuda memory; peaks: the datasheet table in daytune/track/flops.py" if peak else (
        "torch.cuda memory; peak unknown: no speed prediction")  # fmt: skip
    return Device(
        name=props.name, kind="cuda", memory=total, peak=peak, description=props.name, source=source
    )
