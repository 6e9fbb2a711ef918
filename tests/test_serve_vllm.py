"""`daytune serve --engine vllm` against daytune's own engine, on a merged model from `daytune export --merge`
(SmolLM2-135M with a LoRA adapter of random, non-zero weights folded in), so "merged models load in vLLM" is
tested, not claimed.

vLLM lives in its own venv (make vllm-venv; .ci/run builds it): the vLLM server is `python -m daytune serve
--engine vllm` run from that venv on this checkout's sources; daytune's engine serves the same folder from the test
process. Without the venv the test skips, unless CI=true: then it fails, .ci/run must have built it.

What must agree: greedy text, token by token, finish reasons, echoed prompt tokens, stop-sequence cuts and
`top_logprob` keys; log-probabilities within LOGPROB_TOL (two fp32 implementations: vLLM's CPU attention and
GEMMs against PyTorch's SDPA and matmuls, whose rounding differs)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT
from serve_helpers import free_port, live_server, wait_healthy

from daytune.cli import main
from daytune.models import ModelSource, load_model, resolve_model
from daytune.serve.model import ServeModel

VLLM_VENV = Path(os.environ.get("DAYTUNE_VLLM_VENV", ROOT / ".venv-vllm")).absolute()
LOGPROB_TOL = 5e-4  # measured: at most 5e-5 apart on this model (186 tokens, fp32 on both sides)
PROMPTS = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "Question: Which gas do plants take in?\nAnswer:",
    "",
]


def require_vllm_venv() -> Path:
    python = VLLM_VENV / "bin" / "python"
    if (VLLM_VENV / ".daytune-vllm").is_file() and python.is_file():
        return python
    message = f"no vLLM venv at {VLLM_VENV} (make vllm-venv, or set $DAYTUNE_VLLM_VENV)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + ": .ci/run builds it, so CI must have it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """SmolLM2-135M + a LoRA adapter (r 8, all linear layers, B drawn at std 0.02 so the merge changes every
    projection), merged by `daytune export --merge`."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    model = load_model(resolve_model("smollm2-135m", log=lambda *a: None), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft.save_pretrained(tmp / "adapter")
    out = tmp / "merged"
    cmd = [
        "export",
        "--model",
        "smollm2-135m",
        "--adapter",
        str(tmp / "adapter"),
        "--merge",
        "--out",
        str(out),
    ]
    assert main(cmd) == 0
    return out


