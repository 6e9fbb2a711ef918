"""LoRA dropout on a CPU (train/dropout.py): dropout's distribution and gradient, masks reproducible from PyTorch's
seed and its checkpointed generator state, and the loop's PEFT layers swapped without changing the adapter."""

import pytest
import torch
from test_train import new_run

from daytune.config import load_run_config
from daytune.pipeline import train_run
from daytune.train.dropout import CPUDropout, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_dropout_keeps_each_element_with_probability_1_minus_p(p):
    x = torch.ones(1000, 1000)
    y = CPUDropout(p).train()(x)
    kept = y != 0
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd  # 5 sigma: a broken mask fails, chance does not
    assert torch.all(y[kept] == 1 / (1 - p))  # scaled as nn.Dropout scales
    rows, cols = kept.float().mean(1), kept.float().mean(0)  # no stripes: each row and column near 1 - p
    assert (rows - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1000) ** 0.5
    assert (cols - (1 - p)).abs().max() < 6 * (p * (1 - p) / 1000) ** 0.5
    # neighbouring 16-bit draws come from one 64-bit word: they must not be correlated
    a, b = kept[:, 0::2].float().flatten(), kept[:, 1::2].float().flatten()
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 5 / (n / 2) ** 0.5


def test_cpu_dropout_gradient_dtype_and_modes():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 11, dtype=torch.bfloat16, requires_grad=True)
    drop = CPUDropout(0.3).train()
    y = drop(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.sum().backward()
    kept = y.detach() != 0
    expected = torch.where(
        kept, torch.tensor(1 / 0.7, dtype=torch.bfloat16), torch.tensor(0, dtype=torch.bfloat16)
    )
    assert torch.equal(x.grad, expected)  # d(dropout)/dx: the mask, scaled
    assert torch.equal(drop.eval()(x), x)  # eval: identity
    assert torch.equal(CPUDropout(0.0).train()(x), x)
    assert torch.all(CPUDropout(1.0).train()(x) == 0)  # nn.Dropout's own op at p = 1
    odd = CPUDropout(0.5).train()(torch.ones(5))  # fewer elements than one 64-bit word's four draws
    assert odd.shape == (5,) and set(odd.tolist()) <= {0.0, 2.0}


def test_masks_follow_torch_seed_and_generator_state():
    torch.manual_seed(7)
    first = keep_mask((64, 64), 0.1)
    state = torch.get_rng_state()  # what a checkpoint saves (train/checkpoint.py)
    second = keep_mask((64, 64), 0.1)
    assert not torch.equal(first, second)  # a new mask each call
    torch.manual_seed(7)
    assert torch.equal(keep_mask((64, 64), 0.1), first)
    torch.set_rng_state(state)  # a resumed run draws the masks the uninterrupted one drew
    assert torch.equal(keep_mask((64, 64), 0.1), second)


def test_the_loop_swaps_peft_lora_dropout_on_cpu_and_the_adapter_is_unchanged(
    tiny_recipe, tiny_model_dir, monkeypatch
):
    """Every PEFT LoRA layer gets CPUDropout with the configured p and the state dict keeps its keys (the adapter
    files are the same); a LoRA without dropout is left as PEFT built it; the loop swaps them on a CPU, two runs
    of one seed draw the same masks and the masks change the losses."""
    from peft import LoraConfig, get_peft_model

    from daytune.models import load_model

    model = get_peft_model(
        load_model(tiny_model_dir), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    )
    keys = list(model.state_dict())
    n_layers = sum(1 for m in model.modules() if hasattr(m, "lora_dropout"))
    assert use_cpu_dropout(model) == n_layers > 0
    assert list(model.state_dict()) == keys
    drops = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert all(type(d) is CPUDropout and d.p == 0.1 for d in drops)
    assert use_cpu_dropout(model) == 0  # already swapped
    plain = get_peft_model(
        load_model(tiny_model_dir), LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear")
    )
    assert use_cpu_dropout(plain) == 0  # PEFT's Identity stays

    import daytune.train.loop as loop

    swapped = []
    monkeypatch.setattr(loop, "use_cpu_dropout", lambda m: swapped.append(use_cpu_dropout(m)) or swapped[-1])
    losses = []
    for dropout in (0.1, 0.1, 0.0):
        cfg = load_run_config(tiny_recipe(train={"max_steps": 2, "lora": {"dropout": dropout}}))
        run = new_run(cfg)
        assert train_run(cfg, run).steps == 2
        losses.append([m["loss"] for m in run.read_metrics()])
    assert swapped[0] == swapped[1] > 0 and swapped[2] == 0  # one per adapted layer of the recipe's targets
    assert losses[0] == losses[1]  # same seed, same masks
    assert losses[0] != losses[2]  # the masks act
