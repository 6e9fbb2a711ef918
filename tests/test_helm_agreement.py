"""daytune's `neurips-open` scenarios against HELM itself: `helm-run` (crfm-helm 0.5.16, its own venv) on local
copies of the data, against `daytune serve`, then `daytune eval --http` on the same server; every prompt must be
byte-identical to HELM's, every completion and per-instance score equal, every aggregate within 1e-6.

The server decodes one request at a time with the prefix cache off, so that both clients get bit-identical
logprobs (the calibration metrics use them). The model is the tiny random one (its 512-token vocabulary makes
prompts long, so HELM's window fitting drops examples), made to answer with letters so that scores vary.
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


def letter_model(folder: Path) -> Path:
    """The tiny random model with its " A" and " B" embeddings (tied to the output layer) scaled up: its one-token
    answers are then mostly one of those letters, which one depending on the prompt, so that the scores, their
    perturbed copies and BBQ's bias differ between instances instead of being all 0."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    build_tiny_model(folder, max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for letter in (" A", " B"):
            (tid,) = tok(letter, add_special_tokens=False)["input_ids"]
            model.get_input_embeddings().weight[tid] *= 20
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_helm_agreement(tmp_path, data):
    require_helm_venv()
    model = letter_model(tmp_path / "tiny")
    subjects = ["high_school_european_history", "human_sexuality"]
    seed_helm_data(data, tmp_path / "benchmark_output", mmlu=subjects, bbq=["Age"])
    entries = [
        "gsm:model=neurips/local",
        # long questions: the window (HELM's count through /tokenize) drops in-context examples
        "mmlu:subject=high_school_european_history,model=neurips/local",
        # 6 questions, 2 of them with pronouns: both perturbation groups on perturbed requests
        "mmlu:subject=human_sexuality,data_augmentation=robustness,model=neurips/local",
        "mmlu:subject=human_sexuality,data_augmentation=gender_pronouns_deterministic,model=neurips/local",
        "truthful_qa:task=mc_single,data_augmentation=robustness,model=neurips/local",
        "bbq:subject=Age,model=neurips/local",
    ]
    with serve_process(str(model), "--max-batch", "1", "--prefix-cache-mb", "0") as (url, _):
        runs = helm_run(url, tmp_path, entries, 6)
        ours = daytune_eval(url, tmp_path / "a", "helm_gsm8k,helm_truthfulqa", 6)
        ours |= daytune_eval(url, tmp_path / "b", "helm_mmlu", 6, ",".join(subjects))
        ours |= daytune_eval(url, tmp_path / "c", "helm_bbq", 6, "Age")
    check(runs, "gsm", "helm_gsm8k", ours)
    check(runs, "truthful_qa", "helm_truthfulqa", ours)
    check(runs, "mmlu:subject=high_school_european_history", "helm_mmlu", ours, subjects[0])
    mmlu = check(runs, "mmlu:subject=human_sexuality", "helm_mmlu", ours, subjects[1])
    check(runs, "bbq", "helm_bbq", ours, "Age")
    records = ours["helm_mmlu"]["records"]
    fitted = [r["num_train_instances"] for r in records if r["id"].startswith(subjects[0])]
    assert min(fitted) < 5, fitted  # the window dropped examples: the fitting was exercised
    assert min(r["num_train_instances"] for r in ours["helm_gsm8k"]["records"]) < 5
    sexuality = [r for r in records if r["id"].startswith(subjects[1])]
    assert any("gender" in r["perturbed"] for r in sexuality) and any(
        "mild_mix" in r["perturbed"] for r in sexuality
    )
    names = {a["metric"] for c in mmlu for a in c["aggregates"]}
    assert {"exact_match_robustness", "exact_match_fairness", "ece_10_bin"} <= names
    # the answers are letters often enough that scores differ between instances
    scored = sexuality + ours["helm_truthfulqa"]["records"] + ours["helm_bbq"]["records"]
    assert 0 < sum(r["exact_match"] for r in scored) < len(scored)
