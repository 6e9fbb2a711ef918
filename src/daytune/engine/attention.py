"""Packed rows on the flash kernel: variable-length attention for training on CUDA.

A packed row holds several examples that must not attend to each other. Through SDPA that takes a (batch, 1, seq,
seq) boolean mask, which keeps SDPA off its flash kernel and becomes a float bias in every layer (O(seq²) memory
each, kept for backward). On CUDA in bf16/fp16, a model switched to `VARLEN` (`use_varlen`) instead runs
PyTorch's own variable-length flash attention (`torch.nn.attention.varlen`) over the rows flattened into one
stream of segments (`cu_seq_lens`: where each example, and each row's padding, starts), causal inside a segment:
no mask at all. The batch says which path it takes: with `cu_seq_lens_q` in it (data/batching.py builds it when
asked), the model attends by segments; without, it is plain SDPA with whatever mask it was given, so held-out
loss, probing and CPU runs behave as before. CPUs keep the block-diagonal mask (the kernel is CUDA-only).
"""

from __future__ import annotations

import torch

VARLEN = "daytune_varlen"
_registered = False


def _kernel():
    """PyTorch's varlen flash attention, or None where this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def reference_varlen(
    q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False
):
    """What the kernel computes, one segment at a time through SDPA (causal): for tests on CPUs, which have no
    varlen kernel, and to check the kernel against on a GPU."""
    out = torch.empty_like(q)
    bounds = cu_seq_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        out[a:b] = o[0].transpose(0, 1)
    return out


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """The varlen kernel runs here: CUDA, a 16-bit compute dtype, a GPU with flash attention (Ampere and later)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or _kernel() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out. With
    `cu_seq_lens_q` the rows are flattened and attended segment by segment; otherwise this is SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    max_len = kwargs.pop("max_length_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_k", None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if dropout:
        raise NotImplementedError("varlen attention: attention dropout is not supported")
    b, h, t, d = query.shape
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, hk, d)
    v = value.transpose(1, 2).reshape(b * t, hk, d)
    max_len = int(max_len)
    out = _kernel()(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), enable_gqa=hk != h)
    return out.view(b, t, h, d), None


def _mask(**kwargs):
    """Mask creation for VARLEN models: none when no padding mask is given (packed rows carry their segments,
    unpadded rows are causal), SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(VARLEN, varlen_attention)
        AttentionMaskInterface.register(VARLEN, _mask)
        _registered = True


def use_varlen(model) -> bool:
    """Switch a model that uses SDPA to VARLEN (packed batches then need `cu_seq_lens_q`); False when the model
    attends some other way (eager, an attention that takes no interface)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(VARLEN)
    return True
