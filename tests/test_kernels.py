"""train.kernels: when Liger's kernels are used, the fallback to PyTorch's where they cannot run (a CPU), and the
training loop's wiring (the model patched in place, the loss through the fused linear cross-entropy) checked with
a stand-in `liger_kernel` computed in PyTorch: Triton needs CUDA, which benchmarks/gpu_check.sh brings."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_train import new_run

from daytune.config import load_run_config
from daytune.errors import ConfigError
from daytune.pipeline import train_run
from daytune.train import kernels


def test_kernel_choice_and_fallbacks(monkeypatch, tiny_recipe):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.resolve_kernels("liger", cpu)[0] == "none"  # Triton kernels: CUDA only
    assert "PyTorch's kernels on cpu" in kernels.resolve_kernels("liger", cpu)[1]
    assert kernels.resolve_kernels("auto", cpu)[0] == kernels.resolve_kernels("none", cuda)[0] == "none"
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert kernels.resolve_kernels("auto", cuda)[0] == "none"
    with pytest.raises(ConfigError, match="liger-kernel is not installed"):
        kernels.resolve_kernels("liger", cuda)
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert kernels.resolve_kernels("auto", cuda)[0] == "liger"
    with pytest.raises(ConfigError, match=r"train\.kernels: 'fast' is not one of auto, liger, none"):
        load_run_config(tiny_recipe(train={"kernels": "fast"}))


@pytest.fixture
def stand_in_liger(monkeypatch):
    """`liger_kernel` as daytune calls it, computed in PyTorch: the Llama patch (RMSNorm modules re-bound to a
    counting forward, as Liger rebinds them) and the fused linear cross-entropy."""
    calls = {"apply": [], "norm": 0, "ce": 0}

    def apply_llama(model, **flags):
        calls["apply"].append((type(model).__name__, flags))
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                original = module.forward

                def forward(x, _original=original):
                    calls["norm"] += 1
                    return _original(x)

                module.forward = forward

    def fused(hidden, weight, target, reduction="mean"):
        calls["ce"] += 1
        return F.cross_entropy(F.linear(hidden, weight).float(), target, reduction=reduction)

    pkg, tr = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    mp = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fn = types.ModuleType("liger_kernel.transformers.functional")
    mp.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_llama}
    fn.liger_fused_linear_cross_entropy = fused
    pkg.transformers, tr.monkey_patch, tr.functional = tr, mp, fn
    for name, mod in [("liger_kernel", pkg), ("liger_kernel.transformers", tr),
                      ("liger_kernel.transformers.monkey_patch", mp), ("liger_kernel.transformers.functional", fn)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_liger_is_applied_to_the_model_and_the_loss(stand_in_liger, monkeypatch, tiny_recipe):
    """Same data, seed and steps: with the (stand-in) kernels the run patches the base model once with RoPE,
    RMSNorm and SwiGLU, computes every training loss through the fused cross-entropy, and its losses equal the
    eager run's; a model family Liger does not patch is an error under `liger`, eager under `auto`."""
    import daytune.train.loop as loop

    losses = {}
    for setting in ("none", "liger"):
        if setting == "liger":  # no CUDA here: resolve as a CUDA machine with Liger installed would
            monkeypatch.setattr(loop, "resolve_kernels", lambda s, d: ("liger", "stand-in"))
        cfg = load_run_config(
            tiny_recipe(data={"packing": True, "max_rows": 16}, train={"max_steps": 3, "kernels": setting})
        )
        run = new_run(cfg)
        assert train_run(cfg, run).kernels == setting
        losses[setting] = [m["loss"] for m in run.read_metrics()]
    assert len(losses["liger"]) == 3
    assert losses["liger"] == pytest.approx(losses["none"], abs=1e-5)
    ((model_class, flags),) = stand_in_liger["apply"]
    assert model_class == "LlamaForCausalLM"  # the base model under PEFT's wrapper
    assert flags["rope"] and flags["rms_norm"] and flags["swiglu"] and not flags["fused_linear_cross_entropy"]
    assert stand_in_liger["ce"] >= 3 and stand_in_liger["norm"] > 0

    class Other(torch.nn.Module):
        config = types.SimpleNamespace(model_type="gpt2")

    with pytest.raises(ConfigError, match="no kernels for model type 'gpt2'"):
        kernels.apply_liger(Other(), "liger")
    assert kernels.apply_liger(Other(), "auto") is False
