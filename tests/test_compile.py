"""train.compile: compiled decoder blocks train to the eager path's losses, save the same names, and keep the
steps that compile out of the budget's step times."""

import pytest
import torch
from test_train import new_run

from daytune.config import load_run_config
from daytune.errors import ConfigError
from daytune.pipeline import train_run
from daytune.train import compile as compile_module
from daytune.train.compile import COMPILE_MIN_BUDGET, wants_compile


def test_compile_choices_and_auto(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert wants_compile(True, cpu, None) and not wants_compile(False, cuda, 86400)
    assert wants_compile("auto", cuda, COMPILE_MIN_BUDGET)
    assert not wants_compile("auto", cuda, COMPILE_MIN_BUDGET - 1)  # compilation would not pay back
    assert not wants_compile("auto", cuda, None) and not wants_compile("auto", mps, 86400)
    monkeypatch.setattr(
        compile_module.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None
    )
    assert wants_compile("auto", cpu, 86400) and not wants_compile("auto", cpu, COMPILE_MIN_BUDGET - 1)
    monkeypatch.setattr(
        compile_module.shutil, "which", lambda name: None
    )  # inductor could not build its kernels
    assert not wants_compile("auto", cpu, 86400) and wants_compile("auto", cuda, 86400)


def test_compile_value_refused(tiny_recipe):
    with pytest.raises(ConfigError, match=r"train\.compile: 'yes' is not one of true, false, auto"):
        load_run_config(tiny_recipe(train={"compile": "yes"}))


def test_compiled_losses_equal_eager(tiny_recipe):
    """Same data, seed and steps, packed (rows of varying length: shapes change between steps): the losses of the
    compiled run equal the eager run's to 1e-4, and the adapters saved have the same tensors' names."""
    from safetensors.torch import load_file

    losses, saved = {}, {}
    for compiled in (False, True):
        cfg = load_run_config(
            tiny_recipe(
                data={"packing": True, "max_rows": 24, "val_fraction": 0.2},
                train={"max_steps": 3, "compile": compiled, "budget": "10m", "eval_every": 3},
                eval={},
            )
        )
        run = new_run(cfg)
        result = train_run(cfg, run)
        metrics = run.read_metrics()
        losses[compiled] = [m["loss"] for m in metrics] + [m["val_loss"] for m in metrics if "val_loss" in m]
        saved[compiled] = load_file(f"{result.output_dir}/adapter_model.safetensors")
        if compiled:  # the first step compiled: flagged in the metrics, not taken as a step time
            assert metrics[0].get("compiling") is True
    assert len(losses[True]) == len(losses[False]) == 4
    for a, b in zip(losses[True], losses[False]):
        assert a == pytest.approx(b, abs=1e-4)
    assert saved[True].keys() == saved[False].keys()
    for name, tensor in saved[False].items():
        torch.testing.assert_close(saved[True][name], tensor, atol=1e-4, rtol=1e-3)
