"""Hardware facts in one place: which device a run uses, the precision it computes in, and what a device can do.

One rule picks the precision for a real device (`resolve_precision`) and for a planned one (`planned_precision`):
CUDA runs bf16 where the GPU has it (16-mixed before Ampere); CPUs run bf16 only where it is measured fast, since
many run bf16 matmuls hundreds of times slower than fp32 (no AVX-512 BF16/AMX). GPU peaks and memory come from one
datasheet table (`DATASHEETS`), read by the planner (`daytune plan --gpu`), by a run planning its own device
(`detect`) and by the tracker's MFU (`table_peak`); CPUs and unknown GPUs are measured (`measure_peak`).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace

import torch

from daytune.errors import ConfigError

TFLOPS = 1e12
MIB = 2**20

# ---- the device and precision of a run --------------------------------------------------------------------


def nvidia_driver() -> str | None:
    """Where an NVIDIA driver shows itself on this machine (its /proc file or nvidia-smi), or None."""
    import shutil

    if os.path.exists("/proc/driver/nvidia/version"):
        return "/proc/driver/nvidia/version"
    return shutil.which("nvidia-smi")


def cuda_unusable_message(where: str) -> str:
    return (
        f"{where}: this machine has an NVIDIA driver ({nvidia_driver()}) but this PyTorch ({torch.__version__}) "
        "cannot use CUDA, so the run would silently fall back to the CPU. Install a CUDA build, e.g. make setup "
        'TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128", or choose the CPU '
        "explicitly (train.device: cpu, --device cpu)"
    )


def pick_device(name: str = "auto", field_name: str = "train.device") -> torch.device:
    """The device `name` means here. `auto` never falls back to the CPU silently on a machine with an NVIDIA
    driver: a CPU-only PyTorch there is an installation mistake (a 7B run would take days), so it is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        if nvidia_driver():
            raise ConfigError(cuda_unusable_message(f"{field_name} auto"))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if nvidia_driver():
            raise ConfigError(cuda_unusable_message(f"{field_name} {name}"))
        raise ConfigError(f"{field_name}: {name!r} requested but CUDA is not available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{field_name}: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
            "(CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return device


def use_device(device: torch.device, processes: int = 1) -> torch.device:
    """Make `device` the one this process computes on and return it with its index: `cuda:1` becomes the current
    CUDA device (so everything that says just "cuda" lands there); under several processes each takes its own
    GPU, so an explicit index is refused. On CUDA, fp32 matmuls (LoRA weights, the loss) may use TF32 tensor
    cores: 8x the fp32 peak on Ampere and later, with a 10-bit mantissa that training does not notice."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        if processes > 1:
            raise ConfigError(
                f"train.device: {device} names one GPU, but each of the {processes} processes takes its own; "
                "use cuda or auto"
            )
        torch.cuda.set_device(device)
    enable_tf32()
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def enable_tf32() -> None:
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision"):  # PyTorch >= 2.9
        matmul.fp32_precision = "tf32"
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously, so a clock read without it measures the
    launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def has_native_bf16() -> bool:
    """bf16 in hardware (Ampere and later). `is_bf16_supported()` alone also says yes where bf16 is emulated
    (T4, V100), at a fraction of the fp16 speed."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # PyTorch < 2.3 did not count emulation
        return torch.cuda.is_bf16_supported()


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype eval and serve load weights in: bf16 on GPUs that have it, fp16 on older ones (a 7B model in
    fp32 is 27 GB: more than a 24 GB card, and half the speed); fp32 on CPUs (most run 16-bit matmuls slowly)."""
    if device.type == "cuda":
        return torch.bfloat16 if has_native_bf16() else torch.float16
    return torch.float32


def _time_matmul(dtype: torch.dtype, device: torch.device, n: int = 128, reps: int = 8) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b).sum().item()  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        c.sum().item()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=8)
def bf16_is_fast(device_type: str) -> bool:
    """True when bf16 matmul is no slower than 1.5x fp32 on this device (measured, ~10 ms)."""
    device = torch.device(device_type)
    if device.type == "cuda":
        return has_native_bf16()
    try:
        fp32 = _time_matmul(torch.float32, device)
        bf16 = _time_matmul(torch.bfloat16, device)
    except (RuntimeError, TypeError):
        return False
    return bf16 <= 1.5 * fp32


def auto_precision(kind: str, has_bf16: bool) -> str:
    """The one rule behind `precision: auto`. `has_bf16`: a GPU that supports bf16, or a CPU that runs it fast."""
    if kind == "cuda":
        return "bf16-true" if has_bf16 else "16-mixed"
    return "bf16-true" if has_bf16 else "32-true"


def _check_precision(precision: str, kind: str, field_name: str) -> str:
    if precision == "16-mixed" and kind == "cpu":
        raise ConfigError(
            f"{field_name}: 16-mixed needs a GPU; use 32-true (or bf16-mixed on CPUs with bf16)"
        )
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map `auto` to the fastest precision this device runs well; check explicit choices are possible."""
    if precision == "auto":
        has_bf16 = has_native_bf16() if device.type == "cuda" else bf16_is_fast(device.type)
        return auto_precision(device.type, has_bf16)
    return _check_precision(precision, device.type, "train.precision")


def planned_precision(precision: str, device: Device) -> str:
    """`resolve_precision` for a device the planner targets: the same rule, read off its peaks (a GPU has bf16
    when its datasheet lists a bf16 peak; a CPU's bf16 is fast when its measured peak is within 1.5x of fp32)."""
    if precision == "auto":
        bf16, fp32 = device.peak.get("bf16", 0.0), device.peak.get("fp32", 0.0)
        has_bf16 = bf16 > 0 if device.kind == "cuda" else bf16 >= fp32 / 1.5
        return auto_precision(device.kind, has_bf16)
    return _check_precision(precision, device.kind, "--precision")


def param_dtype(precision: str) -> torch.dtype:
    """Dtype the model weights are loaded in."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast_kind(precision: str) -> str:
    """The `mixed_precision` argument accelerate expects."""
    return {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision, "no")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a precision."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


# ---- what a device can do ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datasheet:
    """Published numbers of one GPU. `match`: lower-case fragments of `torch.cuda.get_device_name` that must all
    appear (first match in DATASHEETS wins, so order matters); `half`: dense bf16/fp16 tensor TFLOP/s; `plan`: the
    `daytune plan --gpu` name, for GPUs the planner offers (those also give memory and bandwidth)."""

    match: tuple[str, ...]
    half: float | None
    fp32: float | None
    plan: str | None = None
    memory_mib: int | None = None
    bandwidth: float | None = None
    description: str = ""
    source: str = ""


# Dense peaks (no sparsity: "with sparsity" figures halved). Sources: NVIDIA datasheets and whitepapers.
#   V100 / T4 list FP16 tensor peaks only (their bf16 is emulated); A10G (AWS) has no public datasheet: measured.
DATASHEETS: list[Datasheet] = [
    Datasheet(
        ("h100", "pcie"),
        756.0,
        51.0,
        source="NVIDIA H100 Tensor Core GPU datasheet (PCIe): 1,513 BF16 with sparsity, 51 FP32",
    ),  # fmt: skip
    Datasheet(
        ("h100",),
        989.4,
        67.0,
        plan="h100-80gb",
        memory_mib=81559,
        bandwidth=3.35e12,
        description="NVIDIA H100 SXM5 80GB (HBM3)",
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity "
        "(989.4 dense), FP32 67 TFLOPS, 80 GB HBM3, 3.35 TB/s. https://resources.nvidia.com/en-us-tensor-core/"
        "nvidia-tensor-core-gpu-datasheet",
    ),
    Datasheet(("h200",), 989.4, 67.0, source="NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    Datasheet(
        ("a100",),
        312.0,
        19.5,
        plan="a100-40gb",
        memory_mib=40960,
        bandwidth=1555e9,
        description="NVIDIA A100 SXM4 40GB (HBM2)",
        source="NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 Tensor Core 312 TFLOPS (dense), FP32 19.5 "
        "TFLOPS, 40 GB HBM2, 1,555 GB/s. https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/"
        "pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    Datasheet(
        ("rtx 4090",),
        165.2,
        82.6,
        plan="rtx4090-24gb",
        memory_mib=24564,
        bandwidth=1008e9,
        description="NVIDIA GeForce RTX 4090 (24 GB GDDR6X)",
        source="NVIDIA Ada Lovelace GPU architecture whitepaper v2.1, Appendix A, Table 2 (GeForce RTX 4090): "
        "peak BF16/FP16 Tensor TFLOPS with FP32 accumulate 165.2 (dense), FP32 82.6 TFLOPS, 24 GB, 1,008 GB/s. "
        "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
    ),
    Datasheet(
        ("rtx 3090",), 71.0, 35.6, source="NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A"
    ),
    Datasheet(("l40s",), 362.0, 91.6, source="NVIDIA L40S datasheet"),
    Datasheet(("l4",), 121.0, 30.3, source="NVIDIA L4 datasheet"),
    Datasheet(("a10g",), None, None, source="no public datasheet: measured"),
    Datasheet(("a10",), 125.0, 31.2, source="NVIDIA A10 datasheet"),
    Datasheet(("v100",), 125.0, 15.7, source="NVIDIA V100 datasheet (FP16 tensor)"),
    Datasheet(("t4",), 65.0, 8.1, source="NVIDIA T4 datasheet (FP16 tensor)"),
]


def datasheet(device_name: str) -> Datasheet | None:
    name = device_name.lower()
    return next((d for d in DATASHEETS if all(f in name for f in d.match)), None)


def table_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak in FLOP/s for a GPU name (torch.cuda.get_device_name), or None when not in the table."""
    sheet = datasheet(device_name)
    value = None if sheet is None else (sheet.fp32 if dtype == torch.float32 else sheet.half)
    return None if value is None else value * TFLOPS


def measure_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.1) -> float:
    """FLOP/s of a square matmul on `device` in `dtype`, best of the repeats that fit in about `seconds`."""
    n = 1024 if device.type == "cpu" else 4096
    gen = torch.Generator().manual_seed(0)  # its own generator: training's random state stays untouched
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    (a @ b).sum().item()  # warm up
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_label(device: torch.device) -> str:
    return f"{device.type} x{torch.get_num_threads()} threads" if device.type == "cpu" else device.type


