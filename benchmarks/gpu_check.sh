#!/usr/bin/env bash
# The first GPU day, checked in one go (benchmarks/gpu_check.py lists the checks): about 8 minutes on one GPU,
# one JSON (benchmarks/results/gpu_check.json).
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--work DIR]          (or: make gpu-check)
#
# It reaches no package index. Python: $GPU_PYTHON, else the first of .venv-gpu/bin/python, .venv/bin/python,
# python3, python whose PyTorch can use CUDA (--dry-run: any with PyTorch); that PyTorch is used as it is. Whatever
# else daytune needs and that Python lacks is installed from .wheels/ (fill it online with `make gpu-wheels`,
# then bring the folder with the tree) into .venv-gpu, a venv that also sees the system's packages. daytune
# itself runs from src/.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=False
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=True; done

usable() {  # a Python whose PyTorch can use CUDA (any PyTorch for --dry-run)
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c "import sys, torch; sys.exit(0 if $dry or torch.cuda.is_available() else 1)" >/dev/null 2>&1
}
python=""
for candidate in ${GPU_PYTHON:-} .venv-gpu/bin/python .venv/bin/python python3 python; do
  if usable "$candidate"; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
  echo "gpu_check: no Python here has a PyTorch that can use CUDA (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1));" \
    "set GPU_PYTHON=/path/to/python" >&2
  exit 2
fi

# What the check imports; a missing module is installed from .wheels/ (module name -> distribution name).
imports="import daytune.cli, daytune.train.loop, daytune.serve.app, daytune.train.export, httpx, bitsandbytes"
[ "$dry" = True ] || imports="$imports, pynvml, liger_kernel"
dist_of() {
  case "$1" in
    yaml) echo pyyaml ;; pynvml) echo nvidia-ml-py ;; huggingface_hub) echo huggingface-hub ;;
    rouge_score) echo rouge-score ;; PIL) echo pillow ;; dateutil) echo python-dateutil ;; *) echo "${1//_/-}" ;;
  esac
}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
for _ in $(seq 1 40); do
  missing=$("$python" -c "$imports" 2>&1 | sed -n "s/^ModuleNotFoundError: No module named '\([^'.]*\).*/\1/p" |
    tail -1) || true
  [ -z "$missing" ] && break
  if [ ! -d .wheels ]; then
    echo "gpu_check: $python lacks '$missing': run 'make gpu-wheels' where an index is reachable and bring .wheels/" >&2
    exit 2
  fi
  if [ "$python" != ".venv-gpu/bin/python" ]; then
    [ -x .venv-gpu/bin/python ] || "$python" -m venv --system-site-packages .venv-gpu
    python=.venv-gpu/bin/python
    continue
  fi
  echo "gpu_check: installing $(dist_of "$missing") from .wheels/"
  "$python" -m pip install --disable-pip-version-check -q --no-index --find-links .wheels "$(dist_of "$missing")"
done
"$python" -c "$imports" || { echo "gpu_check: $python still cannot import what the check needs" >&2; exit 2; }
exec "$python" benchmarks/gpu_check.py "$@"
