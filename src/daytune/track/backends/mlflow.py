"""MLflow: by default a SQLite database beside the runs (`sqlite:///<out_dir>/mlflow.db`, artifacts in
`<out_dir>/mlartifacts/`; MLflow's plain file store is deprecated), or any tracking URI by config
(`track.mlflow.tracking_uri`, e.g. http://host:5000). Browse with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
Evaluations are logged into the training run (MLflow runs can be reopened by id)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from daytune.track.backends import StartInfo, flatten


def default_uri(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


class MlflowBackend:
    name = "mlflow"

    def __init__(self, cfg):
        self.cfg = cfg
        self.client = None
        self.run_id = None
        self.last_step = 0
        self.queued = []  # pending asynchronous writes

    def start(self, info: StartInfo) -> dict[str, Any]:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # schema migrations and store notices are not the user's business
            logging.getLogger(name).setLevel(logging.WARNING)

        previous = info.previous or {}
        self.last_step = info.step
        uri = previous.get("tracking_uri") or self.cfg.tracking_uri or default_uri(info.out_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if previous.get("run_id"):
            self.run_id = previous["run_id"]
            if info.job == "train":
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                location = None
                # artifacts beside the database, not in the current directory
                if uri.startswith("sqlite:///"):
                    folder = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                    location = folder.resolve().as_uri()
                experiment_id = self.client.create_experiment(self.cfg.experiment, artifact_location=location)
            else:
                experiment_id = experiment.experiment_id
            tags = {"mlflow.runName": info.run_id, "daytune.run_path": str(info.run_path), **info.tags}
            run = self.client.create_run(experiment_id, run_name=info.run_id, tags=tags)
            self.run_id = run.info.run_id
            self._log_params(info.config)
        run = self.client.get_run(self.run_id)
        return {
            "run_id": self.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": uri,
            "artifact_uri": run.info.artifact_uri,
        }

    def _log_params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log(self, metrics: dict[str, float], step: int, timestamp: float) -> None:
        from mlflow.entities import Metric

        ms = int(timestamp * 1000)
        batch = [Metric(k, float(v), ms, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        # queued: MLflow writes them on its own thread, off the training path (finish waits for them)
        for i in range(0, len(batch), 1000):
            self.queued.append(
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000], synchronous=False)
            )
        if len(self.queued) > 500:
            self._wait()

    def _wait(self) -> None:
        """Block until every queued write is done; a failed write raises here."""
        while self.queued:
            op = self.queued.pop(0)
            if op is not None:
                op.wait()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.last_step = max(self.last_step, step)
        self._log(metrics, step, time.time())

    def log_system(self, samples: list[dict[str, Any]], step: int) -> None:
        for s in samples:  # every sample, each at its own time
            self._log({k: v for k, v in s.items() if k != "time"}, step, s.get("time", time.time()))

    def log_artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> str | None:
        artifact_path = f"checkpoints/step-{metadata.get('step')}" if kind == "checkpoint" else name
        self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def log_summary(self, values: dict[str, Any]) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:  # MLflow has no summary: final values are metrics at the run's last step
            self._log(numbers, self.last_step, time.time())
        for k, v in values.items():
            if isinstance(v, str):
                self.client.set_tag(self.run_id, k, v[:5000])

    def finish(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self._wait()  # every queued metric is written (or its error raised) before the run ends
            self.client.set_terminated(self.run_id, status={"finished": "FINISHED"}.get(status, "FAILED"))
            self.client = None
