"""The training loop on a tiny model: saved adapters reload, accumulation is exact, resume is exact, the budget
and signals always end with a saved model."""

import math
import os
import signal

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


def test_budget_stops_in_time_and_saves(tiny_recipe):
    cfg = load_run_config(tiny_recipe(train={"max_steps": 100_000, "budget": "6s", "checkpoint_every": 1000}))
    run = new_run(cfg)
    result = train_run(cfg, run)
    assert result.stopped_by == "budget" and 0 < result.steps < 100_000
    assert result.elapsed_seconds <= 6.0 * 1.01
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert list_checkpoints(run.checkpoints)[-1].name == f"step-{result.steps:07d}"
    lrs = [m["lr"] for m in run.read_metrics()]
    # the schedule's horizon is the deadline, not step 100000: the cosine has decayed and aims at the last step
    horizon = run.read_metrics()[-1]["total_steps"]
    assert horizon < 1000 and lrs[-1] < 0.9e-3


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
    """Micro-batches that turn slow mid-run: the loop drops the unfinished step instead of overrunning."""
    import time as _time

    import daytune.train.loop as loop

    real = loop.response_loss

    def slow_when_training(model, batch):
        if torch.is_grad_enabled():
            _time.sleep(0.5)
        return real(model, batch)

    monkeypatch.setattr(loop, "response_loss", slow_when_training)
    cfg = load_run_config(tiny_recipe(train={"max_steps": 10, "grad_accum": 40, "budget": "15s"}))
    run = new_run(cfg)
    result = train_run(cfg, run)
    assert result.stopped_by == "budget" and result.steps == 0  # a step needs 20 s: none could finish
    assert result.elapsed_seconds <= 15.0 * 1.01
    assert (run.adapter / "adapter_model.safetensors").is_file()


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
