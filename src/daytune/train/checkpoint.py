"""Checkpoints that survive a crash: written under a temporary name and renamed into place when complete.

A checkpoint folder holds `adapter/` (PEFT format), `optimizer.pt` (loaded with weights_only=True: plain tensors
and numbers, never arbitrary pickles), `rng.safetensors` and `state.json` (step, elapsed time, RNG of `random`).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daytune.errors import RunError
from daytune.fileio import replace_dir_atomic, write_json_atomic

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (state.json present), oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return tensors


def save_adapter(model, folder: Path) -> None:
    """PEFT format: adapter_config.json + adapter_model.safetensors, loadable by plain PEFT."""
    model.save_pretrained(folder, safe_serialization=True)


def save_checkpoint(model, optimizer, state: dict[str, Any], folder: Path, keep: int) -> tuple[Path, float]:
    """Write checkpoint `step-N` atomically; keep the newest `keep`. Returns (path, seconds taken)."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(state["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_adapter(model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        full_state = dict(state, python_rng=[py_state[0], list(py_state[1]), py_state[2]])
        write_json_atomic(tmp / "state.json", full_state)  # written last: its presence marks completeness
        replace_dir_atomic(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final, time.perf_counter() - t0


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore adapter weights, optimizer state and RNG states; return the saved training state."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_peft_weights(str(path / "adapter"), device="cpu")
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise RunError(
                f"{path}: adapter does not match this model ({len(result.unexpected_keys)} unexpected keys)"
            )
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RunError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
