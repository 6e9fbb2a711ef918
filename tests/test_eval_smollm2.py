"""The evaluation suite on the real SmolLM2-135M: the HTTP backend against a running `daytune serve` gives the local
backend's scores with 5-shot prompts, and our MMLU agrees with lm-eval's task on the same questions."""

import socket
import threading
import time

import pytest
from conftest import EXAMPLES

from daytune.eval.lm import HttpLM, LocalLM
from daytune.eval.scenarios import DataRoot, Settings
from daytune.eval.suites import run_suite

pytestmark = pytest.mark.slow
SAMPLES = EXAMPLES / "data" / "eval"


@pytest.fixture(scope="module")
def smollm2():
    from daytune.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m", log=lambda *a: None)
    return path, LocalLM(load_model(path).eval(), load_tokenizer(path), name="smollm2-135m")


def test_quick_scenarios_through_the_server_score_as_local(smollm2):
    import uvicorn

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel

    path, local = smollm2
    plan = [
        (
            "mmlu",
            Settings(max_instances=1, subjects=["us_foreign_policy"], perturbations=["robustness"]),
        ),
        ("gsm8k", Settings(max_instances=1, max_new_tokens=32)),
    ]
    ours = run_suite(local, plan=plan, data_root=SAMPLES, bootstrap=100, log=lambda *a: None)
    server = ServeModel(str(path), device="cpu", log=lambda *a: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        remote = run_suite(
            HttpLM(f"http://127.0.0.1:{port}"),
            plan=plan,
            data_root=SAMPLES,
            bootstrap=100,
            log=lambda *a: None,
        )
    finally:
        srv.should_exit = True
        thread.join(10)
    for name in ("mmlu", "gsm8k"):
        for a, b in zip(ours["scenarios"][name]["records"], remote["scenarios"][name]["records"]):
            assert a["prediction"] == b["prediction"] and a["exact_match"] == b["exact_match"]
            if "option_logprobs" in a:
                assert b["option_logprobs"] == pytest.approx(a["option_logprobs"], abs=2e-3)
    assert "eggs" in ours["scenarios"]["gsm8k"]["example"]["output"]  # it reasons about the question


def test_mmlu_agrees_with_lm_eval_on_the_same_questions(smollm2, tmp_path, monkeypatch):
    """Our HELM-format MMLU vs lm-eval's mmlu_<subject> (5-shot, its own prompt) on the same 20 questions. The
    TruthfulQA comparison (different methods, see docs/eval.md) is a documented check, not asserted here."""
    pytest.importorskip("lm_eval")
    from daytune.eval.harness import agreement

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, lm = smollm2
    row = agreement(lm, DataRoot(SAMPLES), tmp_path, mmlu_per_subject=4, truthfulqa=0, iters=500)["mmlu"]
    assert row["n"] == 20
    assert row["agree_within_noise"], row
    assert (
        row["same_answer_correctness_likelihood_correct"] >= 0.7
    )  # most questions: both right or both wrong
