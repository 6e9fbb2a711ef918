"""The server's fast path: a Llama-family forward pass written for decoding, on the model's own weights.

A decode step of a small model on a CPU streams every weight from memory once, and around those matmuls
transformers' modules spend ~50 PyTorch ops and several Python calls per layer (RMSNorm alone is six ops):
SmolLM2-135M's 30 layers cost ~1,500 dispatches a step. This forward does the same computation with fewer, larger
ops: one matmul for q, k and v and one for the MLP's gate and up projections (their weights concatenated once; the
model's own projections become views of the concatenation, so no memory is added; bf16 on a CPU keeps a copy packed
for oneDNN beside them, engine/packed.py), PyTorch's fused `F.rms_norm`, `F.scaled_dot_product_attention` with
grouped-query heads, and the rotary tables from the model's own rotary module (so every RoPE variant transformers
supports is computed by transformers). Measured on a 2-core CPU, a bf16 step of 8 rows: 57.5 -> 49.8 ms on one
thread, 38.5 -> 36.0 ms on two; fp32 steps, bound by their matmuls, are unchanged
(benchmarks/serve_profile.py breaks a step down).

It reads and writes the same transformers `DynamicCache` the model's forward uses, so batches merge, rows leave and
prefixes are cached exactly as before (engine/decode.py, engine/prefix_cache.py). Only architectures whose layer is
exactly Llama's are taken (`SUPPORTED`, checked field by field), and `enable_fast_path` compares the fast forward
with the model's own on a short batch (padding, a cache, a decode step) before it is used: anything else keeps the
model's forward. Inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daytune.engine.packed import PackedLinear, can_pack

# model classes whose decoder layer is Llama's (pre-norm RMSNorm, RoPE attention, SiLU-gated MLP), given the config
# checks in `_unsupported`
SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
ATTR = "_daytune_fast"  # where the model carries its fast path


class _Linear(nn.Module):
    """A linear layer over a weight this module owns (the fused projections), packed for oneDNN where it can be."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        super().__init__()
        self.inner = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.inner.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.inner.bias = nn.Parameter(bias, requires_grad=False)
        self.call = PackedLinear(self.inner) if pack else self.inner

    def forward(self, x):
        return self.call(x)


def _fuse(linears: list[nn.Linear], pack: bool) -> _Linear:
    """One linear layer for several that read the same input; each original keeps a view of its rows."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
    if any(b is not None for b in biases) and bias is None:
        raise ValueError("some projections have a bias and some do not")
    row = 0
    for m in linears:  # the model's own modules now read the fused tensors: no second copy of the weights
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return _Linear(weight, bias, pack)


def _unsupported(model) -> str | None:
    """Why this model cannot take the fast path, or None."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not a Llama-family model the fast path knows"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act}"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(cfg, "mlp_bias", False):
        return "an MLP with biases"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    if hasattr(model, "peft_config"):
        return "an unmerged adapter"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "layers"):
        return "no rotary module or layers where Llama keeps them"
    return None