def device_peak(
    device: torch.device, precision: str, override_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): the override, the datasheet, or measured."""
    if override_tflops:
        return override_tflops * 1e12, "track.peak_tflops"
    dtype = compute_dtype(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, dtype)
        if peak is not None:
            return peak, f"datasheet: {name}, {str(dtype).replace('torch.', '')}"
    peak = measure_peak(device, dtype)
    return peak, f"measured: {device_label(device)} {str(dtype).replace('torch.', '')} matmul"


# ---- devices a plan targets -------------------------------------------------------------------------------


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


def _sheet_peaks(sheet: Datasheet) -> dict[str, float]:
    half = {"bf16": sheet.half * TFLOPS, "fp16": sheet.half * TFLOPS} if sheet.half else {}
    return half | ({"fp32": sheet.fp32 * TFLOPS} if sheet.fp32 else {})


GPUS: dict[str, Device] = {
    d.plan: Device(
        name=d.plan,
        kind="cuda",
        memory=d.memory_mib * MIB,
        peak=_sheet_peaks(d),
        bandwidth=d.bandwidth,
        description=d.description,
        source=d.source,
    )
    for d in DATASHEETS
    if d.plan
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


@functools.lru_cache(maxsize=1)
def cpu_device() -> Device:
    """This machine, measured (about 0.2 s): cores, memory, fp32 and bf16 matmul peaks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total, available = cpu_memory()
    cpu = torch.device("cpu")
    peak = {"fp32": measure_peak(cpu, torch.float32, 0.05)}
    try:
        peak["bf16"] = measure_peak(cpu, torch.bfloat16, 0.05)
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
        "(daytune.hardware.measure_peak)",
        cores=cores,
        available=available,
    )


