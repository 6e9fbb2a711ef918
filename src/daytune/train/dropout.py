"""LoRA dropout on a CPU, at a third of PyTorch's cost.

PyTorch draws a CPU dropout mask one Mersenne-Twister number per element, on one thread: for the LoRA inputs of a
135M model (7 adapted layers x 30 blocks, 4 x 512 x 576 activations each) that is 6 ms a layer, 17 % of a bf16
training step on a CPU whose matmuls are fast (benchmarks/train_throughput.py, `--profile`). Here the mask comes
from NumPy's PCG64 instead, four 16-bit draws out of each 64-bit word, seeded from PyTorch's own CPU generator:
a run stays reproducible from `train.seed`, and a resumed run (whose checkpoint holds that generator's state) draws
the masks it would have drawn.

The distribution is dropout's: every element is kept independently with probability 1 - p and scaled by
1 / (1 - p). The drop probability is rounded to a multiple of 1/65536 (p = 0.05 drops 3277/65536 = 0.050003).
CUDA keeps PyTorch's dropout (its masks are drawn inside the kernel); so does a compiled model (train.compile),
whose graphs trace PyTorch's op.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LEVELS = 1 << 16  # 16-bit draws


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - round(p * 65536) / 65536."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))  # from PyTorch's CPU generator: seeded, checkpointed
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)
    draws = torch.from_numpy(words).view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return draws >= round(p * LEVELS) - LEVELS // 2


class CPUDropout(torch.nn.Dropout):
    """`nn.Dropout` with `keep_mask` on CPU tensors in training; PyTorch's own op everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0 or self.inplace:
            return super().forward(x)
        return torch.where(keep_mask(x.shape, self.p), x * (1.0 / (1.0 - self.p)), 0)


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace the PEFT LoRA layers' dropout modules (`lora_dropout[adapter]`) by `CPUDropout` with the same p;
    the number replaced. No parameters change: adapters and checkpoints are the same files."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                drops[name] = CPUDropout(drop.p)
                replaced += 1
    return replaced