class FastForward:
    """The fast forward pass of one loaded model (see the module's docstring)."""

    def __init__(self, model, pack: bool):
        base = model.model
        cfg = model.config
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm = base.norm
        self.head = model.get_output_embeddings()
        self.config = cfg
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm,
                    _fuse([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    attn.o_proj if not pack else PackedLinear(attn.o_proj),
                    layer.post_attention_layernorm,
                    _fuse([mlp.gate_proj, mlp.up_proj], pack),
                    mlp.down_proj if not pack else PackedLinear(mlp.down_proj),
                    float(getattr(attn, "scaling", self.head_dim**-0.5)),
                )
            )
        self.intermediate = cfg.intermediate_size
        self.head_call = PackedLinear(self.head) if pack and type(self.head) is nn.Linear else self.head
        # linear layers computed by oneDNN on packed weights (fused ones count once)
        self.packed = (4 * len(self.layers) + (self.head_call is not self.head)) if pack else 0

    @staticmethod
    def _rms(x: torch.Tensor, norm) -> torch.Tensor:
        # transformers' RMSNorm: normalise in fp32, round to the input's dtype, then scale
        eps = norm.variance_epsilon
        return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def _mask(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        """Boolean (rows, 1, width, columns): causal over the columns, none of a row's padding; each position
        also sees itself, so a padding position's attention is defined (its output is never used)."""
        cols = mask.shape[1]
        past = cols - width
        q = torch.arange(width, device=mask.device)[:, None] + past
        k = torch.arange(cols, device=mask.device)[None, :]
        allowed = (k <= q)[None] & mask.bool()[:, None, :]
        allowed |= (k == q)[None]
        return allowed[:, None]

    @torch.no_grad()
    def __call__(self, ids, mask, positions, cache, hidden: bool):
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if cache is None:
            cache = DynamicCache(config=self.config)
        rows, width = ids.shape
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)
        cos, sin = cos[:, None], sin[:, None]
        attn_mask = None if width == 1 and bool(mask.all()) else self._mask(mask, width)
        nq, nkv, hd = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        half = hd // 2
        for i, (norm1, qkv, o_proj, norm2, gate_up, down, scale) in enumerate(self.layers):
            x = qkv(self._rms(h, norm1))
            q = x[..., :nq].view(rows, width, self.heads, hd).transpose(1, 2)
            k = x[..., nq : nq + nkv].view(rows, width, self.kv_heads, hd).transpose(1, 2)
            v = x[..., nq + nkv :].view(rows, width, self.kv_heads, hd).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            k, v = cache.update(k, v, i)
            a = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=self.kv_heads != self.heads
            )
            h = h + o_proj(a.transpose(1, 2).reshape(rows, width, nq))
            gu = gate_up(self._rms(h, norm2))
            h = h + down(F.silu(gu[..., : self.intermediate]) * gu[..., self.intermediate :])
        h = self._rms(h, self.norm)
        logits = self.head_call(h[:, -1:])
        name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=logits, hidden_states=(h,) if hidden else None, **{name: cache})


def fast_forward(model) -> FastForward | None:
    """The model's fast path, when `enable_fast_path` gave it one."""
    return getattr(model, ATTR, None)


@torch.no_grad()
def enable_fast_path(model, *, log=None) -> bool:
    """Give an inference model the fast path when its architecture is one it computes exactly, bf16 weights on a
    CPU packed for oneDNN; check it against the model's own forward first (a prompt batch with padding, then a
    decode step on the cache). False, with the model's own forward used, when it is not taken."""
    why = _unsupported(model)
    if why is None:
        dtype, device = (
            model.get_output_embeddings().weight.dtype,
            model.get_output_embeddings().weight.device,
        )
        # the model's projections become views of the fused weights: the same values, so a fast path that fails
        # its check leaves a model that computes what it computed (and no second copy is ever held)
        fast = FastForward(model, pack=can_pack(dtype, device))
        why = _self_check(model, fast)
    if why is not None:
        if log is not None:
            log(f"fast decode path not used: {why}")
        return False
    setattr(model, ATTR, fast)
    return True


def _self_check(model, fast: FastForward) -> str | None:
    from daytune.engine.forward import _cache_of, _model_forward

    device = model.get_output_embeddings().weight.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second row is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = _model_forward(model, ids, mask, positions, None, False)
    got = fast(ids, mask, positions, None, False)
    step = torch.tensor([[1], [2]], device=device)
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    pos2 = positions[:, -1:] + 1
    ref2 = _model_forward(model, step, mask2, pos2, _cache_of(ref), False)
    got2 = fast(step, mask2, pos2, _cache_of(got), False)
    scale = 1e-4 if model.dtype == torch.float32 else 5e-2  # bf16/fp16: rounding differs op by op
    for a, b in ((ref.logits[:, -1], got.logits[:, -1]), (ref2.logits[:, -1], got2.logits[:, -1])):
        a, b = a.float(), b.float()
        if not torch.allclose(a, b, rtol=0, atol=scale * float(a.abs().max()) + 1e-5):
            return f"its logits differ from the model's own forward by {float((a - b).abs().max()):.3g}"
    return None