def get_device(name: str) -> Device:
    """A device the planner targets by name: one of GPUS, or `cpu` (this machine)."""
    key = name.strip().lower()
    if key == "cpu":
        return cpu_device()
    if key in GPUS:
        return GPUS[key]
    raise ConfigError(f"--gpu {name!r}: unknown device; one of {', '.join(NAMES)}")


def detect(torch_device: torch.device) -> Device:
    """The device a training run uses: a known GPU by name (with its real memory), another GPU with its real
    memory and its datasheet peak when DATASHEETS has one (none: no speed prediction), or this CPU measured."""
    if torch_device.type != "cuda":
        return cpu_device()
    props = torch.cuda.get_device_properties(torch_device)
    total = float(props.total_memory)
    sheet = datasheet(props.name)
    peak = _sheet_peaks(sheet) if sheet else {}
    name = props.name.lower()
    for key, marker in (("h100-80gb", "h100"), ("a100-40gb", "a100"), ("rtx4090-24gb", "4090")):
        if marker in name and (key != "a100-40gb" or total < 60 * 2**30):
            known = GPUS[key]  # the datasheet table tells the PCIe H100 from the SXM one
            return replace(known, memory=total, peak=peak or known.peak, description=props.name)
    source = "torch.cuda memory; peaks: the datasheet table in daytune/hardware.py" if peak else (
        "torch.cuda memory; peak unknown: no speed prediction")  # fmt: skip
    return Device(
        name=props.name, kind="cuda", memory=total, peak=peak, description=props.name, source=source
    )
