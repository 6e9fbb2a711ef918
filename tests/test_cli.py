"""The command line: bad input gives one clear line and exit code 2; `daytune run` leaves a complete run folder."""

import json
import subprocess
import sys

import pytest

from daytune.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_model_reference(capsys, tiny_recipe):
    code, _, err = run_cli(capsys, "run", str(tiny_recipe(model="no-such-model")))
    assert code == 2 and "unknown model reference 'no-such-model'" in err and "smollm2-135m" in err
    assert "Traceback" not in err


def test_missing_recipe_and_missing_data(capsys, tiny_recipe, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err
    code, _, err = run_cli(capsys, "train", str(tiny_recipe(data={"train": str(tmp_path / "missing.jsonl")})))
    assert code == 2 and "data file not found" in err and "missing.jsonl" in err


def test_malformed_jsonl_names_file_and_line(capsys, tiny_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    code, _, err = run_cli(capsys, "train", str(tiny_recipe(data={"train": str(bad)})))
    assert code == 2 and f"{bad}:2: not valid JSON" in err and "Traceback" not in err


def test_unknown_key_and_bad_budget(capsys, tiny_recipe):
    code, _, err = run_cli(capsys, "run", str(tiny_recipe(train={"epochz": 2})))
    assert code == 2 and "unknown key 'train.epochz'" in err and "epochs" in err
    code, _, err = run_cli(capsys, "run", str(tiny_recipe()), "--budget", "soonish")
    assert code == 2 and "train.budget: cannot parse duration 'soonish'" in err


def test_debug_shows_the_traceback(capsys, tiny_recipe):
    code, _, err = run_cli(capsys, "--debug", "run", str(tiny_recipe(model="no-such-model")))
    assert code == 2 and "Traceback" in err


def test_run_end_to_end_on_a_tiny_model(capsys, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    code, out, err = run_cli(capsys, "--quiet", "run", str(recipe))
    assert code == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    for side in ("base", "tuned"):
        assert summary["eval"][side]["heldout"]["rows"] == 8
        assert 0 <= summary["eval"][side]["multiple_choice"]["accuracy"] <= 1
    assert summary["eval"]["base"]["heldout"]["loss"] != summary["eval"]["tuned"]["heldout"]["loss"]
    assert f"daytune serve --run {run}" in out
    # a second run never reuses the folder
    assert main(["--quiet", "run", str(recipe)]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_train_resume_auto_and_eval(capsys, tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 4, "checkpoint_every": 2})
    assert main(["--quiet", "train", str(recipe), "--set", "train.max_steps=2"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    # the first attempt stopped at step 2 of its own plan; resuming with more steps continues from step 2
    code, out, err = run_cli(capsys, "--quiet", "train", "--resume", str(run), "--set", "train.max_steps=4")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    code, out, err = run_cli(
        capsys, "--quiet", "eval", "--run", str(run), "--recipe", str(run / "config.yaml")
    )
    assert code == 0, err
    results = json.loads((run / "eval.json").read_text())["results"]
    assert {"base", "tuned"} <= set(results)
    code, _, err = run_cli(capsys, "train", str(recipe), "--resume", "auto")
    assert code == 2 and "no unfinished run named 'tiny'" in err


def test_console_script_exit_code_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "daytune", "run", "/nonexistent.yaml"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "config file not found" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "daytune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout and "quickstart.yaml" in out.stdout


@pytest.mark.parametrize("cmd", ["run", "train", "eval", "serve"])
def test_subcommand_help(cmd):
    out = subprocess.run([sys.executable, "-m", "daytune", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: daytune" in out.stdout


def random_adapter(folder, base_model_dir):
    """A (random) LoRA adapter for `base_model_dir`, saved in `folder`."""
    from peft import LoraConfig, get_peft_model

    from daytune.models import load_model

    peft = get_peft_model(
        load_model(base_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(folder)
    return folder


def test_eval_with_base_writes_both_sides_and_their_comparison(capsys, tmp_path, tiny_model_dir):
    adapter = random_adapter(tmp_path / "adapter", tiny_model_dir)
    out = tmp_path / "eval"
    args = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--with-base", "--scenarios", "mmlu"]
    code, text, err = run_cli(
        capsys, "--quiet", "eval", *args, "--max-instances", "1", "--bootstrap", "20", "--out", str(out)
    )
    assert code == 0, err
    for side in ("base", "tuned"):
        res = json.loads((out / side / "results.json").read_text())
        assert res["title"] == side and set(res["scenarios"]) == {"mmlu"}
        assert f"## {side}: suite `quick`" in text and f"Results: {out / side / 'results.json'}" in text
    rows = json.loads((out / "compare.json").read_text())
    assert rows["a"] == "base" and rows["b"] == "tuned" and rows["rows"]
    assert "## tuned vs base" in (out / "compare.md").read_text() and "## tuned vs base" in text
    code, _, err = run_cli(capsys, "eval", *args, "--out", str(out))
    assert code == 2 and "results are never overwritten" in err


def test_serve_takes_a_wandb_model_reference(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """serve resolves --model wandb:ENTITY/PROJECT/NAME:VERSION as eval does: the artifact's base model, with its
    adapter merged."""
    import signal

    from daytune.serve.app import Server
    from daytune.track.backends import wandb as wandb_backend

    adapter = random_adapter(tmp_path / "dl" / "adapter", tiny_model_dir)
    seen = {}

    def fake_download(ref, root):
        seen["ref"] = ref
        return adapter, {"base_model": str(tiny_model_dir), "content": "adapter"}

    def fake_run(self, sockets=None):
        app = self.config.app
        seen["server"] = app.state.server
        app.state.scheduler.close(5)
        self.started = True
        for sock in sockets:
            sock.close()

    monkeypatch.setenv("DAYTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(wandb_backend, "download_model", fake_download)
    monkeypatch.setattr(Server, "run", fake_run)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the test process keeps its own handlers
    code, out, err = run_cli(capsys, "--quiet", "serve", "--model", "wandb:team/daytune/run-adapter:v3")
    assert code == 0, err
    server = seen["server"]
    assert seen["ref"] == "wandb:team/daytune/run-adapter:v3" and "Server stopped." in out
    assert server.model_ref == str(tiny_model_dir) and server.adapter == str(adapter)
    assert server.info()["adapter_merged"] and not hasattr(server.model, "peft_config")
    code, _, err = run_cli(capsys, "serve", "--model", "wandb:only-a-name")
    assert code == 2 and "wandb:ENTITY/PROJECT/NAME:VERSION" in err
