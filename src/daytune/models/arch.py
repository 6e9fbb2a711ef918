"""The architecture numbers memory and FLOPs depend on, and how to read them from a Hugging Face `config.json`.

`daytune.models.registry` holds the numbers of the models daytune knows by name (cited); `arch_from_config`
reads any `config.json` (a local Hugging Face folder, or a resolved model reference) of the families below.
"""

from __future__ import annotations

from dataclasses import dataclass

from daytune.errors import ModelError

# Module names of each family's linear layers, in the roles the memory model needs.
#   attn_in:  projections that read the attention block's normalized input
#   attn_out: the attention output projection
#   mlp_in:   projections that read the MLP's normalized input
#   mlp_out:  the MLP output projection
FAMILY_LINEARS = {
    "llama": {
        "attn_in": ["q_proj", "k_proj", "v_proj"],
        "attn_out": ["o_proj"],
        "mlp_in": ["gate_proj", "up_proj"],
        "mlp_out": ["down_proj"],
    },
    "neox": {
        "attn_in": ["query_key_value"],
        "attn_out": ["dense"],
        "mlp_in": ["dense_h_to_4h"],
        "mlp_out": ["dense_4h_to_h"],
    },
    "falcon": {
        "attn_in": ["query_key_value"],
        "attn_out": ["dense"],
        "mlp_in": ["dense_h_to_4h"],
        "mlp_out": ["dense_4h_to_h"],
    },
    "phi": {
        "attn_in": ["q_proj", "k_proj", "v_proj"],
        "attn_out": ["dense"],
        "mlp_in": ["fc1"],
        "mlp_out": ["fc2"],
    },
    "qwen": {
        "attn_in": ["c_attn"],
        "attn_out": ["attn.c_proj"],
        "mlp_in": ["w1", "w2"],
        "mlp_out": ["mlp.c_proj"],
    },
}


