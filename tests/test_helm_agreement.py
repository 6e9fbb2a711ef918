"""daytune's `neurips-open` scenarios against HELM itself: `helm-run` (crfm-helm 0.5.16, its own venv) on local
copies of the data, against `daytune serve`, then `daytune eval --http` on the same server; every prompt must be
byte-identical to HELM's, every completion and per-instance score equal, every aggregate within 1e-6.

The server decodes one request at a time with the prefix cache off, so that both clients get bit-identical
logprobs (the calibration metrics use them). Two models:
- the tiny random model (a 512-token vocabulary makes prompts long): HELM's window fitting drops GSM8K's and a
  long MMLU subject's in-context examples; its completions are degenerate, so it checks prompts, not scores;
- SmolLM2-135M (slow): real answers, so the scores, the robustness and gender perturbations and BBQ's bias
  metric are compared on instances the model gets right and wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SHARED_DATA, build_tiny_model
from serve_helpers import HELM_VENV, require_helm_venv, serve_process

from daytune.cli import main
from daytune.eval.helm.compare import compare_run, seed_helm_data


def helm_run(url: str, work: Path, entries: list[str], max_eval: int) -> Path:
    """helm-run on `entries` with the neurips/local deployment at `url`; returns the suite's runs folder."""
    cmd = [str(HELM_VENV / "bin" / "helm-run"), "--run-entries", *entries, "--suite", "t"]
    cmd += ["--max-eval-instances", str(max_eval), "-n", "1"]
    env = {**os.environ, "HELM_HTTP_MODEL_BASE_URL": url, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return work / "benchmark_output" / "runs" / "t"


def daytune_eval(url: str, out: Path, scenarios: str, max_eval: int, subjects: str | None = None) -> dict:
    args = ["--quiet", "eval", "--http", url, "--suite", "neurips-open", "--scenarios", scenarios]
    args += ["--max-instances", str(max_eval), "--bootstrap", "0", "--data-root", str(SHARED_DATA)]
    args += ["--out", str(out)] + (["--subjects", subjects] if subjects else [])
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())["scenarios"]


def check(runs: Path, entry_prefix: str, name: str, results: dict, group: str | None = None) -> list[dict]:
    """compare_run on every HELM run whose name starts with `entry_prefix`; all must agree."""
    dirs = sorted(d for d in runs.iterdir() if d.name.startswith(entry_prefix))
    assert dirs, f"helm-run wrote no {entry_prefix}* run in {runs}"
    out = []
    for d in dirs:
        c = compare_run(d, name, results[name], group)
        assert not c["differences"], (d.name, c["differences"][:10])
        assert c["prompts_equal"] == c["completions_equal"] == c["scores_equal"] == c["requests"] > 0
        assert c["aggregates"] and all(a["equal"] for a in c["aggregates"])
        out.append(c)
    return out


@pytest.fixture(scope="module")
def data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"datasets folder not found at {SHARED_DATA}")
    return SHARED_DATA


def test_helm_agreement_tiny_model_window_fitting(tmp_path, data):
    """Long prompts: HELM's tokenizer count (through /tokenize) decides how many examples stay."""
    require_helm_venv()
    model = build_tiny_model(tmp_path / "tiny", max_position_embeddings=2048)
    seed_helm_data(data, tmp_path / "benchmark_output", mmlu=["high_school_european_history"])
    with serve_process(str(model), "--max-batch", "1", "--prefix-cache-mb", "0") as (url, _):
        runs = helm_run(
            url,
            tmp_path,
            ["gsm:model=neurips/local", "mmlu:subject=high_school_european_history,model=neurips/local"],
            3,
        )
        gsm = daytune_eval(url, tmp_path / "gsm", "helm_gsm8k", 3)
        mmlu = daytune_eval(url, tmp_path / "mmlu", "helm_mmlu", 3, "high_school_european_history")
    check(runs, "gsm", "helm_gsm8k", gsm)
    check(runs, "mmlu", "helm_mmlu", mmlu, "high_school_european_history")
    fitted = [r["num_train_instances"] for r in gsm["helm_gsm8k"]["records"] + mmlu["helm_mmlu"]["records"]]
    assert min(fitted) < 5, fitted  # the window dropped examples somewhere: the fitting was exercised


@pytest.mark.slow
def test_helm_agreement_smollm2_scores_perturbations_bias(tmp_path, data):
    require_helm_venv()
    seed_helm_data(data, tmp_path / "benchmark_output", mmlu=["human_sexuality"], bbq=["Age"])
    entries = [
        "mmlu:subject=human_sexuality,data_augmentation=robustness,model=neurips/local",
        "mmlu:subject=human_sexuality,data_augmentation=gender_pronouns_deterministic,model=neurips/local",
        "truthful_qa:task=mc_single,data_augmentation=robustness,model=neurips/local",
        "bbq:subject=Age,model=neurips/local",
    ]
    with serve_process("smollm2-135m", "--max-batch", "1", "--prefix-cache-mb", "0") as (url, _):
        runs = helm_run(url, tmp_path, entries, 6)  # 6 questions: 2 of them with pronouns to perturb
        mc = daytune_eval(url, tmp_path / "mc", "helm_mmlu,helm_truthfulqa", 6, "human_sexuality")
        bbq = daytune_eval(url, tmp_path / "bbq", "helm_bbq", 6, "Age")
    mmlu = check(runs, "mmlu", "helm_mmlu", mc, "human_sexuality")
    check(runs, "truthful_qa", "helm_truthfulqa", mc)
    check(runs, "bbq", "helm_bbq", bbq, "Age")
    # both perturbation groups were compared on perturbed requests, and the scores are not all zero
    records = mc["helm_mmlu"]["records"]
    assert any("gender" in r["perturbed"] for r in records) and any(
        "mild_mix" in r["perturbed"] for r in records
    )
    names = {a["metric"] for c in mmlu for a in c["aggregates"]}
    assert {"exact_match_robustness", "exact_match_fairness", "ece_10_bin"} <= names
    assert 0 < sum(r["exact_match"] for r in records) < len(records)
