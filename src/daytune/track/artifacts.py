"""Pulling a model by reference: `wandb:ENTITY/PROJECT/NAME:VERSION` -> (base model reference, trained folder).

A daytune training run logs its final adapter (or full model) as a W&B artifact whose metadata names the base model
(`base_model`) and the content (`adapter` or `model`); this turns such a reference back into what `eval` loads.
Downloads go to $DAYTUNE_HOME/artifacts/ (default ~/.cache/daytune)."""

from __future__ import annotations

import re
from pathlib import Path

from daytune.errors import ModelError

WANDB_REF = re.compile(r"^wandb:([^/\s:]+)/([^/\s:]+)/([^/\s:]+):([^/\s:]+)$")


def parse_wandb_ref(ref: str) -> tuple[str, str, str, str]:
    m = WANDB_REF.match(ref)
    if not m:
        raise ModelError(
            f"--model {ref}: a W&B model reference is wandb:ENTITY/PROJECT/NAME:VERSION "
            "(e.g. wandb:my-team/daytune/20240101-120000-quickstart-adapter:latest)"
        )
    return m.groups()


def pull_wandb_model(ref: str, log=print, root: Path | None = None) -> tuple[str, Path | None]:
    """Download the artifact; returns (base model reference, adapter folder) or (model folder, None)."""
    parse_wandb_ref(ref)
    from daytune.models.load import daytune_home

    try:
        from daytune.track.backends.wandb import download_model
    except ImportError:
        raise ModelError(f"--model {ref}: needs the wandb package (pip install 'daytune[track]')") from None
    root = root or daytune_home() / "artifacts"
    log(f"Downloading {ref} from W&B...")
    try:
        folder, metadata = download_model(ref, root)
    except ModelError:
        raise
    except Exception as e:  # network, key, missing artifact: say which
        raise ModelError(
            f"--model {ref}: W&B could not provide the artifact ({type(e).__name__}: {e})"
        ) from None
    if (folder / "config.json").is_file() and metadata.get("content") != "adapter":
        return str(folder), None
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"--model {ref}: the artifact holds neither a model (config.json) nor an adapter")
    base = metadata.get("base_model")
    if not base:
        raise ModelError(
            f"--model {ref}: the adapter artifact does not name its base model (metadata base_model)"
        )
    return str(base), folder
