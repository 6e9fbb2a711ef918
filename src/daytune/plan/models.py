"""Architecture numbers of the base models daytune plans for, so a plan never needs the weights.

Every entry is copied from the model's published `config.json` on the Hugging Face hub (the `source` URL); the
parameter count in `published_params` is the one the model card or paper states, and a test checks that the
numbers below reproduce it. `daytune.models.registry` is the other registry: it knows how to *load* a model by
name (today only the embedded `smollm2-135m`); names shared by both registries mean the same model.

A model that is not registered can still be planned: `arch_from_config` reads any `config.json` (a local Hugging
Face folder, or a resolved model reference) of the families below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

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
    loadable: str | None = None  # name in daytune.models.registry when daytune can load it by name
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


def _hf(hub_id: str) -> str:
    return f"https://huggingface.co/{hub_id}/blob/main/config.json"


def _llama(name, hub_id, h, layers, heads, kv, i, vocab, seq, tied, params, licence, **kw) -> Arch:
    return Arch(
        name=name,
        family="llama",
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        intermediate=i,
        vocab=vocab,
        tied=tied,
        max_seq_len=seq,
        hub_id=hub_id,
        source=_hf(hub_id),
        published_params=params,
        licence=licence,
        **kw,
    )


def _pythia(size: str, h: int, layers: int, heads: int, vocab: int, params: int) -> Arch:
    hub_id = f"EleutherAI/pythia-{size}"
    return Arch(
        name=f"pythia-{size}",
        family="neox",
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        intermediate=4 * h,
        vocab=vocab,
        tied=False,
        max_seq_len=2048,
        bias=True,
        rotary_fraction=0.25,
        hub_id=hub_id,
        source=_hf(hub_id),
        published_params=params,
        licence="Apache-2.0",
        notes="parameter count: Pythia paper (Biderman et al. 2023), Table 1 / model card",
    )


# fmt: off
REGISTRY: dict[str, Arch] = {
    a.name: a
    for a in [
        _llama("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, 32, 32, 32, 11008, 32000, 4096, False,
               6_738_415_616, "Llama 2 Community License"),
        _llama("llama-2-13b", "meta-llama/Llama-2-13b-hf", 5120, 40, 40, 40, 13824, 32000, 4096, False,
               13_015_864_320, "Llama 2 Community License"),
        _llama("mistral-7b", "mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, 32768, False,
               7_241_732_096, "Apache-2.0", notes="sliding window 4096 (no effect below 4096 tokens)"),
        _llama("open-llama-3b", "openlm-research/open_llama_3b", 3200, 26, 32, 32, 8640, 32000, 2048, False,
               3_426_473_600, "Apache-2.0"),
        _llama("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 30, 9, 3, 1536, 49152, 8192, True,
               134_515_008, "Apache-2.0", challenge=False, loadable="smollm2-135m",
               notes="daytune's embedded CPU demo model (2024, not a challenge base model)"),
        _llama("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, 8192, True,
               361_821_120, "Apache-2.0", challenge=False),
        _llama("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, 8192, True,
               1_711_376_384, "Apache-2.0", challenge=False),
        _llama("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, 131072, False,
               8_030_261_248, "Llama 3.1 Community License", challenge=False,
               notes="not a challenge model (2024); registered to check the planner against torchtune's numbers"),
        Arch(
            name="qwen-14b",
            family="qwen",
            hidden=5120,
            layers=40,
            heads=40,
            kv_heads=40,
            intermediate=13696,  # config.json says 27392: Qwen's MLP halves it (w1, w2: 5120 -> 13696)
            vocab=152064,
            tied=False,
            max_seq_len=2048,
            qkv_bias=True,
            hub_id="Qwen/Qwen-14B",
            source=_hf("Qwen/Qwen-14B"),
            published_params=14_167_290_880,
            licence="Tongyi Qianwen License",
            notes="custom code (trust_remote_code): daytune can plan it but will not load it",
        ),
        Arch(
            name="falcon-7b",
            family="falcon",
            hidden=4544,
            layers=32,
            heads=71,
            kv_heads=1,  # multi-query attention
            intermediate=4 * 4544,
            vocab=65024,
            tied=True,
            max_seq_len=2048,
            hub_id="tiiuae/falcon-7b",
            source=_hf("tiiuae/falcon-7b"),
            published_params=6_921_720_704,
            licence="Apache-2.0",
        ),
        Arch(
            name="phi-2",
            family="phi",
            hidden=2560,
            layers=32,
            heads=32,
            kv_heads=32,
            intermediate=10240,
            vocab=51200,
            tied=False,
            max_seq_len=2048,
            bias=True,
            head_bias=True,
            rotary_fraction=0.4,
            hub_id="microsoft/phi-2",
            source=_hf("microsoft/phi-2"),
            published_params=2_779_683_840,
            licence="MIT",
        ),
        _pythia("70m", 512, 6, 8, 50304, 70_426_624),
        _pythia("160m", 768, 12, 12, 50304, 162_322_944),
        _pythia("410m", 1024, 24, 16, 50304, 405_334_016),
        _pythia("1b", 2048, 16, 8, 50304, 1_011_781_632),
        _pythia("1.4b", 2048, 24, 16, 50304, 1_414_647_808),
        _pythia("2.8b", 2560, 32, 32, 50304, 2_775_208_960),
        _pythia("6.9b", 4096, 32, 32, 50432, 6_857_302_016),
        _pythia("12b", 5120, 36, 40, 50688, 11_846_072_320),
    ]
}
ALIASES = {"llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "openllama-3b": "open-llama-3b",
           "open_llama_3b": "open-llama-3b", "mistral-7b-v0.1": "mistral-7b", "phi2": "phi-2"}
# fmt: on


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

    def need(*keys):
        for k in keys:
            if k in config:
                return config[k]
        raise ModelError(f"{name}: config.json has no {' or '.join(keys)}")

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}

    def rotary(key: str, default: float) -> float:
        return float(config.get(key) or rope.get("partial_rotary_factor") or default)

    h = int(need("hidden_size", "n_embed", "n_embd"))
    layers = int(need("num_hidden_layers", "n_layer"))
    heads = int(need("num_attention_heads", "n_head"))
    vocab = int(need("vocab_size"))
    common = dict(name=name, hidden=h, layers=layers, heads=heads, vocab=vocab, source="config.json")
    if family == "llama":
        return Arch(
            family="llama",
            kv_heads=int(config.get("num_key_value_heads") or heads),
            intermediate=int(need("intermediate_size")),
            tied=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            head_dim=int(config.get("head_dim") or h // heads),
            bias=bool(config.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",
            **common,
        )
    if family == "qwen":
        return Arch(
            family="qwen",
            kv_heads=heads,
            intermediate=int(need("intermediate_size")) // 2,
            tied=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=int(config.get("seq_length", 2048)),
            qkv_bias=True,
            **common,
        )
    if family == "neox":
        return Arch(
            family="neox",
            kv_heads=heads,
            intermediate=int(config.get("intermediate_size") or 4 * h),
            tied=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            bias=True,
            rotary_fraction=rotary("rotary_pct", 1.0),
            **common,
        )
    if family == "falcon":
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
    return Arch(  # phi
        family="phi",
        kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate=int(need("intermediate_size")),
        tied=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        bias=True,
        head_bias=True,
        rotary_fraction=rotary("partial_rotary_factor", 0.5),
        **common,
    )


def resolve_arch(ref: str) -> Arch:
    """A registered name, or a folder / config.json / model reference daytune can resolve (no weights read)."""
    key = ALIASES.get(ref.strip().lower(), ref.strip().lower())
    if key in REGISTRY:
        return REGISTRY[key]
    path = Path(ref).expanduser()
    by_hub_id = {a.hub_id.lower(): a for a in REGISTRY.values()}
    if key in by_hub_id and not path.exists():  # a registered model's hub id: no download
        return by_hub_id[key]
    if path.is_file() and path.name.endswith(".json"):
        return _arch_from_file(path, path.parent.name or ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json; pass a Hugging Face model folder or a registered name")
        return _arch_from_file(path / "config.json", path.name)
    if path.suffix == ".gguf":  # the model resolver converts it once (cached) and writes its config.json
        from daytune.models import resolve_model

        folder = resolve_model(ref, log=lambda *a: None)
        return _arch_from_file(folder / "config.json", ref)
    if "/" in ref and not path.exists():  # a hub id: its config.json alone (cached when fetched before)
        return _arch_from_file(_hub_config(ref), ref)
    names = ", ".join(sorted(REGISTRY))
    raise ModelError(f"unknown model '{ref}': use a registered name ({names}) or a folder with config.json")


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all end the same way for the user
        raise ModelError(
            f"cannot read {repo_id}'s config.json from the Hugging Face hub ({type(e).__name__}); pass a registered "
            "name (daytune plan --list), or a folder or config.json file downloaded elsewhere"
        ) from None


def _arch_from_file(path: Path, name: str) -> Arch:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e})") from None
    arch = arch_from_config(config, name)
    known = next((a for a in REGISTRY.values() if _same_shape(a, arch)), None)
    return replace(arch, hub_id=known.hub_id, licence=known.licence) if known else arch


def _same_shape(a: Arch, b: Arch) -> bool:
    fields = ("family", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


__all__ = ["Arch", "REGISTRY", "FAMILY_LINEARS", "arch_from_config", "resolve_arch"]
