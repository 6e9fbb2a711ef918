"""What the planner plans for: a model reference resolved to its architecture, without reading any weights.

A registered name, alias or hub id gives the registry's cited numbers (`daytune.models.registry`); any other local
folder, `config.json`, `.gguf` file or hub id is read through `daytune.models.arch.arch_from_config`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from daytune.errors import ModelError
from daytune.models.arch import Arch, arch_from_config
from daytune.models.registry import MODELS, model_with_hub_id, named_model


def resolve_arch(ref: str) -> Arch:
    """A registered name, or a folder / config.json / model reference daytune can resolve (no weights read)."""
    known = named_model(ref)
    if known is not None:
        return known.arch
    path = Path(ref).expanduser()
    known = model_with_hub_id(ref)
    if known is not None and not path.exists():  # a registered model's hub id: no download
        return known.arch
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
    names = ", ".join(sorted(MODELS))
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
    """A config.json's architecture; one shaped like a registered model borrows its hub id and licence."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e})") from None
    arch = arch_from_config(config, name)
    known = next((m.arch for m in MODELS.values() if _same_shape(m.arch, arch)), None)
    return replace(arch, hub_id=known.hub_id, licence=known.licence) if known else arch


def _same_shape(a: Arch, b: Arch) -> bool:
    fields = ("family", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied")
    return all(getattr(a, f) == getattr(b, f) for f in fields)
