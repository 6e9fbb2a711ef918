"""The training loop on a tiny model: saved adapters reload, accumulation is exact, resume is exact, the budget
and signals always end with a saved model."""

import math
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file

from daytune.config import load_run_config
from daytune.errors import ConfigError
from daytune.pipeline import train_run
from daytune.track import RunDir
from daytune.train.checkpoint import list_checkpoints
from daytune.train.loop import find_resume_checkpoint, lr_at


def new_run(cfg):
    from daytune.config import dump_yaml

    run = RunDir.create(cfg.out_dir, cfg.name)
    run.write_start(dump_yaml(cfg), ["test"])
    return run


def test_trains_saves_and_reloads_with_plain_peft(tiny_recipe, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_run_config(tiny_recipe())
    run = new_run(cfg)
    result = train_run(cfg, run)
    assert result.steps == 4 and result.stopped_by == "max_steps" and result.tokens > 0
    for name in ("config.yaml", "command.txt", "git.txt", "metrics.jsonl", "summary.json"):
        assert (run.path / name).is_file(), name
    assert (run.adapter / "adapter_config.json").is_file() and (
        run.adapter / "adapter_model.safetensors"
    ).is_file()
    metrics = run.read_metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "elapsed"} <= set(m) for m in metrics)
    summary = run.read_summary()
    assert summary["train"]["steps"] == 4 and summary["finished"] is True

    ids = torch.tensor([[5, 77, 123, 9, 300]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(run.adapter)).eval()
        tuned_logits = tuned(ids).logits
        merged_logits = tuned.merge_and_unload()(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)  # the adapter learned something
    assert torch.allclose(tuned_logits, merged_logits, atol=1e-4)
    # the final checkpoint holds the same trained weights, by parameter name
    final = find_resume_checkpoint(run)
    saved = load_file(str(final / "weights.safetensors"))
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run.adapter)
    )
    state = reloaded.state_dict()
    assert saved and all(torch.equal(saved[k], state[k]) for k in saved)


def test_grad_accumulation_equals_bigger_micro_batch(tiny_recipe):
    adapters = []
    for micro, accum in ((4, 1), (1, 4), (2, 2)):
        cfg = load_run_config(tiny_recipe(train={"micro_batch": micro, "grad_accum": accum, "max_steps": 1}))
        run = new_run(cfg)
        train_run(cfg, run)
        adapters.append(load_file(str(run.adapter / "adapter_model.safetensors")))
        losses = [m["loss"] for m in run.read_metrics()]
        adapters[-1]["_loss"] = torch.tensor(losses)
    for other in adapters[1:]:
        for k in adapters[0]:
            assert torch.allclose(adapters[0][k], other[k], atol=1e-6), k


