"""Model FLOPs and MFU (model FLOPs utilization: useful FLOPs per second over the device's peak).

Model FLOPs of a training step, per token: 2N forward + 2N backward through every weight (activation gradients,
frozen weights included) + 2N weight gradients for the weights that train, where N counts parameters in matmuls
(embedding lookups excluded, the output layer included), plus attention: QK^T and AV cost 2·d·L² per layer for an
example of length L (causal: half the square, d = heads x head dim) forward, twice that backward. Padding is not
counted; the backward through layers below the lowest trainable weight is (as every MFU report counts it).

The peak is the dense (no sparsity) tensor-core throughput from NVIDIA's datasheets for the precision the run
computes in, or, on CPUs and unknown devices, a matmul measured once (~0.1 s) on the device in that precision.
`track.peak_tflops` overrides both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense peak TFLOP/s: {device name fragment: (bf16/fp16 tensor, fp32)}, first match wins (order matters).
# Sources: NVIDIA datasheets, where "with sparsity" figures are halved to dense ones.
#   H100 / H200: H100 Tensor Core GPU datasheet (SXM 1,979 BF16 sparse, 67 FP32; PCIe 1,513 / 51); H200 datasheet
#   A100: A100 Tensor Core GPU datasheet (312 BF16 dense, 19.5 FP32)
#   RTX 4090: NVIDIA Ada GPU architecture whitepaper, appendix A (165.2 BF16 with FP32 accumulate, 82.6 FP32)
#   RTX 3090: NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A (71 BF16 with FP32 accumulate, 35.6 FP32)
#   L40S / L4 / A10: product datasheets (362 / 121 / 125 BF16 dense; 91.6 / 30.3 / 31.2 FP32)
#   V100 / T4: datasheets (125 / 65 FP16 tensor; 15.7 / 8.1 FP32)
PEAK_TFLOPS: list[tuple[tuple[str, ...], float, float]] = [
    (("h100", "pcie"), 756.0, 51.0),
    (("h100",), 989.4, 67.0),  # SXM (the name says "HBM3")
    (("h200",), 989.4, 67.0),
    (("a100",), 312.0, 19.5),
    (("rtx 4090",), 165.2, 82.6),
    (("rtx 3090",), 71.0, 35.6),
    (("l40s",), 362.0, 91.6),
    (("l4",), 121.0, 30.3),
    (("a10g",), None, None),  # AWS's A10G differs from the A10 and has no public datasheet: measure it
    (("a10",), 125.0, 31.2),
    (("v100",), 125.0, 15.7),
    (("t4",), 65.0, 8.1),
]


def compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def table_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet peak in FLOP/s for a GPU name (torch.cuda.get_device_name), or None when not in the table."""
    name = device_name.lower()
    for fragments, half, single in PEAK_TFLOPS:
        if all(f in name for f in fragments):
            value = single if dtype == torch.float32 else half
            return None if value is None else value * 1e12
    return None


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


def device_peak(
    device: torch.device, precision: str, override_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "track.peak_tflops"
    dtype = compute_dtype(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name, dtype)
        if peak is not None:
            return peak, f"datasheet: {name}, {str(dtype).replace('torch.', '')}"
    peak = measure_peak(device, dtype)
    return peak, f"measured: {n_label(device)} {str(dtype).replace('torch.', '')} matmul"


def n_label(device: torch.device) -> str:
    return f"{device.type} x{torch.get_num_threads()} threads" if device.type == "cpu" else device.type


@dataclass
class ModelFlops:
    """What the FLOP count needs from a model: matmul parameters (all, trainable) and the attention shape."""

    matmul_params: int
    trainable_matmul_params: int
    layers: int
    attention_dim: int  # heads x head dim (queries)

    def per_token(self) -> float:
        """Matmul FLOPs of one trained token (no attention)."""
        return 4.0 * self.matmul_params + 2.0 * self.trainable_matmul_params

    def step(self, tokens: int, squared_lengths: int) -> float:
        """FLOPs of a step that trains `tokens` non-padding tokens in examples whose lengths squared sum to
        `squared_lengths`."""
        return self.per_token() * tokens + 3 * 2.0 * self.layers * self.attention_dim * squared_lengths

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFlops:
        total = trainable = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):  # also bitsandbytes' 4-bit and 8-bit linears
                n = module.in_features * module.out_features
                total += n
                trainable += n if module.weight.requires_grad else 0
        config = getattr(model, "config", None)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
        return cls(total, trainable, layers, heads * int(head_dim))

    @classmethod
    def of_config(cls, config, full: bool) -> ModelFlops:
        """From a Llama-style transformers config (no model built): q,o + k,v + gate,up,down + the output layer."""
        h, layers = config.hidden_size, config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size
        n = layers * per_layer + h * config.vocab_size
        return cls(n, n if full else 0, layers, q)


def flops_per_token(config, full: bool, seq: int) -> float:
    """Model FLOPs per trained token for sequences of `seq` tokens (each token attends to seq/2 on average)."""
    m = ModelFlops.of_config(config, full)
    return m.step(seq, seq * seq) / seq
