"""Weights & Biases: online when an API key is configured, offline otherwise (files under the run folder's
wandb/, uploaded later with `wandb sync runs/<id>/wandb/offline-run-*`). The final model (and with
`log_model: all` every checkpoint) is logged as an artifact that `daytune eval --model wandb:ENTITY/PROJECT/NAME:V`
pulls back. Training and evaluation are two W&B runs of one group (job types train and eval)."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from daytune.track.backends import StartInfo


def has_api_key() -> bool:
    """WANDB_API_KEY, or a key that `wandb login` stored in ~/.netrc (or $NETRC) for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    """auto: $WANDB_MODE when set, else online with an API key and offline without one."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_api_key() else "offline"


def artifact_name(run_id: str, kind: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_id)
    return f"{safe}-{kind}"


class WandbBackend:
    name = "wandb"

    def __init__(self, cfg):
        self.cfg = cfg
        self.run = None
        self.mode = None

    def start(self, info: StartInfo) -> dict[str, Any]:
        # daytune prints its own lines; wandb's go to its debug logs
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.mode = resolve_mode(self.cfg.mode)
        previous = info.previous or {}
        # One W&B run per stage: the training run keeps its id across resumes; each evaluation is its own run.
        if info.job == "train":
            run_id = previous.get("id") or f"{info.run_id[-40:]}-{secrets.token_hex(3)}"
            name = info.run_id
        else:
            run_id = f"{info.run_id[-40:]}-{info.job}-{secrets.token_hex(3)}"
            name = f"{info.run_id}-{info.job}"
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=name,
            id=run_id,
            group=info.run_id,
            job_type=info.job,
            dir=str(info.run_path),
            config=info.config,
            tags=[v for v in info.tags.values() if v][:20],
            mode=self.mode,
            resume="allow" if info.job == "train" else None,
            settings=wandb.Settings(console="off", silent=True),
        )
        return {
            "id": self.run.id,
            "mode": self.mode,
            "project": self.cfg.project,
            "entity": self.run.entity or self.cfg.entity,
            "dir": str(Path(self.run.settings.sync_dir).resolve()),
            "url": None if self.mode == "offline" else self.run.url,
        }

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_system(self, samples: list[dict[str, Any]], step: int) -> None:
        # W&B keeps one row per step: the latest sample joins the step's row (system.jsonl keeps every sample).
        if samples:
            self.run.log({k: v for k, v in samples[-1].items() if k != "time"}, step=step)

    def log_artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> str | None:
        import wandb

        art_name = artifact_name(metadata.get("run_id", "run"), name)
        art = wandb.Artifact(art_name, type=kind, metadata=metadata)
        art.add_dir(str(path))
        aliases = ["latest"] + ([f"step-{metadata['step']}"] if metadata.get("step") is not None else [])
        self.run.log_artifact(art, aliases=aliases)
        entity = self.run.entity or self.cfg.entity or "ENTITY"
        return f"wandb:{entity}/{self.cfg.project}/{art_name}:latest"

    def log_summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None


def download_model(ref: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """`wandb:ENTITY/PROJECT/NAME:VERSION` -> (local folder, the artifact's metadata). Needs the network and a key."""
    import wandb

    name = ref.removeprefix("wandb:")
    artifact = wandb.Api().artifact(name)
    folder = Path(artifact.download(root=str(root / name.replace("/", "_").replace(":", "_"))))
    return folder, dict(artifact.metadata or {})
