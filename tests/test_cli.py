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
