"""Device and precision choice. `auto` measures instead of assuming: many CPUs run bf16 matmuls hundreds of
times slower than fp32 (no AVX-512 BF16/AMX), and picking bf16 there would waste the whole budget."""

from __future__ import annotations

import functools
import time

import torch

from daytune.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available here; use auto or cpu")
    return device


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
        return torch.cuda.is_bf16_supported()
    try:
        fp32 = _time_matmul(torch.float32, device)
        bf16 = _time_matmul(torch.bfloat16, device)
    except (RuntimeError, TypeError):
        return False
    return bf16 <= 1.5 * fp32


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map `auto` to the fastest precision this device runs well; check explicit choices are possible."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "bf16-true" if bf16_is_fast(device.type) else "32-true"
    if precision == "16-mixed" and device.type == "cpu":
        raise ConfigError(
            "train.precision: 16-mixed needs a GPU; use 32-true (or bf16-mixed on CPUs with bf16)"
        )
    return precision


def param_dtype(precision: str) -> torch.dtype:
    """Dtype the model weights are loaded in."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast_kind(precision: str) -> str:
    """The `mixed_precision` argument accelerate expects."""
    return {"bf16-mixed": "bf16", "16-mixed": "fp16"}.get(precision, "no")
