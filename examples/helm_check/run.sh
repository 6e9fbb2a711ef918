#!/usr/bin/env bash
# HELM's own code against `daytune serve`: helm-run with the neurips/local deployment on one MMLU subject, 10 instances,
# then examples/helm_check/compare.py. crfm-helm goes in its own venv (never the project's), beside the installed torch.
#   bash examples/helm_check/run.sh [WORK_DIR] [DATA_ROOT]
set -euo pipefail
WORK=${1:-/tmp/daytune-helm-check}
DATA=${2:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PORT=${PORT:-18080}
mkdir -p "$WORK" && cd "$WORK"
if [ ! -x helm-venv/bin/helm-run ]; then
  python3 -m venv helm-venv
  echo "torch==2.13.0" > constraints.txt
  helm-venv/bin/pip install -q -c constraints.txt crfm-helm
fi
# HELM would download MMLU; give it the local copy in the original format (no header, answer letters)
"$REPO/.venv/bin/python" - "$DATA" <<'PY'
import csv, os, sys
for split in ("dev", "test"):
    os.makedirs(f"benchmark_output/scenarios/mmlu/data/{split}", exist_ok=True)
    with open(f"{sys.argv[1]}/mmlu/{split}/abstract_algebra_{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(f"benchmark_output/scenarios/mmlu/data/{split}/abstract_algebra_{split}.csv", "w", newline="") as f:
        csv.writer(f).writerows([[r["question"], *(r[f"choice{i}"] for i in range(4)), "ABCD"[int(r["answer"])]] for r in rows])
PY
"$REPO/.venv/bin/daytune" --quiet serve --model smollm2-135m --port "$PORT" & SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done
HELM_HTTP_MODEL_BASE_URL="http://127.0.0.1:$PORT" helm-venv/bin/helm-run \
  --run-entries "mmlu:subject=abstract_algebra,model=neurips/local" --suite daytune --max-eval-instances 10
"$REPO/.venv/bin/python" "$REPO/examples/helm_check/compare.py" \
  "benchmark_output/runs/daytune/mmlu:subject=abstract_algebra,method=multiple_choice_joint,model=neurips_local" --data-root "$DATA"
