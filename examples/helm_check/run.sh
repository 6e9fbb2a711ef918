#!/usr/bin/env bash
# HELM's own code against `daytune serve`, then daytune's neurips-open scenario on the same server, compared
# request by request: helm-run (the neurips/local deployment) on one MMLU subject with HELM's robustness
# perturbation, 10 instances; then `daytune eval --http`; then examples/helm_check/compare.py.
#   bash examples/helm_check/run.sh [WORK_DIR] [DATA_ROOT]
# crfm-helm lives in its own venv (never the project's): `make helm-venv` builds .venv-helm beside the CPU torch.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/daytune-helm-check}
DATA=${2:-$(cd "$REPO/.." && pwd)/shared/data}
PORT=${PORT:-18080}
HELM_VENV=${DAYTUNE_HELM_VENV:-$REPO/.venv-helm}
SUBJECT=${SUBJECT:-abstract_algebra}
[ -x "$HELM_VENV/bin/helm-run" ] || { echo "no helm-run in $HELM_VENV: run 'make helm-venv' first" >&2; exit 2; }
mkdir -p "$WORK" && cd "$WORK"
# HELM would download MMLU; give it the datasets folder's copy in the layout it downloads (no header, letters)
"$REPO/.venv/bin/python" -c "import sys; from daytune.eval.helm.compare import seed_helm_data; \
seed_helm_data(sys.argv[1], 'benchmark_output', mmlu=[sys.argv[2]])" "$DATA" "$SUBJECT"
# one request at a time, no prefix cache: both clients then get bit-identical logprobs (the ECE uses them)
"$REPO/.venv/bin/daytune" --quiet serve --model smollm2-135m --port "$PORT" --max-batch 1 --prefix-cache-mb 0 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done
HELM_HTTP_MODEL_BASE_URL="http://127.0.0.1:$PORT" "$HELM_VENV/bin/helm-run" \
  --run-entries "mmlu:subject=$SUBJECT,data_augmentation=robustness,model=neurips/local" --suite daytune \
  --max-eval-instances 10
rm -rf eval
"$REPO/.venv/bin/daytune" --quiet eval --http "http://127.0.0.1:$PORT" --suite neurips-open --scenarios helm_mmlu \
  --subjects "$SUBJECT" --max-instances 10 --data-root "$DATA" --bootstrap 0 --out eval
"$REPO/.venv/bin/python" "$REPO/examples/helm_check/compare.py" \
  "benchmark_output/runs/daytune/mmlu:subject=$SUBJECT,method=multiple_choice_joint,data_augmentation=robustness,model=neurips_local" \
  eval/results.json --scenario helm_mmlu --subject "$SUBJECT"
