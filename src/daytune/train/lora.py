"""LoRA through PEFT. The adapter is saved in PEFT's own format, so plain PEFT loads it."""

from __future__ import annotations

import torch

from daytune.config import LoraConfig
from daytune.errors import ConfigError


def linear_layer_names(model) -> list[str]:
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def add_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    available = linear_layer_names(model)
    missing = [t for t in cfg.targets if t not in available]
    if missing:
        raise ConfigError(
            f"train.lora.targets: {missing} not found in this model; its linear layers are {available}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(model, adapter_dir, *, merge: bool = False):
    """Attach a saved PEFT adapter to a base model; `merge=True` folds it into the weights (faster inference)."""
    from peft import PeftModel

    from daytune.errors import ModelError

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as e:
        raise ModelError(f"cannot load adapter from {adapter_dir}: {type(e).__name__}: {e}") from None
    return peft_model.merge_and_unload() if merge else peft_model
