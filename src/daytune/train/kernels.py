"""`train.kernels`: Liger's fused Triton kernels on CUDA (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy).

Liger (`pip install liger-kernel`, linkedin/Liger-Kernel) patches a transformers model in place: its RMSNorm and
MLP modules run one fused kernel each, and RoPE one kernel for q and k. The loss is daytune's own (engine/loss.py,
on label positions only); with `liger` it is Liger's fused linear cross-entropy, which never materialises the
logits (the chunked loss does the same in PyTorch, at more kernel launches). Parameter names do not change, so
checkpoints and adapters are the eager model's.

Triton kernels run on CUDA only: on a CPU (or MPS) `liger` falls back to PyTorch's kernels and says so; `auto`
uses Liger on CUDA when it is installed, else PyTorch's. A model family Liger does not patch is an error with
`liger`, and PyTorch's kernels with `auto`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from daytune.errors import ConfigError

KERNEL_CHOICES = ("auto", "liger", "none")
PATCHED = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(setting: str, device: torch.device) -> tuple[str, str]:
    """('liger' | 'none', why): what this run uses, and the reason a user reads in the log."""
    if setting not in KERNEL_CHOICES:
        raise ConfigError(f"train.kernels: {setting!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if setting == "none":
        return "none", "train.kernels none"
    if device.type != "cuda":
        return "none", f"Liger's kernels are Triton kernels for CUDA; PyTorch's kernels on {device.type}"
    if not liger_installed():
        if setting == "liger":
            raise ConfigError("train.kernels liger: liger-kernel is not installed (pip install liger-kernel)")
        return "none", "liger-kernel is not installed; PyTorch's kernels"
    return "liger", "Liger's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy"


def apply_liger(model, setting: str) -> bool:
    """Patch the (unwrapped, pre-PEFT or PEFT) transformers model in place; False when Liger has nothing for its
    family and `setting` is auto (liger: an error, not a run the user thinks is fused)."""
    from liger_kernel.transformers import monkey_patch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    apply_fn = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        if setting == "liger":
            raise ConfigError(f"train.kernels liger: Liger has no kernels for model type {model_type!r}")
        return False
    apply_fn(model=base, **PATCHED)
    return True


def fused_linear_ce() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Summed cross-entropy of (hidden @ weight.T) against targets, without materialising the logits."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="sum").float()

    return loss
