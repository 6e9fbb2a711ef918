"""The local run store. `runs/<run-id>/` is created fresh for every run and never reused by another run.

Layout: config.yaml, command.txt, git.txt (commit and dirty state of the repository the command ran in and of
daytune's own), git.diff (their uncommitted changes), env.json, code/ (daytune's source as it ran), metrics.jsonl
(one line per optimizer step), system.jsonl (CPU, memory, GPU samples), lineage.json (dataset fingerprint -> run
-> checkpoints -> evaluations), tracking.json (the run's ids in W&B/MLflow), doctor.json, summary.json,
checkpoints/step-NNNNNNN/ (resumable state), adapter/ or model/ (the final result). See daytune/track/.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daytune.errors import RunError
from daytune.fileio import append_jsonl, write_json_atomic, write_text_atomic
from daytune.track.env import git_diff, git_repos


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def git_state(cwd: Path | None = None) -> str:
    """Commit and dirty state of the git repository the command runs in (or a note that there is none)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip())
        return out.stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return f"directory: {cwd or Path.cwd()}\nnot a git repository\n"
    try:
        commit = git("rev-parse", "HEAD")
    except RuntimeError:
        commit = "(no commits yet)"
    status = git("status", "--porcelain")
    changed = [line for line in status.splitlines() if line.strip()]
    lines = [f"repository: {top}", f"commit: {commit}", f"dirty: {'yes' if changed else 'no'}"]
    if changed:
        lines.append(f"changed files ({len(changed)}):")
        lines += [f"  {line}" for line in changed[:200]]
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- creation -----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> RunDir:
        """A brand-new folder `<out_dir>/<YYYYmmdd-HHMMSS>-<name>`; mkdir is atomic, so no two runs share one."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(name)}"
        for i in range(1, 1000):
            path = out_dir / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise RunError(f"cannot create a new run folder under {out_dir}")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise RunError(f"{path} is not a daytune run folder (no config.yaml)")
        return cls(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def trained(self) -> Path:
        """The run's final model: adapter/ (PEFT methods) or model/ (full fine-tuning, freeze)."""
        return self.path / "model" if (self.path / "model" / "config.json").is_file() else self.adapter

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def system_file(self) -> Path:
        return self.path / "system.jsonl"

    def read_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except json.JSONDecodeError as e:
            raise RunError(f"{path}: not valid JSON ({e})") from None

    def read_system(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.system_file)

    # -- records ------------------------------------------------------------------------------------------
    def write_start(self, config_yaml: str, argv: list[str]) -> None:
        write_text_atomic(self.path / "config.yaml", config_yaml)
        write_text_atomic(self.path / "command.txt", shlex.join(argv) + "\n" + f"cwd: {os.getcwd()}\n")
        repos = git_repos()
        write_text_atomic(self.path / "git.txt", "\n".join(git_state(r) for r in repos) or git_state())
        diffs = [(r, git_diff(r)) for r in repos]
        write_text_atomic(
            self.path / "git.diff",
            "".join(f"# repository: {r}\n{d}\n" for r, d in diffs if d.strip())
            or "# no uncommitted changes\n",
        )

    def note_resume(self, argv: list[str]) -> None:
        """Each resume appends its own command line: the record shows every command that shaped the run."""
        with open(self.path / "command.txt", "a", encoding="utf-8") as f:
            f.write(f"resumed {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n")

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_file, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_file)

    def truncate_metrics(self, last_step: int) -> None:
        """On resume, drop steps after the checkpoint: they will be trained again."""
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= last_step]
        write_text_atomic(self.metrics_file, "".join(json.dumps(m) + "\n" for m in kept))

    def read_summary(self) -> dict[str, Any]:
        path = self.path / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        summary = self.read_summary()
        summary.update(fields)
        write_json_atomic(self.path / "summary.json", summary)
        return summary


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return out
