"""Every fine-tuning method trains a tiny model, saves, reloads and gives the same outputs."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import new_run

from daytune.config import load_run_config
from daytune.errors import ConfigError
from daytune.models.trained import load_base_for_training, load_trained
from daytune.pipeline import train_run
from daytune.train import methods
from daytune.train.loop import find_resume_checkpoint

IDS = torch.tensor([[5, 77, 123, 9, 300, 41, 8, 17]])


def logits_of(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("lora", {"lora": {"targets": "all-linear"}}),
        ("dora", {}),
        ("qlora", {}),
        ("full", {}),
        ("freeze", {"freeze": {"top_k": 1}}),
        ("adapter", {"adapter": {"adapter_len": 4, "adapter_layers": 2}}),
        ("prefix", {"prompt": {"num_virtual_tokens": 4}}),
        ("prompt", {"prompt": {"num_virtual_tokens": 4, "init_text": "Solve the problem"}}),
        ("ptuning", {"prompt": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}}),
        ("ia3", {}),
    ],
)
def test_method_trains_saves_and_reloads(method, extra, tiny_recipe, tiny_model_dir):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = load_run_config(tiny_recipe(train={"method": method, "max_steps": 3, "lr": 1e-2, **extra}))
    run = new_run(cfg)
    result = train_run(cfg, run)
    assert result.steps == 3 and result.final_loss is not None
    out = run.path / methods.output_name(method)
    assert out == run.trained and out.is_dir()
    assert 0 < result.trainable_params <= result.total_params
    if method in ("full",):
        assert result.trainable_params == result.total_params
    elif method != "freeze":
        assert result.trainable_params < result.total_params / 2

    # the model as it was in memory at the end: base + method + the final checkpoint's trained weights
    quant = cfg.train if method == "qlora" else None
    base = load_base_for_training(tiny_model_dir, cfg.train, torch.float32, torch.device("cpu"))
    in_memory = methods.prepare_for_training(base, cfg.train, tiny_model_dir)
    weights = load_file(str(find_resume_checkpoint(run) / "weights.safetensors"))
    methods.load_trainable_state(in_memory, weights, "checkpoint")
    expected = logits_of(in_memory)

    reloaded = load_trained(tiny_model_dir, out, quantized=quant)
    got = logits_of(reloaded)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    from daytune.models import load_model

    base_logits = logits_of(load_model(tiny_model_dir))
    assert not torch.allclose(
        got[..., -IDS.shape[1] :, :], base_logits, atol=1e-4
    )  # training changed the model


def test_targets_shorthands(tiny_model):
    model, _ = tiny_model
    assert methods.resolve_targets(model, "attention", "t") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert methods.resolve_targets(model, ["all-linear"], "t") == "all-linear"
    with pytest.raises(ConfigError, match="t: \\['qkv'\\] not found.*q_proj"):
        methods.resolve_targets(model, ["qkv"], "t")


def test_qlora_without_4bit_kernels_says_what_to_use(tiny_recipe, tiny_model_dir):
    cfg = load_run_config(tiny_recipe(train={"method": "qlora"}))
    with pytest.raises(ConfigError, match="use method: lora"):
        load_base_for_training(tiny_model_dir, cfg.train, torch.float32, torch.device("mps"))


def test_freeze_trains_only_the_top_blocks(tiny_recipe, tiny_model_dir):
    cfg = load_run_config(tiny_recipe(train={"method": "freeze", "freeze": {"top_k": 1}}))
    from daytune.models import load_model

    model = methods.prepare_for_training(load_model(tiny_model_dir), cfg.train, tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
    with pytest.raises(ConfigError, match="top_k: the model has 2 blocks"):
        cfg.train.freeze.top_k = 5
        methods.prepare_for_training(load_model(tiny_model_dir), cfg.train, tiny_model_dir)


def test_8bit_optimizer_trains(tiny_recipe):
    pytest.importorskip("bitsandbytes")
    cfg = load_run_config(tiny_recipe(train={"optimizer": "adamw_8bit", "max_steps": 2}))
    run = new_run(cfg)
    result = train_run(cfg, run)
    assert result.steps == 2 and result.final_loss == result.final_loss  # finite


def test_gradient_checkpointing_gives_the_same_update(tiny_recipe):
    weights = []
    for gc in (False, True):
        cfg = load_run_config(tiny_recipe(train={"gradient_checkpointing": gc, "max_steps": 1}))
        run = new_run(cfg)
        train_run(cfg, run)
        weights.append(load_file(str(find_resume_checkpoint(run) / "weights.safetensors")))
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
