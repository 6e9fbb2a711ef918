"""`train.compile`: torch.compile (inductor, on CPU and CUDA) of each decoder block.

Blocks, not the whole model: every block of a model has the same code, so one compilation serves them all
(minutes saved on a 7B model), and the parts around them (embedding, the chunked loss, PEFT's wrappers) stay eager
and easy to read. `module.compile()` compiles in place, so parameter names, checkpoints and saved adapters are
the ones of the eager model.

Compilation runs inside the first steps and counts against the budget, so it pays back only in longer runs. On
a 2-core CPU, SmolLM2-135M with LoRA (benchmarks/train_throughput.py, daytune-lora-compile) spent ~75 s compiling in
its first step, then stepped 1.27x faster than eager fp32: it breaks even after ~6 minutes of training (an earlier
measurement of a whole-model compile: ~196 s for 1.16x). `auto` compiles on CUDA when the budget is at least
COMPILE_MIN_BUDGET; `true` always compiles. The steps that compile are kept out of the budget's step times (they would make it stop early),
and the timing probe and validation run eager (no extra graphs to compile for them).
"""

from __future__ import annotations

import contextlib

import torch

COMPILE_MIN_BUDGET = 3600.0  # seconds: `auto` compiles only when the run is this long (and on CUDA)
COMPILE_CHOICES = (True, False, "auto")


def wants_compile(setting: bool | str, device: torch.device, budget_seconds: float | None) -> bool:
    """Whether this run compiles: `true`, or `auto` on CUDA with a budget of an hour or more."""
    if setting == "auto":
        return device.type == "cuda" and budget_seconds is not None and budget_seconds >= COMPILE_MIN_BUDGET
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