@dataclass(frozen=True)
class Arch:
    """What memory and FLOPs depend on. `family` picks the block layout (see FAMILY_LINEARS):

    llama   pre-norm RMSNorm, separate q/k/v, gated SiLU MLP (Llama, Mistral, OpenLLaMA, SmolLM2, Qwen2)
    qwen    Qwen (v1): like llama with a fused, biased qkv projection
    neox    GPT-NeoX (Pythia): LayerNorms, fused biased qkv, parallel attention and GELU MLP
    falcon  Falcon-7B: one LayerNorm feeding parallel attention (multi-query) and GELU MLP, no biases
    phi     Phi-2: one LayerNorm, parallel attention and tanh-GELU MLP, biases everywhere
    """

    name: str
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_seq_len: int
    head_dim: int = 0  # 0: hidden // heads
    bias: bool = False  # linear layers carry biases (qkv and everything else)
    qkv_bias: bool = False  # only the qkv projection has a bias (Qwen)
    head_bias: bool = False  # the output layer has a bias (Phi-2)
    rotary_fraction: float = 1.0
    hub_id: str = ""
    licence: str = ""
    source: str = ""  # the published config.json these numbers come from
    published_params: int | None = None  # total parameters as published (model card / paper)
    challenge: bool = True  # a base model allowed by the NeurIPS 2023 LLM Efficiency Challenge
    notes: str = ""

    def __post_init__(self):
        if self.family not in FAMILY_LINEARS:
            raise ModelError(f"{self.name}: unknown architecture family {self.family!r}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    # ---- shapes ------------------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.family in ("llama", "qwen")

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same block input (GPT-J style) instead of one after the other."""
        return self.family in ("neox", "falcon", "phi")

    @property
    def norm(self) -> str:
        return "rms" if self.family in ("llama", "qwen") else "layer"

    @property
    def norms_per_layer(self) -> int:
        return 1 if self.family in ("falcon", "phi") else 2

    def linears(self) -> list[tuple[str, str, int, int, bool]]:
        """(module name, role, in features, out features, has bias) for one transformer block."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        b = self.bias
        if self.family == "llama":
            return [
                ("q_proj", "attn_in", h, q, b),
                ("k_proj", "attn_in", h, kv, b),
                ("v_proj", "attn_in", h, kv, b),
                ("o_proj", "attn_out", q, h, b),
                ("gate_proj", "mlp_in", h, i, b),
                ("up_proj", "mlp_in", h, i, b),
                ("down_proj", "mlp_out", i, h, b),
            ]
        if self.family == "qwen":
            return [
                ("c_attn", "attn_in", h, q + 2 * kv, True),
                ("attn.c_proj", "attn_out", q, h, False),
                ("w1", "mlp_in", h, i, False),
                ("w2", "mlp_in", h, i, False),
                ("mlp.c_proj", "mlp_out", i, h, False),
            ]
        if self.family == "phi":
            return [
                ("q_proj", "attn_in", h, q, True),
                ("k_proj", "attn_in", h, kv, True),
                ("v_proj", "attn_in", h, kv, True),
                ("dense", "attn_out", q, h, True),
                ("fc1", "mlp_in", h, i, True),
                ("fc2", "mlp_out", i, h, True),
            ]
        # neox, falcon: fused query_key_value
        return [
            ("query_key_value", "attn_in", h, q + 2 * kv, b),
            ("dense", "attn_out", q, h, b),
            ("dense_h_to_4h", "mlp_in", h, i, b),
            ("dense_4h_to_h", "mlp_out", i, h, b),
        ]

    # ---- parameter counts --------------------------------------------------------------------------------
    def norm_params(self) -> int:
        per = self.hidden * (1 if self.norm == "rms" else 2)  # LayerNorm has a bias
        return per

    def layer_linear_params(self) -> int:
        return sum(i * o + (o if bias else 0) for _, _, i, o, bias in self.linears())

    def layer_params(self) -> int:
        return self.layer_linear_params() + self.norms_per_layer * self.norm_params()

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        """The output layer's own parameters (0 when tied to the embeddings)."""
        return 0 if self.tied else self.vocab * self.hidden + (self.vocab if self.head_bias else 0)

    def total_params(self) -> int:
        return (
            self.layers * self.layer_params()
            + self.embedding_params()
            + self.head_params()
            + self.norm_params()
        )

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token: blocks + output layer (not the lookup)."""
        return self.layers * self.layer_linear_params() + self.vocab * self.hidden

    def summary(self) -> str:
        return (
            f"{self.layers} layers, {self.hidden} wide, {self.heads} heads ({self.kv_heads} kv), "
            f"MLP {self.intermediate}, vocab {self.vocab}{', tied' if self.tied else ''}"
        )


_FAMILY_OF_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt_neox": "neox",
    "falcon": "falcon",
    "RefinedWebModel": "falcon",
    "RefinedWeb": "falcon",
    "phi": "phi",
    "qwen": "qwen",
}


def arch_from_config(config: dict, name: str = "model") -> Arch:
    """An Arch from a Hugging Face `config.json` mapping (the families above; others raise ModelError)."""
    model_type = config.get("model_type", "")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(sorted(_FAMILY_OF_MODEL_TYPE))
        raise ModelError(f"{name}: cannot plan model_type {model_type!r}; the planner knows {known}")
    common = dict(
        name=name,
        hidden=int(_need(config, name, "hidden_size", "n_embed", "n_embd")),
        layers=int(_need(config, name, "num_hidden_layers", "n_layer")),
        heads=int(_need(config, name, "num_attention_heads", "n_head")),
        vocab=int(_need(config, name, "vocab_size")),
        source="config.json",
    )
    return _FAMILY_READERS[family](config, common)


def _need(config: dict, name: str, *keys: str):
    """The first of `keys` the config has (families name the same number differently)."""
    for k in keys:
        if k in config:
            return config[k]
    raise ModelError(f"{name}: config.json has no {' or '.join(keys)}")


def _rotary(config: dict, key: str, default: float) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(config.get(key) or rope.get("partial_rotary_factor") or default)


def _llama_config(config: dict, common: dict) -> Arch:
    name, h, heads = common["name"], common["hidden"], common["heads"]
    qwen2 = config.get("model_type") == "qwen2"  # Qwen2: a llama layout whose qkv projection alone has a bias
    return Arch(
        family="llama",
        kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate=int(_need(config, name, "intermediate_size")),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        head_dim=int(config.get("head_dim") or h // heads),
        bias=bool(config.get("attention_bias", False)) and not qwen2,
        qkv_bias=qwen2,
        **common,
    )


def _qwen_config(config: dict, common: dict) -> Arch:
    name, heads = common["name"], common["heads"]
    return Arch(
        family="qwen",
        kv_heads=heads,
        intermediate=int(_need(config, name, "intermediate_size")) // 2,
        tied=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("seq_length", 2048)),
        qkv_bias=True,
        **common,
    )


def _neox_config(config: dict, common: dict) -> Arch:
    h, heads = common["hidden"], common["heads"]
    return Arch(
        family="neox",
        kv_heads=heads,
        intermediate=int(config.get("intermediate_size") or 4 * h),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        bias=True,
        rotary_fraction=_rotary(config, "rotary_pct", 1.0),
        **common,
    )


def _falcon_config(config: dict, common: dict) -> Arch:
    name, h, heads = common["name"], common["hidden"], common["heads"]
    new_arch = bool(config.get("new_decoder_architecture", False))
    if new_arch or not config.get("parallel_attn", True):
        raise ModelError(f"{name}: the planner knows Falcon-7B's layout (parallel, one LayerNorm) only")
    kv = 1 if config.get("multi_query", True) else int(config.get("num_kv_heads") or heads)
    return Arch(
        family="falcon",
        kv_heads=kv,
        intermediate=int(config.get("ffn_hidden_size") or 4 * h),
        tied=bool(config.get("tie_word_embeddings", True)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        bias=bool(config.get("bias", False)),
        **common,
    )


def _phi_config(config: dict, common: dict) -> Arch:
    name, heads = common["name"], common["heads"]
    return Arch(
        family="phi",
        kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate=int(_need(config, name, "intermediate_size")),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        bias=True,
        head_bias=True,
        rotary_fraction=_rotary(config, "partial_rotary_factor", 0.5),
        **common,
    )


_FAMILY_READERS = {
    "llama": _llama_config,
    "qwen": _qwen_config,
    "neox": _neox_config,
    "falcon": _falcon_config,
    "phi": _phi_config,
}
