"""Integration tests on the real SmolLM2-135M-Instruct (the embedded GGUF, converted once and cached)."""

import json
import subprocess
import sys

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


def test_quickstart_end_to_end_in_one_step(tmp_path, smollm2_dir):
    # The shipped recipe as a user runs it (data, train, eval of base and tuned, the run listed), cut to one
    # optimizer step under a budget no machine's setup and step use up (budget-bound stopping is tested on the
    # tiny model, its decisions on a fake clock), and to two of its scenarios, one scored by generation and one
    # by log-likelihood (every quick scenario on SmolLM2 is test_eval_smollm2's: MMLU alone took 25 s here).
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "daytune",
            "--quiet",
            "run",
            str(EXAMPLES / "quickstart.yaml"),
            "--budget",
            "10m",
            "--set",
            f"out_dir={tmp_path / 'runs'}",
            "--set",
            "eval.heldout_rows=10",
            "--set",
            "eval.max_instances=1",
            "--set",
            "train.max_steps=1",
            "--set",
            "eval.scenarios=[bbq, wikitext2]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    train = summary["train"]
    assert train["stopped_by"] == "max_steps" and train["steps"] == 1
    assert train["elapsed_seconds"] <= 600
    for side in ("base", "tuned"):
        assert summary["eval"][side]["heldout"]["rows"] == 10
        suite = summary["eval"][side]["suite"]["scenarios"]
        assert suite["bbq"]["n"] == 1 and suite["wikitext2"]["n"] == 1  # one instance each
        assert set(suite) == {"bbq", "wikitext2"}
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
    assert row["id"] == run.name and row["model"] == "smollm2-135m" and row["eval"].startswith("bbq ")
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

    assert main(["--quiet", "train", str(overfit_recipe(tmp_path, max_steps=4, min_lr_ratio=1.0))]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4
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
