"""Linear layers with their weights packed once for oneDNN, for bf16 inference on CPUs.

`F.linear` on a CPU re-lays out a bf16 weight for oneDNN on every call; a decode step calls ~200 linear layers on a
few rows each, so that reorder, not the arithmetic, is much of the step. Packing each weight once at load (what
inductor's freezing does for a compiled CPU model, with the same PyTorch ops) removes it: on a 2-core CPU with AMX,
SmolLM2-135M's output layer on 8 rows takes 1.2 ms packed against 2.1 ms unpacked in bf16 and 10 ms in fp32, and a
decode step of 8 rows is 1.26x faster (benchmarks/serve_vllm.py measures the server). The arithmetic is the
unpacked layer's: oneDNN's kernel for the same dtypes (bf16 products accumulated in fp32).

fp32 weights are left as they are: there MKL's packed kernel measured slower than `F.linear` for prompts.
Only inference: packed weights take no gradient, and the module keeps no `weight` a trainer or exporter could use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this PyTorch build packs weights of `dtype` on `device` (bf16 on a CPU with oneDNN)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """`nn.Linear` for inference, its weight packed once in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(w, rows_hint), persistent=False
        )
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of an inference model by a `PackedLinear` where this build can pack its
    dtype; returns how many. Each packed layer is checked against `F.linear` on one input first: a mismatch (a
    PyTorch whose internal ops changed meaning) leaves the model as it was and raises."""
    todo = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and can_pack(child.weight.dtype, child.weight.device)
    ]
    if not todo:
        return 0
    done = []
    with torch.no_grad():
        for parent, name, child in todo:
            packed = PackedLinear(child)
            x = torch.randn(
                3, child.in_features, dtype=child.weight.dtype, generator=torch.Generator().manual_seed(0)
            )
            ref, got = F.linear(x, child.weight, child.bias).float(), packed(x).float()
            if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-6):
                for p, n, c in done:  # put back what was already swapped
                    setattr(p, n, c)
                raise RuntimeError(f"packed linear {name} disagrees with F.linear: not packing this model")
            setattr(parent, name, packed)
            done.append((parent, name, child))
    return len(done)
