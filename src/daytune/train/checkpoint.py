"""Checkpoints that survive a crash: written under a temporary name and renamed into place when complete.

A checkpoint folder holds `weights.safetensors` (the parameters that train, by name, unsharded), `optimizer.pt`
(or `optimizer-<rank>.pt` per process when FSDP shards the optimizer; loaded with weights_only=True: tensors and
numbers, never arbitrary pickles; DeepSpeed's engine state instead goes to `deepspeed/`, through accelerate), `rng-<rank>.safetensors` per process, and `state.json` (step,
tokens, elapsed time, schedule, `random`'s state), written last. Beside them, `best.safetensors` keeps the
trainable weights of the best validation loss so far, for early stopping.
"""

from __future__ import annotations

import json
import pickle
import random
import re
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


# What a save killed midway leaves in a run folder or its checkpoints/ (see fileio.temp_dir_beside and
# replace_dir_atomic, write_text_atomic, save_best, sharded_optimizer_dir, the save probe of the loop's start).
_KILLED_SAVES = [
    re.compile(r"\.(step-\d{7}|adapter|model|data)\.[a-z0-9_]{8}"),  # a folder being filled
    re.compile(r"\.step-\d{7}\.optimizer"),  # optimizer shards not yet assembled
    re.compile(
        r"\.save-probe(\..+)?|tmp[a-z0-9_]{8}"
    ),  # the timed save at the start of training (old name too)
    re.compile(r"\..+\.tmp"),  # a file being written (summary.json, lineage.json, best.safetensors, ...)
]
_SWAPPED_OUT = re.compile(r"\.(?P<name>step-\d{7}|adapter|model|data)\.old-\d+")  # the copy being replaced


def remove_killed_saves(run_dir: Path) -> list[str]:
    """Delete what saves killed midway left in `run_dir` and its checkpoints/ (on the next start of the run, so
    they never pile up). A swapped-out copy whose replacement never arrived is put back instead: it is complete.
    Returns the names removed or restored."""
    done = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            swapped = _SWAPPED_OUT.fullmatch(p.name)
            if swapped and not (folder / swapped["name"]).exists():
                p.replace(folder / swapped["name"])
            elif swapped or any(pattern.fullmatch(p.name) for pattern in _KILLED_SAVES):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            else:
                continue
            done.append(str(p.relative_to(run_dir)))
    return done


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
    """Restore trainable weights, optimizer state and RNG states; return the saved training state. A damaged or
    foreign file is a RunError naming it and what is wrong with it (and an older checkpoint to fall back on).
    `engine_state(folder)`: loads a DeepSpeed run's `deepspeed/` folder (accelerate's load_state), whose
    optimizer partitions are not plain tensors."""
    try:
        return _load_checkpoint(path, model, optimizer, rank, engine_state)
    except RunError as e:
        older = [p.name for p in list_checkpoints(path.parent) if p.name < path.name]
        hint = (
            f"; the older {older[-1]} is beside it: move {path.name} aside to resume from that"
            if older
            else ""
        )
        raise RunError(f"cannot resume: {e}{hint}") from None


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked (RunError naming the file when it is damaged)."""
    return _read(path / "state.json", "the training state", _read_state)


def _load_checkpoint(path: Path, model, optimizer, rank: int, engine_state) -> dict[str, Any]:
    state = read_state(path)
    weights = _read(path / "weights.safetensors", "the trained weights", lambda f: load_file(str(f)))
    deepspeed = (path / "deepspeed").is_dir()
    if deepspeed and engine_state is None:
        raise RunError(f"{path}: a DeepSpeed checkpoint; resume it under the same DeepSpeed launch")
    optim_file = path / f"optimizer-{rank}.pt"
    optim_file = optim_file if optim_file.is_file() else path / "optimizer.pt"
    optim = None if deepspeed else _read(optim_file, "the optimizer state", _read_tensors_only)
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file() and rank > 0:
        raise RunError(
            f"{path}: no RNG state for process {rank} (was the run started with another world size?)"
        )
    rng = _read(rng_file, "the random-number states", lambda f: load_file(str(f)))
    cpu_rng = rng.get("torch_cpu")
    if cpu_rng is None or cpu_rng.dtype != torch.uint8 or cpu_rng.shape != torch.get_rng_state().shape:
        raise RunError(
            f"{rng_file}: no valid CPU random-number state ('torch_cpu'); the checkpoint is damaged"
        )
    try:
        load_trainable_state(model, weights, str(path / "weights.safetensors"))
    except RuntimeError as e:  # a tensor of another shape
        raise RunError(f"{path / 'weights.safetensors'}: the weights do not fit this model ({e})") from None
    if deepspeed:
        engine_state(str(path / "deepspeed"))
    else:
        try:
            optimizer.load_state_dict(optim)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise RunError(
                f"{optim_file}: the optimizer state does not fit this model and method ({e})"
            ) from None
    torch.set_rng_state(cpu_rng)
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


REQUIRED_STATE = {"step": int, "tokens": int, "trained_tokens": int, "train_seconds": float, "elapsed": float}


def _read(file: Path, what: str, read):
    """One checkpoint file through `read`; whatever is wrong with it (missing, truncated, foreign) is a RunError
    that names it. Never passes on a library's advice to load it less safely."""
    if not file.is_file():
        raise RunError(f"{file}: missing ({what}); the checkpoint is incomplete")
    try:
        return read(file)
    except RunError:
        raise
    except (
        pickle.UnpicklingError
    ):  # torch.load(weights_only=True) met something other than tensors and numbers
        raise RunError(
            f"{file}: {what} holds objects other than tensors and numbers, which daytune never loads: the file "
            "is damaged or was not written by daytune"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many library-specific ways
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{file}: cannot read {what}: damaged or truncated ({reason})") from None


def _read_tensors_only(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_state(file: Path) -> dict[str, Any]:
    """state.json: the counters (see TrainState) and `random`'s state, checked before the run trusts them."""
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{file}: not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise RunError(f"{file}: expected a JSON object of training counters")
    for key, kind in REQUIRED_STATE.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise RunError(f"{file}: '{key}' is missing or not a number; the checkpoint is damaged")
    rng = state.get("python_rng")
    internal = rng[1] if isinstance(rng, list) and len(rng) == 3 else None
    if not (isinstance(internal, list) and len(internal) == 625 and all(type(x) is int for x in internal)):
        raise RunError(f"{file}: no valid Python random state ('python_rng'); the checkpoint is damaged")
    return state
