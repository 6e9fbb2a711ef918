"""What a run needs to be reproduced: the environment (packages, torch/CUDA, devices), the git state and diff of
the code, and a copy of daytune's own source as it ran."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import daytune

# Packages whose versions change training results; listed first in env.json (all installed ones follow).
KEY_PACKAGES = (
    "daytune",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "numpy",
    "wandb",
    "mlflow-skinny",
    "mlflow",
)
MAX_DIFF_BYTES = 5 * 2**20  # a diff larger than this is cut (and says so): the run folder is not a git mirror


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Python, OS, CPU, memory, torch/CUDA/cuDNN, the devices by name, and every installed package's version."""
    import psutil
    import torch

    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name.lower()] = dist.version
    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "memory_mb": round(props.total_memory / 2**20),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "mps_available": mps,
        "device_name": gpus[0]["name"] if gpus else ("Apple MPS" if mps else _cpu_model()),
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "key_packages": {name: _version(name) for name in KEY_PACKAGES if _version(name)},
        "packages": dict(sorted(packages.items())),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return out.stdout


def git_repos() -> list[Path]:
    """The git repositories that shaped the run: where the command ran, and where daytune's source lives."""
    found: list[Path] = []
    for start in (Path.cwd(), Path(daytune.__file__).resolve().parent):
        try:
            top = Path(_git(start, "rev-parse", "--show-toplevel").strip())
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            continue
        if top not in found:
            found.append(top)
    return found


def git_diff(repo: Path) -> str:
    """Uncommitted changes against HEAD (staged and unstaged), plus the untracked files by name."""
    try:
        diff = _git(repo, "diff", "HEAD", "--no-color", "--no-ext-diff")
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        try:  # no commit yet: everything staged is the diff
            diff = _git(repo, "diff", "--cached", "--no-color")
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return ""
    try:
        untracked = _git(repo, "ls-files", "--others", "--exclude-standard").splitlines()
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        untracked = []
    if len(diff.encode()) > MAX_DIFF_BYTES:
        diff = diff.encode()[:MAX_DIFF_BYTES].decode(errors="ignore") + "\n[diff cut at 5 MiB]\n"
    if untracked:
        diff += "\n# untracked files (not in the diff):\n" + "".join(f"#   {u}\n" for u in untracked[:500])
    return diff


def snapshot_code(dest: Path) -> int:
    """Copy daytune's own Python source (the code that runs) to `dest`; returns the number of files copied."""
    src = Path(daytune.__file__).resolve().parent
    count = 0
    for path in sorted(src.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        target = dest / "daytune" / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        count += 1
    return count
