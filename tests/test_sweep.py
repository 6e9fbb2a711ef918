"""`daytune sweep` on the tiny model: bad sweep files are clear errors that write nothing, the sweep ends inside its
budget with every trial a run and the best model saved, the pruner stops a bad trial from its validation losses,
and two processes share one study (on this machine with --workers, and through a storage URL with --join)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daytune.cli import main
from daytune.config import load_run_config
from daytune.track import RunDir
from daytune.track.runs import list_runs

ROOT = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path: Path, tiny_recipe, **fields) -> Path:
    recipe = tiny_recipe(
        data={"val_fraction": 0.25},
        train={"max_steps": 100_000, "budget": "5s", "eval_every": 2, "checkpoint_every": 1000},
        eval={},
    )
    spec = {
        "name": "tiny",
        "recipe": str(recipe),
        "budget": "60s",
        "objective": {"suite": "val_loss"},
        "pruner": {"kind": "none"},
        "space": {
            "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
            "train.lora.r": {"choices": [4, 8]},
        },
        "out_dir": str(tmp_path / "sweeps"),
    }
    spec.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"space": {"train.lrr": {"low": 1, "high": 2}}}, r"space\.train\.lrr: no such field"),
        ({"space": {"train.lr": {"low": 1.0e-3, "high": 1.0e-4}}}, r"space\.train\.lr: empty range"),
        ({"space": {"train.lora.r": {"choices": []}}}, r"space\.train\.lora\.r\.choices: empty"),
        (
            {"space": {"train.method": {"choices": ["lora", "nope"]}}},
            r"space\.train\.method: the value 'nope' is refused",
        ),
        ({"space": {"train.lora": {"low": 1, "high": 2}}}, r"space\.train\.lora: .*is a section"),
        (
            {"space": {"data_recipe.sources.0.weight": {"low": 1, "high": 2}}},
            r"space\.data_recipe.*no data\.prepare",
        ),
        ({"budget": "10s"}, r"budget: 10s is smaller than one trial's setup"),
        (
            {"objective": {"suite": "quick", "metric": "bleu"}},
            r"objective\.metric: no scenario of suite quick has 'bleu'",
        ),
        ({"objective": {"suite": "nope"}}, r"objective\.suite: 'nope': not one of"),
    ],
)
def test_bad_sweep_files_are_clear_errors(tmp_path, tiny_recipe, capsys, fields, message):
    import re

    path = _sweep_file(tmp_path, tiny_recipe, **fields)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and re.search(message, err), err
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "runs").exists()  # nothing written


def _state(folder: Path) -> dict:
    return json.loads((folder / "sweep.json").read_text())


def test_sweep_ends_inside_its_budget_with_two_workers_and_the_best_model_saved(tmp_path, tiny_recipe):
    path = _sweep_file(tmp_path, tiny_recipe, budget="35s")
    assert main(["--quiet", "sweep", str(path), "--workers", "2"]) == 0
    (folder,) = (tmp_path / "sweeps").iterdir()
    st = _state(folder)
    assert (
        st["final"] and st["wall_seconds"] <= st["budget_seconds"]
    )  # the whole sweep, from the command's start
    assert all(t["ended"] is not None and t["ended"] <= st["budget_seconds"] for t in st["trials"])
    assert len({t["worker"] for t in st["trials"]}) == 2  # both processes took trials from the one study
    assert st["trials"][0]["starting_recipe"] and st["trials"][0]["params"] == {
        "train.lr": 1e-3,
        "train.lora.r": 8,
    }
    runs = {str(r.path.resolve()) for r in list_runs(tmp_path / "runs")}
    assert {t["run_dir"] for t in st["trials"]} <= runs  # every trial is a normal, listed run
    best = st["best"]
    assert (
        best["state"] == "COMPLETE"
        and (Path(best["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    )
    assert best["value"] == min(t["value"] for t in st["trials"] if t["state"] == "COMPLETE")
    retrain = load_run_config(folder / "best.yaml")  # a recipe `daytune run` takes as it is
    assert retrain.train.lr == best["params"]["train.lr"] and retrain.train.budget == "5s"
    assert "error" in st["importances"] or set(st["importances"]) == {"train.lr", "train.lora.r"}
    page = (folder / "report.html").read_text()
    assert "Objective over time" in page and "Trials" in page
    assert main(["sweep", str(folder)]) == 0  # the table of a finished sweep


def test_the_pruner_stops_a_bad_trial_from_its_validation_losses(tmp_path, tiny_recipe, monkeypatch):
    """Two trials with fixed parameters: a learning rate that learns, then one that cannot. Successive halving
    compares the second trial's validation loss at step 2 with the first's and stops it there."""
    import daytune.sweep.runner as runner

    def enqueue(sw, study, reporter):
        study.enqueue_trial({"train.lr": 1e-2, "train.lora.r": 8}, user_attrs={"starting_recipe": True})
        study.enqueue_trial({"train.lr": 1e-8, "train.lora.r": 8})

    monkeypatch.setattr(runner, "enqueue_starting_recipe", enqueue)
    path = _sweep_file(
        tmp_path,
        tiny_recipe,
        budget="10m",
        trial_budget="5m",
        trials=2,
        pruner={"kind": "successive_halving", "min_resource": 2, "reduction_factor": 2},
        space={"train.lr": {"low": 1.0e-9, "high": 1.0e-1, "log": True}, "train.lora.r": {"choices": [4, 8]}},
        set=["train.max_steps=6"],
    )
    assert main(["--quiet", "sweep", str(path)]) == 0
    (folder,) = (tmp_path / "sweeps").iterdir()
    good, bad = _state(folder)["trials"]
    assert good["state"] == "COMPLETE" and good["train"]["steps"] == 6
    assert bad["state"] == "PRUNED" and bad["train"]["stopped_by"] == "pruned" and bad["train"]["steps"] == 2
    assert bad["val_loss"]["2"] > good["val_loss"]["2"]  # why it was stopped
    run = RunDir(Path(bad["run_dir"]))
    assert (
        run.read_summary()["train"]["stopped_by"] == "pruned"
        and (run.adapter / "adapter_model.safetensors").is_file()
    )


def _study_exists(db: Path, name: str) -> bool:
    """Read the study table directly: opening optuna's storage here would race the sweep creating its schema."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:  # the tables are not there yet
        return False


