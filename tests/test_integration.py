"""Integration tests on the real SmolLM2-135M-Instruct (the embedded GGUF, converted once and cached)."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    from daytune.models import resolve_model

    return resolve_model("smollm2-135m", log=lambda *a: None)


def test_conversion_is_cached_and_matches_the_gguf(smollm2_dir):
    from daytune.models import resolve_model

    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert resolve_model("smollm2-135m") == smollm2_dir  # the second resolve hits the cache
    from daytune.models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def seconds_for_setup_and_a_step(model_dir) -> float:
    """What a budget must hold on this machine, now: loading SmolLM2 with the quickstart's LoRA and one optimizer
    step of it (2 micro-batches of 4 rows of 256 tokens, every position a label)."""
    from daytune.config import load_run_config
    from daytune.engine.loss import response_loss
    from daytune.models import load_model
    from daytune.train.methods import prepare_for_training

    cfg = load_run_config(EXAMPLES / "quickstart.yaml")
    t0 = time.monotonic()
    model = prepare_for_training(load_model(model_dir), cfg.train, model_dir).train()
    ids = torch.randint(0, 1000, (4, 256), generator=torch.Generator().manual_seed(0))
    for _ in range(cfg.train.grad_accum):
        loss, n = response_loss(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        )
        (loss / n).backward()
    return time.monotonic() - t0


def test_quickstart_with_a_budget_that_fits_a_step(tmp_path, smollm2_dir):
    # The budget is derived from a step measured here and now (four times setup and step, so a machine that gets
    # busier meanwhile still fits one), never a constant that a busy machine's setup alone can use up.
    budget = max(30, math.ceil(4 * seconds_for_setup_and_a_step(smollm2_dir)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "daytune",
            "--quiet",
            "run",
            str(EXAMPLES / "quickstart.yaml"),
            "--budget",
            f"{budget}s",
            "--set",
            f"out_dir={tmp_path / 'runs'}",
            "--set",
            "eval.heldout_rows=10",
            "--set",
            "eval.max_instances=1",
            "--set",
            "train.max_steps=1",  # the step the budget holds; more would only fill the budget (tested elsewhere)
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    train = summary["train"]
    # What holds at any machine speed: the budget is kept and a model is saved; a budget that holds the setup and
    # a step trains at least one.
    assert train["stopped_by"] in ("budget", "max_steps")
    assert train["steps"] >= 1
    assert train["elapsed_seconds"] <= budget
    for side in ("base", "tuned"):
        assert summary["eval"][side]["heldout"]["rows"] == 10
        suite = summary["eval"][side]["suite"]["scenarios"]
        assert (
            suite["mmlu"]["n"] == 5 and suite["bbq"]["n"] == 1
        )  # the quickstart's scenarios, one instance each
        assert set(suite) == {"mmlu", "truthfulqa", "bbq", "openbookqa", "wikitext2"}
        assert (run / "eval" / "quick" / side / "results.json").is_file()
    assert summary["eval"]["delta"]["heldout_loss"]["n"] == 10  # the table's Δ has its CI and instance count
    assert "Δ [95% CI]" in out.stdout
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert f"daytune serve --run {run}" in out.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "daytune", "runs", "list", "--json", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
    )
    (row,) = json.loads(listed.stdout)  # the run appears in `runs list`, evaluated, with its data fingerprint
    assert row["id"] == run.name and row["model"] == "smollm2-135m" and row["eval"].startswith("mmlu ")
    assert len(row["data"]) == 12 and (run / "doctor.json").is_file() and (run / "system.jsonl").is_file()


def test_server_echo_logprobs_equal_a_direct_forward(smollm2_dir):
    from fastapi.testclient import TestClient

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel

    server = ServeModel(str(smollm2_dir), device="cpu", log=lambda *a: None)
    client = TestClient(create_app(server))
    prompt = "The capital of France is Paris. The capital of Germany is"
    body = client.post(
        "/process",
        json={
            "prompt": prompt,
            "echo_prompt": True,
            "max_new_tokens": 3,
            "temperature": 1e-7,
            "top_k_per_token": 2,
            "stop_sequences": [],
        },
    ).json()
    ids = server.tokenizer(prompt)["input_ids"]
    assert body["text"].startswith(prompt) and len(body["tokens"]) == len(ids) + 3
    gen_ids = server.tokenizer(body["text"][len(prompt) :], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(server.model(torch.tensor([ids + gen_ids])).logits[0].float(), -1)
    all_ids = ids + gen_ids
    for i in range(1, len(body["tokens"])):
        assert body["tokens"][i]["logprob"] == pytest.approx(lp[i - 1, all_ids[i]].item(), abs=1e-4)
    assert " Berlin" in body["text"][len(prompt) :]


def overfit_recipe(tmp_path, rows=4, **train):
    import yaml

    data = tmp_path / "eight.jsonl"
    lines = (EXAMPLES / "data" / "gsm8k_train.jsonl").read_text().splitlines()[:rows]
    data.write_text("\n".join(lines) + "\n")
    cfg = {
        "name": "overfit",
        "model": "smollm2-135m",
        "data": {"train": str(data), "max_seq_len": 160},
        "train": {
            "micro_batch": 4,  # the same 4 rows every step (one micro-batch): the loss falls fast
            "grad_accum": 1,
            "lr": 2e-3,
            "warmup_steps": 1,
            "precision": "32-true",
            "checkpoint_every": 2,
            "lora": {"dropout": 0.0},
            **train,
        },
        "out_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "overfit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_loss_decreases_when_overfitting_4_rows(tmp_path):
    from daytune.cli import main

    assert main(["--quiet", "train", str(overfit_recipe(tmp_path, max_steps=8, min_lr_ratio=1.0))]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_continues_from_the_saved_step(tmp_path, capsys):
    from daytune.cli import main

    recipe = overfit_recipe(tmp_path, max_steps=2)
    assert main(["--quiet", "train", str(recipe)]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    first = (run / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "Resumed from" in out and "step-0000002 at step 2/3" in out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == first  # steps 1-2 kept from the first attempt, not retrained
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[2])["elapsed"] > json.loads(lines[1])["elapsed"]  # the clock carries over
    assert json.loads((run / "summary.json").read_text())["train"]["steps"] == 3
    assert "resumed" in (run / "command.txt").read_text()
