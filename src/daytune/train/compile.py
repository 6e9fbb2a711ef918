"""`train.compile`: torch.compile (inductor, on CPU and CUDA) of each decoder block.

Blocks, not the whole model: every block of a model has the same code, so one compilation serves them all
(minutes saved on a 7B model), and the parts around them (embedding, the chunked loss, PEFT's wrappers) stay eager
and easy to read. `module.compile()` compiles in place, so parameter names, checkpoints and saved adapters are
the ones of the eager model.

Compilation runs inside the first steps and counts against the budget, so it pays back only in longer runs. On a
2-core CPU with AMX, SmolLM2-135M with LoRA (benchmarks/train_throughput.py, daytune-lora-compile) spent 39 s
compiling in its first step, then stepped 1.21x faster than eager fp32: it breaks even after ~4 minutes of training
(on a CPU without AMX: ~75 s for 1.27x; a whole-model compile there: ~196 s for 1.16x). `auto` compiles on CUDA when
the budget is at least COMPILE_MIN_BUDGET; `true` always compiles. The steps that compile are kept out of the
budget's step times (they would make it stop early), and the timing probe and validation run eager (no extra graphs
to compile for them).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch

COMPILE_MIN_BUDGET = 3600.0  # seconds: `auto` compiles only when the run is this long
COMPILE_CHOICES = (True, False, "auto")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with ($CXX, else g++ or clang++), None when there is none."""
    return shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("clang++")


def wants_compile(setting: bool | str, device: torch.device, budget_seconds: float | None) -> bool:
    """Whether this run compiles: `true`, or `auto` with a budget of an hour or more, on CUDA or on a CPU with a C++
    compiler (measured on two CPUs: 1.21x and 1.27x a LoRA step, paid back in minutes)."""
    if setting == "auto":
        if budget_seconds is None or budget_seconds < COMPILE_MIN_BUDGET:
            return False
        return device.type == "cuda" or (device.type == "cpu" and cpp_compiler() is not None)
    return bool(setting)


def block_classes(model) -> set[str]:
    """The class names of the model's repeated blocks: transformers lists them in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def compile_blocks(model) -> int:
    """Compile every decoder block in place; returns how many. A model without known blocks is an error here,
    not a silent eager run the user thinks is compiled."""
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks to compile (no _no_split_modules)")
    for block in blocks:
        block.compile()
    return len(blocks)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far: a step that raised it compiled (first step, new shape)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def eager(enabled: bool = True):
    """Run compiled modules eagerly inside the block (the timing probe, validation): nothing new to compile."""
    return torch.compiler.set_stance("force_eager") if enabled else contextlib.nullcontext()