def test_a_second_process_joins_the_study_through_its_storage_url(tmp_path, tiny_recipe):
    """The many-machines path: one process starts the sweep on a storage URL, another (its own out_dir, as
    another machine would have) joins it with --join; both add trials to the one study."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    path = _sweep_file(tmp_path, tiny_recipe, budget="40s")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    daytune = [sys.executable, "-m", "daytune", "--quiet", "sweep", str(path), "--storage", url]
    first = subprocess.Popen(
        daytune, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for _ in range(240):  # another machine joins once the study exists
        if _study_exists(Path(url[len("sqlite:///") :]), "tiny"):
            break
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.5)
    other = tmp_path / "machine-b"
    other.mkdir()
    join = [*daytune, "--join", "--set", f"out_dir={other / 'sweeps'}"]
    second = subprocess.run(join, cwd=other, env=env, capture_output=True, text=True, timeout=300)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode == 0, second.stdout + second.stderr
    study = optuna.load_study(study_name="tiny", storage=url)
    workers = {t.user_attrs.get("worker") for t in study.trials}
    assert len(workers) == 2 and len({t.number for t in study.trials}) == len(study.trials)
    assert study.user_attrs["sweep"]["deadline"] - study.user_attrs["sweep"]["started"] == 40


def test_a_sweep_never_tunes_on_its_test_tasks(tmp_path, tiny_recipe, shared_data, capsys):
    path = _sweep_file(
        tmp_path,
        tiny_recipe,
        objective={"suite": "unseen", "tasks": ["task1388_cb_entailment"], "data_root": str(shared_data)},
        test={"suite": "unseen", "data_root": str(shared_data)},
    )
    assert main(["sweep", str(path)]) == 2
    assert "test.tasks: the objective scores task1388_cb_entailment too" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_mix_weights_are_searched_on_data_prepared_once_per_mix(tmp_path, tiny_recipe, monkeypatch):
    """A data_recipe field in the space: each distinct mix is prepared once into the sweep folder, and each trial
    trains on the data of its own parameters."""
    import daytune.sweep.runner as runner

    def enqueue(sw, study, reporter):
        for w in (1.0, 0.5, 1.0):
            study.enqueue_trial({"data_recipe.sources.0.weight": w})

    monkeypatch.setattr(runner, "enqueue_starting_recipe", enqueue)
    recipe = tiny_recipe(
        data={"prepare": str(ROOT / "examples" / "quickstart-data.yaml"), "train": None, "max_rows": None},
        train={"max_steps": 2, "budget": "5m", "eval_every": 1},
        eval={},
    )
    spec = {
        "name": "mix",
        "recipe": str(recipe),
        "budget": "15m",
        "trials": 3,
        "objective": {"suite": "val_loss"},
        "pruner": {"kind": "none"},
        "space": {"data_recipe.sources.0.weight": {"choices": [0.5, 1.0]}},
        "out_dir": str(tmp_path / "sweeps"),
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["--quiet", "sweep", str(path)]) == 0
    (folder,) = (tmp_path / "sweeps").iterdir()
    trials = _state(folder)["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    data = [Path(load_run_config(Path(t["run_dir"]) / "config.yaml").data.train) for t in trials]
    assert data[0] == data[2] != data[1] and all(d.parent == folder / "data" for d in data)
    gsm8k = [json.loads((d / "data_card.json").read_text())["sources"][0]["rows"]["selected"] for d in data]
    assert gsm8k[1] == round(gsm8k[0] * 0.5)  # the weight sampled half of the cleaned rows


def test_the_starting_recipe_is_the_first_trial_when_it_lies_in_the_space(tmp_path, tiny_recipe):
    from daytune.sweep.spec import load_sweep, starting_point

    space = {
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2},
        "train.lora.targets": {"choices": ["all-linear", "attention"]},
    }
    path = _sweep_file(tmp_path, tiny_recipe, space=space, set=["train.lora.targets=attention"])
    spec, dims, cfg = load_sweep(path)
    # the recipe reads `attention` as the list [attention]: the choice that reads the same is the recipe's
    assert starting_point(spec, cfg, dims) == ({"train.lr": 1e-3, "train.lora.targets": "attention"}, None)
    space["train.lr"] = {"low": 1.0e-2, "high": 1.0e-1}
    spec, dims, cfg = load_sweep(
        _sweep_file(tmp_path, tiny_recipe, space=space, set=["train.lora.targets=attention"])
    )
    assert starting_point(spec, cfg, dims) == ({}, "train.lr (0.001)")


def test_a_pruner_that_never_saw_a_validation_says_so():
    from types import SimpleNamespace

    from daytune.sweep.summary import _pruning

    sw = SimpleNamespace(
        spec=SimpleNamespace(pruner=SimpleNamespace(kind="hyperband", eval_every=5, min_resource=5))
    )
    short = [{"train": {"steps": n}, "val_loss": {}} for n in (4, 5)]
    out = _pruning(short, sw)
    assert out["trials_with_validation"] == 0 and out["trial_steps"] == [4, 5]
    assert "nothing could be pruned" in out["note"] and "eval_every 5" in out["note"]
    seen = short + [{"train": {"steps": 10}, "val_loss": {5: 1.2, 10: 1.1}}]
    assert _pruning(seen, sw)["note"] is None and _pruning(seen, sw)["trials_with_validation"] == 1
