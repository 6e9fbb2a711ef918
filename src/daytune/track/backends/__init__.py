"""Experiment-tracking backends beside the run folder (which is always written): Weights & Biases and MLflow.

A backend receives what the run store records, under metric names compatible with the lit-gpt logger of the W&B
starter kit where they overlap (see `daytune.track.tracker.BACKEND_NAMES`). The tracker wraps every backend so
that one that raises warns once and is switched off: a tracking service never stops a training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class StartInfo:
    run_id: str  # the run folder's name
    run_path: Path
    out_dir: Path  # the runs root (default home of the MLflow database)
    config: dict[str, Any]  # the resolved recipe
    job: str = "train"  # train | eval
    step: int = 0  # the run's last optimizer step (evaluations are logged there)
    previous: dict[str, Any] = field(default_factory=dict)  # this backend's reference from an earlier start
    tags: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def start(self, info: StartInfo) -> dict[str, Any]:
        """Open (or reopen) the run; returns the reference to keep in tracking.json (ids, URLs, folders)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_system(self, samples: list[dict[str, Any]], step: int) -> None:
        """System samples (flattened: system/cpu_percent, ...) taken since the previous step, each with `time`."""

    def log_artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> str | None:
        """Log a folder (checkpoint or final model); returns a reference to it."""

    def log_summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, status: str) -> None:
        """status: finished | failed | killed."""


def make_backend(name: str, track_cfg) -> Backend:
    if name == "wandb":
        from daytune.track.backends.wandb import WandbBackend

        return WandbBackend(track_cfg.wandb)
    if name == "mlflow":
        from daytune.track.backends.mlflow import MlflowBackend

        return MlflowBackend(track_cfg.mlflow)
    raise ValueError(f"unknown tracking backend {name!r}")


def flatten(obj: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}; lists become strings."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    else:
        out[prefix] = obj if isinstance(obj, (int, float, str, bool)) or obj is None else str(obj)
    return out