@contextmanager
def vllm_server(model: Path, *args: str):
    """`daytune serve --engine vllm` from the vLLM venv, this checkout's sources first on the path."""
    python = require_vllm_venv()
    port = free_port()
    log = model.parent / f"vllm-{port}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "DAYTUNE_QUIET": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: vLLM's default takes most of the RAM
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    cmd = [
        str(python),
        "-m",
        "daytune",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--engine",
        "vllm",
    ]
    cmd += ["--vllm-option", "enforce_eager=true", *args]  # no compilation: the server is up in ~15 s
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout=600)
        except RuntimeError as e:
            raise AssertionError(f"{e}; its log:\n{log.read_text()[-4000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def post(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/process", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def assert_same(ours: dict, theirs: dict, what: str) -> None:
    """Two /process responses: equal text, tokens, finish reasons and top_logprob keys; logprobs within the
    tolerance. A top_logprob key may differ only where two alternatives are closer than the tolerance."""
    assert len(ours["completions"]) == len(theirs["completions"]), what
    for a, b in zip(ours["completions"], theirs["completions"]):
        assert a["text"] == b["text"], what
        assert a["finish_reason"] == b["finish_reason"], what
        assert [t["text"] for t in a["tokens"]] == [t["text"] for t in b["tokens"]], what
        for i, (ta, tb) in enumerate(zip(a["tokens"], b["tokens"])):
            assert abs(ta["logprob"] - tb["logprob"]) < LOGPROB_TOL, (what, i, ta, tb)
            if set(ta["top_logprob"]) != set(tb["top_logprob"]):
                edge = min(ta["top_logprob"].values())
                assert any(abs(v - edge) < LOGPROB_TOL for k, v in tb["top_logprob"].items()), (what, i)
            for k in set(ta["top_logprob"]) & set(tb["top_logprob"]):
                assert abs(ta["top_logprob"][k] - tb["top_logprob"][k]) < LOGPROB_TOL, (what, i, k)
        assert abs(a["logprob"] - b["logprob"]) < LOGPROB_TOL * max(1, len(a["tokens"])), what


def test_vllm_engine_matches_daytune_engine_on_a_merged_model(merged):
    require_vllm_venv()
    greedy = [
        {"prompt": p, "max_new_tokens": 16, "echo_prompt": True, "top_k_per_token": 3, "temperature": 1e-7}
        for p in PROMPTS
    ]
    shaped = [
        {"prompt": PROMPTS[1], "max_new_tokens": 24, "stop_sequences": [".", "\n"]},  # HELM's stop cut
        {
            "prompt": PROMPTS[2],
            "max_new_tokens": 0,
            "echo_prompt": True,
            "top_k_per_token": 5,
        },  # scoring only
        {"prompt": PROMPTS[0], "max_new_tokens": 6, "top_k_per_token": 0},
        {"prompt": PROMPTS[4], "max_new_tokens": 32, "stop_sequences": ["Question:"]},
    ]
    sampled = {"prompt": PROMPTS[0], "max_new_tokens": 8, "temperature": 0.9, "top_p": 0.95, "top_k": 50}
    ours_model = ServeModel(str(merged), device="cpu", log=lambda *a: None)
    with live_server(ours_model, prefix_cache_mb=0) as url:
        ours = [post(url, b) for b in greedy + shaped]
    del ours_model
    with vllm_server(merged, "--max-batch", "8") as url:
        health = httpx.get(f"{url}/health").json()
        assert health["engine"] == "vllm" and health["model"] == "merged"
        theirs = [post(url, b) for b in greedy + shaped]
        # the same requests at once: batched by vLLM, still the same greedy tokens
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda b: post(url, b), greedy + shaped))
        # num_return_sequences: one vLLM request per sequence, seeded with seed + i: reproducible
        n3 = post(url, sampled | {"num_return_sequences": 3, "seed": 7})
        n3_again = post(url, sampled | {"num_return_sequences": 3, "seed": 7})
        tok = httpx.post(f"{url}/tokenize", json={"text": PROMPTS[1]}).json()["tokens"]
        text = httpx.post(f"{url}/decode", json={"tokens": tok}).json()["text"]
    for body, a, b, c in zip(greedy + shaped, ours, theirs, together):
        assert_same(a, b, body["prompt"][:30])
        assert_same(b, c, "batched: " + body["prompt"][:30])
    assert any(a["completions"][0]["finish_reason"] == "stop" for a in ours), "a stop sequence cut the text"
    scoring = ours[len(greedy) + 1]
    assert len(scoring["tokens"]) > 5 and scoring["text"] == PROMPTS[2]  # echo only, nothing generated
    assert [c["text"] for c in n3["completions"]] == [c["text"] for c in n3_again["completions"]]
    assert len({c["text"] for c in n3["completions"]}) > 1  # three different samples
    for c in n3["completions"]:
        assert c["finish_reason"] in ("length", "endoftext", "stop")
        assert abs(c["logprob"] - sum(t["logprob"] for t in c["tokens"])) < 1e-4
    assert text == PROMPTS[1]


def test_serve_merges_a_run_adapter_once_for_vllm(tmp_path, tiny_model_dir, monkeypatch):
    """--engine vllm with an adapter: merged into $DAYTUNE_HOME/merged once, the same folder reused after."""
    from peft import LoraConfig, get_peft_model

    from daytune.cli.serve import _vllm_folder

    monkeypatch.setenv("DAYTUNE_HOME", str(tmp_path / "home"))
    peft = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "adapter")
    messages = []
    source = ModelSource.of_model(str(tiny_model_dir), tmp_path / "adapter")
    first = Path(_vllm_folder(source, messages.append))
    assert (first / "config.json").is_file() and not (first / "adapter_config.json").exists()
    assert first.parent == tmp_path / "home" / "merged"
    again = Path(_vllm_folder(source, messages.append))
    assert again == first and "cached" in messages[-1]
    assert _vllm_folder(ModelSource(str(tiny_model_dir)), print) == str(tiny_model_dir)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here"
)
def test_engine_vllm_without_vllm_is_a_clear_error(tiny_model_dir, capsys):
    code = main(["serve", "--model", str(tiny_model_dir), "--engine", "vllm", "--port", str(free_port())])
    assert code == 2
    assert "vLLM is not installed" in capsys.readouterr().err


def test_vllm_option_goes_with_engine_vllm(tiny_model_dir, capsys):
    code = main(["serve", "--model", str(tiny_model_dir), "--vllm-option", "enforce_eager=true"])
    assert code == 2 and "--engine vllm" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
