"""Checkpoints that survive a crash: written under a temporary name and renamed into place when complete.

A checkpoint folder holds `weights.safetensors` (the parameters that train, by name, unsharded), `optimizer.pt`
(or `optimizer-<rank>.pt` per process when FSDP shards the optimizer; loaded with weights_only=True: tensors and
numbers, never arbitrary pickles; DeepSpeed's engine state instead goes to `deepspeed/`, through accelerate), `rng-<rank>.safetensors` per process, and `state.json` (step,
tokens, elapsed time, schedule, `random`'s state), written last. Beside them, `best.safetensors` keeps the
trainable weights of the best validation loss so far, for early stopping.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from daytune.errors import RunError
from daytune.fileio import replace_dir_atomic, temp_dir_beside, write_json_atomic
from daytune.train.methods import load_trainable_state, trainable_state

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
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return tensors


def write_weights(
    model, folder: Path, name: str = "weights.safetensors", weights: dict | None = None
) -> None:
    save_file(weights if weights is not None else trainable_state(model), str(folder / name))


BEST = "best.safetensors"


def save_best(model, folder: Path, weights: dict | None = None) -> None:
    """Keep the trainable weights (or gathered full `weights`) as the best so far: written under a temporary name,
    then renamed, so a crash never leaves half a best model."""
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(model, folder, f".{BEST}.tmp", weights)
    (folder / f".{BEST}.tmp").replace(folder / BEST)


def load_best(model, folder: Path) -> bool:
    """Put the best weights kept by `save_best` back into the model; False when there are none."""
    if not (folder / BEST).is_file():
        return False
    load_trainable_state(model, load_file(str(folder / BEST)), "best")
    return True


def sharded_optimizer_dir(folder: Path, step: int) -> Path:
    """Where every process of a sharded (FSDP/DeepSpeed) run drops its optimizer shard before the main process
    assembles the checkpoint."""
    return folder / f".{checkpoint_name(step)}.optimizer"


def save_checkpoint(
    model,
    optimizer,
    state: dict[str, Any],
    folder: Path,
    keep: int,
    rng_by_rank: list[dict] | None = None,
    weights: dict | None = None,
) -> tuple[Path, float]:
    """Write checkpoint `step-N` atomically; keep the newest `keep`. Returns (path, seconds taken).
    `weights` are gathered full weights (sharded runs); their optimizer shards are already on disk."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(state["step"])
    tmp = temp_dir_beside(final)
    try:
        write_weights(model, tmp, weights=weights)
        shards = sharded_optimizer_dir(folder, state["step"])
        if shards.is_dir():
            for f in shards.iterdir():
                f.replace(tmp / f.name)
            shards.rmdir()
        else:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for rank, tensors in enumerate(rng_by_rank or [rng_tensors()]):
            save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
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


def load_checkpoint(path: Path, model, optimizer, rank: int = 0, engine_state=None) -> dict[str, Any]:
    """Restore trainable weights, optimizer state and RNG states; return the saved training state.
    `engine_state(folder)`: loads a DeepSpeed run's `deepspeed/` folder (accelerate's load_state), whose
    optimizer partitions are not plain tensors."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        load_trainable_state(model, load_file(str(path / "weights.safetensors")), str(path))
        if (path / "deepspeed").is_dir():
            if engine_state is None:
                raise RunError(f"{path}: a DeepSpeed checkpoint; resume it under the same DeepSpeed launch")
            engine_state(str(path / "deepspeed"))
        else:
            optim_file = (
                path / f"optimizer-{rank}.pt"
                if (path / f"optimizer-{rank}.pt").is_file()
                else path / "optimizer.pt"
            )
            optimizer.load_state_dict(torch.load(optim_file, map_location="cpu", weights_only=True))
        rng_file = path / f"rng-{rank}.safetensors"
        if not rng_file.is_file():
            raise RunError(
                f"{path}: no RNG state for process {rank} (was the run started with another world size?)"
            )
        rng = load_file(str(rng_file))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RunError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
