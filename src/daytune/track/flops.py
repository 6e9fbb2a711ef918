"""Model FLOPs and MFU (model FLOPs utilization: useful FLOPs per second over the device's peak).

Model FLOPs of a training step, per token: 2N forward + 2N backward through every weight (activation gradients,
frozen weights included) + 2N weight gradients for the weights that train, where N counts parameters in matmuls
(embedding lookups excluded, the output layer included), plus attention: QK^T and AV cost 2·d·L² per layer for an
example of length L (causal: half the square, d = heads x head dim) forward, twice that backward. Padding is not
counted; the backward through layers below the lowest trainable weight is (as every MFU report counts it).

The peak (`daytune.hardware.device_peak`) is the dense tensor-core throughput from the datasheet table for the
precision the run computes in, or, on CPUs and unknown devices, a matmul measured once (~0.1 s) on the device in
that precision. `track.peak_tflops` overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