class Crash(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tiny_recipe, monkeypatch):
    overrides = {"train": {"max_steps": 6, "checkpoint_every": 2, "lora": {"dropout": 0.1}}}
    cfg = load_run_config(tiny_recipe(**overrides))
    full = new_run(cfg)
    train_run(cfg, full)
    reference = [m["loss"] for m in full.read_metrics()]

    cfg = load_run_config(tiny_recipe(**overrides))
    crashed = new_run(cfg)
    real_log = RunDir.log

    def crash_at_step_3(self, record):
        if record["step"] == 3:
            raise Crash()
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crash_at_step_3)
    with pytest.raises(Crash):
        train_run(cfg, crashed)
    monkeypatch.setattr(RunDir, "log", real_log)
    checkpoint = find_resume_checkpoint(crashed)
    assert checkpoint.name == "step-0000002"  # lost at most one checkpoint interval
    result = train_run(cfg, crashed, resume=checkpoint)
    assert result.steps == 6
    resumed = [m["loss"] for m in crashed.read_metrics()]
    assert [m["step"] for m in crashed.read_metrics()] == [1, 2, 3, 4, 5, 6]
    assert resumed == pytest.approx(reference, abs=1e-4)
    a = load_file(str(full.adapter / "adapter_model.safetensors"))
    b = load_file(str(crashed.adapter / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


class StepClock:
    """A fake clock for the budget (`setup(..., clock=)`): time passes only as the model trains — `micro(i)`
    seconds for the i-th training micro-batch (forward and backward) — while the base model loads (`setup`) and
    for each save (`save`). The budget's decisions then follow this step-time model, never the machine's speed."""

    def __init__(self, monkeypatch, micro=lambda i: 1.0, setup=0.0, save=0.0):
        import daytune.train.loop as loop

        self.now, self.micro_batches = 0.0, 0
        real_loss, real_load, real_save = (
            loop.response_loss,
            loop.load_base_for_training,
            loop.save_checkpoint,
        )

        def response_loss(model, batch, fused_ce=None):
            if torch.is_grad_enabled():  # a training micro-batch (timing passes and validation run without)
                self.now += micro(self.micro_batches)
                self.micro_batches += 1
            return real_loss(model, batch, fused_ce)

        def load_base_for_training(*args, **kwargs):
            self.now += setup
            return real_load(*args, **kwargs)

        def save_checkpoint(*args, **kwargs):
            self.now += save
            return real_save(*args, **kwargs)

        monkeypatch.setattr(loop, "response_loss", response_loss)
        monkeypatch.setattr(loop, "load_base_for_training", load_base_for_training)
        monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)

    def __call__(self) -> float:
        return self.now


def train_on_clock(cfg, run, clock, resume=None):
    from daytune.train.loop import fit, setup

    return fit(setup(cfg, run, resume=resume, clock=clock))


def test_budget_stops_in_time_and_saves(tiny_recipe, monkeypatch):
    """1 s a step, a quarter second a save, 20 s: the loop trains while a step (x1.5) and the final save still fit,
    stops inside the budget with a saved model, and the cosine reaches its floor on the last step."""
    clock = StepClock(monkeypatch, save=0.25)
    cfg = load_run_config(
        tiny_recipe(train={"max_steps": 100_000, "budget": "20s", "checkpoint_every": 1000})
    )
    run = new_run(cfg)
    result = train_on_clock(cfg, run, clock)
    assert result.stopped_by == "budget" and result.elapsed_seconds <= 20
    metrics = run.read_metrics()
    reserve = 1.0  # the save reserve: twice the slowest save, at least 1 s
    # every step started with room for a slow step and the save; the one after the last had none
    assert all(m["budget_left"] + 1.0 >= 1.5 * 1.0 + reserve for m in metrics[:-1])
    assert metrics[-1]["budget_left"] < 1.5 * 1.0 + reserve
    assert (
        result.steps == len(metrics) == 18
    )  # (20 - 0.25 s setup - 2.5 s kept) / 1 s, and the step at the edge
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert list_checkpoints(run.checkpoints)[-1].name == f"step-{result.steps:07d}"
    # the schedule's horizon is the deadline, not step 100000: after the first step it aims at the last step
    assert {m["total_steps"] for m in metrics[1:]} == {result.steps}
    assert metrics[-1]["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert metrics[-2]["lr"] > metrics[-1]["lr"]


def test_a_budget_that_fits_setup_and_a_step_trains_one(tiny_recipe):
    """The promise on the real clock: a budget derived from a measured run of one step (four times it, so a
    machine that turns busier meanwhile still fits) trains at least one step, and stays inside its budget."""
    cfg = load_run_config(tiny_recipe(train={"max_steps": 1}))
    measured = train_run(cfg, new_run(cfg)).elapsed_seconds  # setup, one step, the saves: this machine, now
    budget = math.ceil(4 * measured)
    cfg = load_run_config(tiny_recipe(train={"max_steps": 100_000, "budget": f"{budget}s"}))
    result = train_run(cfg, new_run(cfg))
    assert result.steps >= 1 and result.stopped_by == "budget" and result.elapsed_seconds <= budget


def test_sigterm_stops_and_saves(tiny_recipe, monkeypatch):
    cfg = load_run_config(tiny_recipe(train={"max_steps": 50}))
    run = new_run(cfg)
    real_log = RunDir.log

    def signal_at_step_2(self, record):
        real_log(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunDir, "log", signal_at_step_2)
    result = train_run(cfg, run)
    assert result.stopped_by == "signal" and result.steps == 2
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert run.read_summary()["finished"] is False


def test_unknown_lora_target_is_a_clear_error(tiny_recipe):
    cfg = load_run_config(tiny_recipe(train={"lora": {"targets": ["query_key_value"]}}))
    with pytest.raises(ConfigError, match="query_key_value.*q_proj"):
        train_run(cfg, new_run(cfg))


def test_lr_schedule():
    kw = dict(lr=1.0, warmup=2, min_ratio=0.1)
    assert lr_at(0, 10, **kw) == 0.5 and lr_at(1, 10, **kw) == 1.0
    assert lr_at(2, 10, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert lr_at(5, 10, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(9, 10, **kw) == pytest.approx(0.1)  # the last step runs at the floor
    assert lr_at(20, 10, **kw) == pytest.approx(0.1)


def test_run_folders_are_never_reused(tmp_path):
    a = RunDir.create(tmp_path, "x")
    b = RunDir.create(tmp_path, "x")
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()


def test_a_step_that_would_cross_the_deadline_is_abandoned(tiny_recipe, monkeypatch):
    """Micro-batches that turn slow mid-run (0.1 s, then 3 s each): the stop rule lets step 3 start (the steps
    so far took 0.4 s), its first micro-batch shows that it cannot finish in time, and the loop drops it instead
    of overrunning: the run ends with the state of step 2."""
    clock = StepClock(monkeypatch, micro=lambda i: 0.1 if i < 8 else 3.0)
    cfg = load_run_config(tiny_recipe(train={"max_steps": 10, "grad_accum": 4, "budget": "10s"}))
    run = new_run(cfg)
    result = train_on_clock(cfg, run, clock)
    assert result.stopped_by == "budget" and result.steps == 2 and clock.micro_batches == 9
    assert result.elapsed_seconds <= 10  # finishing step 3 would have ended at 12.8 s
    saved = load_file(str(list_checkpoints(run.checkpoints)[-1] / "weights.safetensors"))
    final = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert list_checkpoints(run.checkpoints)[-1].name == "step-0000002"
    assert all(torch.equal(saved[k], final[_adapter_key(k)]) for k in saved)


def _adapter_key(name: str) -> str:
    """A trainable parameter's name in the checkpoint -> its name in PEFT's adapter_model.safetensors."""
    return name.replace(".default.weight", ".weight")


def test_a_budget_shorter_than_the_setup_is_a_clear_error(tiny_recipe, monkeypatch, capsys):
    """--budget 5s where the setup takes 10 s: exit 2, saying what the setup took, and no run folder left."""
    from functools import partial

    import daytune.pipeline as pipeline
    from daytune.cli import main
    from daytune.train.loop import setup

    clock = StepClock(monkeypatch, setup=10.0)
    monkeypatch.setattr(pipeline, "setup", partial(setup, clock=clock))
    recipe = tiny_recipe()
    code = main(["--quiet", "run", str(recipe), "--budget", "5s"])
    err = capsys.readouterr().err
    assert code == 2 and clock.micro_batches == 0
    assert (
        "train.budget: 5s is too short: the setup" in err and "took 10.0s" in err and "give at least" in err
    )
    assert list((recipe.parent / "runs").iterdir()) == []


def test_a_run_that_trained_no_step_does_not_evaluate_it_as_tuned(tiny_recipe, monkeypatch, capsys):
    """The setup fits but not one step (40 micro-batches of 0.5 s in 15 s): the untrained adapter is saved with a
    loud warning, and `daytune run` evaluates the base model only."""
    from functools import partial

    import daytune.pipeline as pipeline
    from daytune.cli import main
    from daytune.train.loop import setup

    clock = StepClock(monkeypatch, micro=lambda i: 0.5)
    monkeypatch.setattr(pipeline, "setup", partial(setup, clock=clock))
    recipe = tiny_recipe(train={"max_steps": 10, "grad_accum": 40, "budget": "15s"})
    assert main(["--quiet", "run", str(recipe)]) == 0
    out = capsys.readouterr().out
    (run,) = (recipe.parent / "runs").iterdir()
    summary = RunDir(run).read_summary()
    assert summary["train"]["steps"] == 0 and summary["train"]["elapsed_seconds"] <= 15
    assert "warning: no optimizer step was trained (the budget left no time for one)" in out
    assert "Not evaluating the untrained adapter as 'tuned'" in out
    assert set(summary["eval"]) == {"base"}


def test_saved_files_and_folders_get_plain_permissions(tiny_recipe):
    """Atomic writes go through private temporaries; what lands must carry the usual umask permissions."""
    import stat

    umask = os.umask(0o022)
    try:
        cfg = load_run_config(tiny_recipe(train={"max_steps": 1, "checkpoint_every": 1}))
        run = new_run(cfg)
        train_run(cfg, run)
        for path in (run.path / "config.yaml", run.trained, run.trained / "adapter_config.json"):
            want = 0o755 if path.is_dir() else 0o644
            assert stat.S_IMODE(path.stat().st_mode) == want, path
        (checkpoint,) = [p for p in run.checkpoints.iterdir() if p.is_dir()]
        assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o755
    finally:
        os.umask(umask)


def _malicious_pickle(path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    path.write_bytes(pickle.dumps(Payload()))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _rng_without_cpu_state(path):
    from safetensors.torch import save_file

    save_file({"other": torch.zeros(1)}, str(path))


def _drop_python_rng(path):
    import json

    state = json.loads(path.read_text())
    del state["python_rng"]
    path.write_text(json.dumps(state))


@pytest.mark.parametrize(
    "name,tamper,wrong",
    [
        ("optimizer.pt", _malicious_pickle, "holds objects other than tensors and numbers"),
        ("optimizer.pt", _truncate, "cannot read the optimizer state: damaged or truncated"),
        ("weights.safetensors", _truncate, "cannot read the trained weights: damaged or truncated"),
        ("rng-0.safetensors", lambda p: p.unlink(), "missing (the random-number states)"),
        ("rng-0.safetensors", _rng_without_cpu_state, "no valid CPU random-number state"),
        ("state.json", _drop_python_rng, "no valid Python random state"),
        ("state.json", lambda p: p.write_text("{"), "not valid JSON"),
    ],
)
def test_a_damaged_checkpoint_is_a_clear_error(tiny_recipe, capsys, name, tamper, wrong):
    """Resuming from a tampered or broken checkpoint: exit 2 naming the file and what is wrong with it (never
    executing a pickle, never advising weights_only=False), the older checkpoint offered, the run kept."""
    from daytune.cli import main

    cfg = load_run_config(tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1}))
    run = new_run(cfg)
    train_run(cfg, run)
    newest = list_checkpoints(run.checkpoints)[-1]
    tamper(newest / name)
    capsys.readouterr()
    code = main(["--quiet", "train", "--resume", str(run.path), "--set", "train.max_steps=3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{newest / name}: " in err and wrong in err, err
    assert "weights_only" not in err and "internal error" not in err
    assert "the older step-0000001 is beside it" in err
    assert not (newest / "PWNED").exists() and run.path.is_dir() and newest.is_dir()


def test_a_resumed_budget_run_reproduces_the_uninterrupted_one(tiny_recipe, monkeypatch):
    """With a budget the loop times a forward pass before its first step; after a resume that pass must not draw
    the dropout masks the restored random state holds for the next step. On a step-time model (1 s a step) the
    crashed-and-resumed run trains the same steps with the same losses, learning rates and weights."""
    overrides = {
        "train": {"max_steps": 1000, "budget": "14s", "checkpoint_every": 2, "lora": {"dropout": 0.1}}
    }
    cfg = load_run_config(tiny_recipe(**overrides))
    full = new_run(cfg)
    reference = train_on_clock(cfg, full, StepClock(monkeypatch))
    assert reference.stopped_by == "budget" and reference.steps == 12

    crashed = new_run(cfg)
    real_log = RunDir.log

    def crash_at_step_5(self, record):
        if record["step"] == 5:
            raise Crash()
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crash_at_step_5)
    with pytest.raises(Crash):
        train_on_clock(cfg, crashed, StepClock(monkeypatch))
    monkeypatch.setattr(RunDir, "log", real_log)
    assert "daytune-system" not in {t.name for t in threading.enumerate()}  # the crash stopped the sampler
    checkpoint = find_resume_checkpoint(crashed)
    assert checkpoint.name == "step-0000004"
    resumed = train_on_clock(cfg, crashed, StepClock(monkeypatch), resume=checkpoint)
    assert resumed.steps == reference.steps and resumed.stopped_by == "budget"
    want, got = full.read_metrics(), crashed.read_metrics()
    assert [m["step"] for m in got] == list(range(1, 13))
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], abs=1e-6)
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in want], rel=1e-9)
    a = load_file(str(full.adapter / "adapter_model.safetensors"))
    b = load_file(str(crashed.adapter / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_failed_trains_leave_no_run_folder_and_a_crash_after_checkpoints_is_marked(
    tiny_recipe, monkeypatch, capsys
):
    """Failures before anything trained (a bad LoRA target, a malformed data line, for train and run) remove the
    run folder they created: `runs list` shows no runs. A crash after checkpoints keeps the run (resumable),
    marked failed, until a resume finishes it."""
    import json

    from daytune.cli import main

    bad = tiny_recipe().parent / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    for command in ("train", "run"):
        for sections, error in [
            ({"train": {"lora": {"targets": ["query_key_value"]}}}, "query_key_value"),
            ({"data": {"train": str(bad)}}, "bad.jsonl:2: not valid JSON"),
        ]:
            recipe = tiny_recipe(**sections)  # written anew each time: the same recipe.yaml
            assert main(["--quiet", command, str(recipe)]) == 2
            assert error in capsys.readouterr().err
    runs_dir = recipe.parent / "runs"
    assert list(runs_dir.iterdir()) == []
    capsys.readouterr()
    assert main(["runs", "list", "--runs-dir", str(runs_dir)]) == 0
    assert "No runs under" in capsys.readouterr().out

    real_log = RunDir.log

    def crash_at_step_3(self, record):
        if record["step"] == 3:
            raise RuntimeError("disk on fire")
        real_log(self, record)

    monkeypatch.setattr(RunDir, "log", crash_at_step_3)
    recipe = tiny_recipe(train={"max_steps": 4, "checkpoint_every": 2})
    assert main(["--quiet", "train", str(recipe)]) == 1
    monkeypatch.setattr(RunDir, "log", real_log)
    (run,) = runs_dir.iterdir()
    assert RunDir(run).read_summary()["failed"] == "RuntimeError: disk on fire"
    capsys.readouterr()
    assert main(["runs", "list", "--json", "--runs-dir", str(runs_dir)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "failed" and row["id"] == run.name
    assert main(["--quiet", "train", str(recipe), "--resume", "auto"]) == 0
    capsys.readouterr()
    assert main(["runs", "list", "--json", "--runs-dir", str(runs_dir)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "finished" and row["steps"] == 4
