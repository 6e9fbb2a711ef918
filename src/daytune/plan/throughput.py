"""Predicted training speed: FLOPs per token over the device's peak, times an efficiency measured on real runs.

FLOPs per token (executed, not only useful):
  forward   2 x (block matmul parameters) + the output layer at label positions only (daytune.engine)
            + attention: 4 x layers x keys x q_dim (keys = seq/2 with a causal kernel, the whole row with a
            packing/padding mask, which SDPA computes in full)
  backward  the same again for input gradients down to the lowest trainable layer, plus 2 x trainable matmul
            parameters for weight gradients; gradient checkpointing adds one more forward of the blocks.

Efficiency (achieved / peak FLOP/s) is not guessed: `REFERENCE_RUNS` lists measured runs, and the efficiency of a
(device kind, method class) is the measured tokens/s of its reference runs divided by what this model predicts at
100 %. GPU references are published runs (cited); CPU references are daytune runs on a 2-core CPU, measured by
`benchmarks/planner_accuracy.py` with the matmul peak measured in the same process. Small micro-batches run
matmuls below peak; `utilization` scales for that (half efficiency at `HALF_TOKENS` tokens per micro-batch).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from daytune.hardware import Device
from daytune.models.arch import Arch
from daytune.models.registry import MODELS
from daytune.plan.memory import TORCHTUNE_2024, Setup, trainable_params


def method_class(method: str) -> str:
    """Methods that cost alike: full (all weight gradients), qlora (4-bit dequantization), frozen-base."""
    return method if method in ("full", "qlora") else "frozen-base"


def flops_per_token(arch: Arch, s: Setup) -> float:
    seq = s.seq_len + (s.virtual_tokens if s.method in ("prompt", "ptuning") else 0)
    layers = arch.layers
    block_mm = arch.layer_linear_params()
    keys = seq if s.masked else (seq + 1) / 2
    attn = 4 * keys * arch.q_dim  # QK^T and AV, per layer per token
    per_block = 2 * block_mm + attn
    head = 2 * arch.hidden * arch.vocab * (s.label_fraction if s.stack.logits == "labels" else 1.0)
    forward = layers * per_block + head
    if s.method == "freeze":  # backward stops at the lowest trainable block
        grad_depth = min(s.freeze_top_k, layers) / layers
    else:
        grad_depth = 1.0
    backward = layers * per_block * grad_depth + head
    n_train = trainable_params(arch, s)
    if s.method in ("full", "freeze"):
        weight_grads = 2 * (arch.layer_linear_params() * (layers if s.method == "full" else s.freeze_top_k))
        if s.method == "full" or s.freeze_train_head:
            weight_grads += head
    else:
        weight_grads = 2 * n_train if s.method in ("lora", "dora", "qlora") else 0.0
        backward += 4 * n_train  # the adapters' own forward and input-gradient matmuls
    recompute = layers * per_block if s.gradient_checkpointing else 0.0
    return forward + backward + weight_grads + recompute


@dataclass(frozen=True)
class ReferenceRun:
    """A measured training run: what it was, and its tokens/s."""

    device: str  # a devices.GPUS name, or "cpu"
    model: str  # a models.registry.MODELS name
    setup: Setup
    tokens_per_s: float
    source: str
    peak_flops: float | None = None  # CPU runs: the matmul peak measured in the same process


_TORCHTUNE = TORCHTUNE_2024
_TT = "torchtune README, 'Memory and training speed' (Llama 3.1 8B, batch 2, packed to 2048, torch.compile): "

REFERENCE_RUNS: list[ReferenceRun] = [
    ReferenceRun("rtx4090-24gb", "llama-3.1-8b",
                 Setup(method="lora", seq_len=2048, micro_batch=2, packing=True, gradient_checkpointing=True,
                       lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       lora_dropout=0.0, stack=_TORCHTUNE),
                 3083, _TT + "LoRA on 1x 4090: 3083 tokens/s"),
    ReferenceRun("rtx4090-24gb", "llama-3.1-8b",
                 Setup(method="qlora", seq_len=2048, micro_batch=2, packing=True, gradient_checkpointing=True,
                       lora_targets="all-linear", lora_dropout=0.0, stack=_TORCHTUNE),
                 2413, _TT + "QLoRA on 1x 4090: 2413 tokens/s"),
    ReferenceRun("rtx4090-24gb", "llama-3.1-8b",
                 Setup(method="full", seq_len=2048, micro_batch=2, packing=True, gradient_checkpointing=True,
                       optimizer="paged_adamw_8bit", stack=_TORCHTUNE),
                 1650, _TT + "full fine-tuning on 1x 4090: 1650 tokens/s"),
]  # fmt: skip
# CPU reference runs, measured by benchmarks/planner_accuracy.py (SmolLM2-135M, fp32, packed GSM8K, 2 cores).
# Each is (method, seq_len, micro_batch, checkpointing, label fraction, tokens/s, matmul peak FLOP/s measured in
# the same process a moment before): the ratio, not the absolute speed, is what carries over to another CPU.
# Measured on a 2-core machine shared with other jobs (the matmul peaks show it: 34-70 GFLOP/s), hence the median.
# fmt: off
CPU_RUNS: list[tuple[str, int, int, bool, float, float, float]] = [
    ("lora", 256, 1, False, 0.5098, 24.37, 6.847e10),  # lora-256x1
    ("lora", 1024, 2, False, 0.502, 26.5, 6.985e10),  # lora-1024x2
    ("lora", 1024, 4, True, 0.4988, 28.17, 4.802e10),  # lora-1024x4-ckpt
    ("full", 512, 2, False, 0.4511, 14.58, 6.71e10),  # full-512x2
    ("lora", 512, 2, False, 0.4511, 14.32, 3.381e10),  # lora-all-linear-512x2 (its adapters: +1 % FLOPs)
]
# fmt: on

HALF_TOKENS = {"cuda": 256, "cpu": 16}  # tokens per micro-batch at which matmuls reach half their efficiency


def utilization(tokens: int, kind: str) -> float:
    half = HALF_TOKENS.get(kind, 256)
    return tokens / (tokens + half)


def _reference_runs() -> list[ReferenceRun]:
    runs = list(REFERENCE_RUNS)
    for method, seq, mb, ckpt, labels, tps, peak in CPU_RUNS:
        setup = Setup(method=method, precision="32-true", seq_len=seq, micro_batch=mb, packing=True,
                      gradient_checkpointing=ckpt, device_type="cpu", label_fraction=labels)  # fmt: skip
        runs.append(ReferenceRun("cpu", "smollm2-135m", setup, tps, "benchmarks/planner_accuracy.py", peak))
    return runs


def efficiency(kind: str, method: str) -> tuple[float, list[str]]:
    """Achieved share of peak for this device kind and method class, from the reference runs (their median: CPU
    runs on a shared machine have outliers), and the sources it rests on. Falls back to the frozen-base class,
    then to any run of the kind."""
    from daytune.hardware import GPUS

    runs = [r for r in _reference_runs() if (r.device == "cpu") == (kind == "cpu")]
    for wanted in (method_class(method), "frozen-base", None):
        chosen = [r for r in runs if wanted is None or method_class(r.setup.method) == wanted]
        if chosen:
            break
    else:
        return (0.3 if kind == "cuda" else 0.5), ["no reference run: a conservative default"]
    values = []
    for r in chosen:
        peak = r.peak_flops or GPUS[r.device].peak_for(r.setup.precision)
        ideal = peak / flops_per_token(MODELS[r.model].arch, r.setup)
        values.append(r.tokens_per_s / (ideal * utilization(r.setup.tokens, kind)))
    return statistics.median(values), [r.source for r in chosen]


@dataclass
class Speed:
    flops_per_token: float
    peak_flops: float | None
    efficiency: float | None
    tokens_per_s: float | None  # positions computed per second (padding included)
    sources: list[str]

    def to_dict(self) -> dict:
        return {
            "flops_per_token": round(self.flops_per_token),
            "peak_flops": self.peak_flops,
            "efficiency": None if self.efficiency is None else round(self.efficiency, 4),
            # three significant digits: a 7B model on a CPU without fast bf16 makes well under 0.1 token/s
            "tokens_per_s": None if self.tokens_per_s is None else float(f"{self.tokens_per_s:.3g}"),
            "efficiency_from": self.sources,
        }


def predict(arch: Arch, s: Setup, device: Device) -> Speed:
    f = flops_per_token(arch, s)
    peak = device.peak_for(s.precision)
    if peak is None:
        return Speed(f, None, None, None, ["unknown device peak: no speed prediction"])
    eff, sources = efficiency(device.kind, s.method)
    eff *= utilization(s.tokens, device.kind)
    return Speed(f, peak, eff, peak * eff / f, sources)


def with_setup(s: Setup, **changes) -> Setup:
    return replace(s, **changes)
