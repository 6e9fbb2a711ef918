"""Resolve a model reference to a local Hugging Face folder, then load model and tokenizer from it.

References: a registered name (`smollm2-135m`), a local HF folder (has config.json), a `.gguf` file, or a hub id
(`org/name`). A GGUF is dequantized once and cached as safetensors under $DAYTUNE_HOME/models, because parsing
GGUF metadata takes tens of seconds and transformers refuses to `save_pretrained` a GGUF-loaded model.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from daytune.errors import ModelError
from daytune.fileio import sha256_file, temp_dir_beside
from daytune.models.registry import MODELS, Model, embedded_gguf, loadable_model, loadable_names

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def daytune_home() -> Path:
    return Path(os.environ.get("DAYTUNE_HOME", Path.home() / ".cache" / "daytune")).expanduser()


def is_hub_id(ref: str) -> bool:
    """`org/name`: the form of a Hugging Face hub id (a relative path can have it too)."""
    return bool(_HUB_ID.match(ref))


def cached_models() -> tuple[Path, list[str]]:
    """The cache of converted models ($DAYTUNE_HOME/models) and what it holds."""
    cache = daytune_home() / "models"
    return cache, sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def resolve_model(ref: str, *, log=print) -> Path:
    """Return a local folder with config.json, tokenizer files and safetensors weights for `ref`."""
    ref = str(ref).strip()
    if not ref:
        raise ModelError(
            "empty model reference; use a name (smollm2-135m), a folder, a .gguf file or a hub id"
        )
    known = loadable_model(ref)
    if known is not None:
        if known.python_package:
            return gguf_to_hf(embedded_gguf(known), log=log)
        return _from_hub(known.hub_id)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return gguf_to_hf(path, log=log)
    if path.exists():
        raise ModelError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _from_hub(ref)
    names = ", ".join(loadable_names())
    raise ModelError(
        f"unknown model reference '{ref}': not a registered name ({names}), an existing folder or .gguf file, "
        "or a hub id of the form org/name"
    )


def local_tokenizer_dir(ref: str) -> Path | None:
    """The model's own tokenizer folder when it is on this machine (a folder, or a registered model, resolved);
    None for anything else: the planner then measures data without it."""
    path = Path(ref).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path
    if loadable_model(ref) is not None:
        return resolve_model(ref, log=lambda *a: None)
    return None


def _from_hub(hub_id: str) -> Path:
    """A hub id: use the local HF cache if it has the files, otherwise try to download them."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as e:  # network errors, gated repos, unknown ids all land here
        raise ModelError(
            f"cannot fetch '{hub_id}' from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "If this machine is offline, download the model elsewhere (`huggingface-cli download "
            f"{hub_id} --local-dir DIR`), copy DIR here and pass --model DIR, or pass a .gguf file."
        ) from None


def gguf_to_hf(gguf: Path, *, log=print) -> Path:
    """Dequantize a GGUF once into $DAYTUNE_HOME/models/<stem>-<sha>/ (fp32 safetensors + tokenizer)."""
    gguf = gguf.resolve()
    target = daytune_home() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    log(f"Converting {gguf.name} to safetensors (once; cached in {target})...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise ModelError(f"cannot load GGUF {gguf}: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain fp32 model
    config.name_or_path = gguf.stem
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Converted in {time.monotonic() - t0:.0f}s.")
    return target


@dataclass(frozen=True)
class ModelRow:
    """One registered model as `daytune models` and `daytune plan --list` show it."""

    name: str
    hub_id: str
    params: int
    family: str
    licence: str
    loadable: bool  # `--model NAME` loads it (the others: by hub id, or planned only)
    challenge: bool  # a base model the NeurIPS 2023 LLM Efficiency Challenge allowed
    local: str  # what this machine has: converted, embedded, cached, config only, not installed, -
    summary: str  # the architecture in one line

    def line(self) -> str:
        tags = [
            t
            for t, on in (("loads by name", self.loadable), ("not a challenge model", not self.challenge))
            if on
        ]
        return (
            f"{self.name:14s} {self.params / 1e9:6.2f}B  {self.family:6s} {self.hub_id:38s} {self.local:14s} "
            f"[{self.licence}]" + (f"  ({', '.join(tags)})" if tags else "")
        )


def list_models() -> list[ModelRow]:
    """Every registered model, with what this machine already has of it (file checks only, nothing fetched)."""
    return [
        ModelRow(
            name=m.name,
            hub_id=m.hub_id,
            params=m.arch.total_params(),
            family=m.arch.family,
            licence=m.licence,
            loadable=m.loadable,
            challenge=m.arch.challenge,
            local=_local_state(m),
            summary=m.arch.summary(),
        )
        for m in MODELS.values()
    ]


def _local_state(m: Model) -> str:
    if m.python_package:
        if importlib.util.find_spec(m.python_package) is None:
            return "not installed"
        stem = Path(m.gguf_file or "").stem
        converted = any((p / "config.json").is_file() for p in (daytune_home() / "models").glob(f"{stem}-*"))
        return "converted" if converted else "embedded"
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(m.hub_id, "config.json")
    if not isinstance(config, str):
        return "-"
    return "cached" if any(Path(config).parent.glob("*.safetensors")) else "config only"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, *, dtype=None, device=None):
    """Load a causal LM from a resolved folder. `trust_remote_code` stays off. On a GPU the weights are read
    straight onto it in `dtype` (never a full-precision copy in host memory first)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else None
    on_gpu = {"device_map": {"": str(device)}} if device is not None and device.type == "cuda" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=False, **on_gpu
        )
    except Exception as e:
        raise ModelError(
            f"cannot load a causal language model from {path}: {type(e).__name__}: {e}"
        ) from None
    if device is not None and not on_gpu:
        model.to(device)
    return model
