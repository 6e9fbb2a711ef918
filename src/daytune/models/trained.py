"""Trained models: what a run leaves behind (a PEFT adapter or a full model folder) on top of its base model, and
the one way eval, serve and export load it.

`ModelSource` is what to load: a base model reference, the trained folder on top of it (None: the base alone) and
the run folder it came from. Turning `--run RUN_ID` or `--model wandb:...` into one needs the run store and W&B,
which live above this package: `daytune.track.runs.model_source` does that and returns a `ModelSource`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daytune.config import TrainConfig
from daytune.errors import ConfigError, ModelError, RunError
from daytune.models.load import load_model, load_tokenizer, resolve_model

if TYPE_CHECKING:
    import torch

MERGEABLE = ("lora", "dora", "qlora", "ia3")  # methods whose adapters fold into the weights


@dataclass(frozen=True)
class ModelSource:
    """A base model reference, the trained folder on top of it (an adapter or a full model; None: the base
    alone), and the run folder it came from (None: given by --model)."""

    model: str
    trained: Path | None = None
    run_dir: Path | None = None

    @property
    def run_id(self) -> str | None:
        return self.run_dir.name if self.run_dir is not None else None

    @classmethod
    def of_run(cls, run_dir: Path, model: str, trained: Path) -> ModelSource:
        """A run's base model and final adapter/ or model/, which must exist by now."""
        if not trained.is_dir():
            raise RunError(f"{run_dir}: no adapter/ or model/ yet (the run has not saved a model)")
        return cls(model, trained, run_dir)

    @classmethod
    def of_model(cls, model: str, adapter: str | Path | None = None) -> ModelSource:
        """--model REF [--adapter DIR]: the adapter must be a PEFT adapter folder."""
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelError(f"--adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
        return cls(model, Path(adapter) if adapter else None)


def _bnb_4bit(tc: TrainConfig, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(
            "train.method qlora needs bitsandbytes: pip install 'daytune[quant]' (or use method: lora)"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=tc.quant.quant_type,
        bnb_4bit_use_double_quant=tc.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_for_training(model_dir: Path, tc: TrainConfig, dtype: torch.dtype, device: torch.device):
    """The base model as the method trains it: quantized to 4 bits for qlora."""
    from transformers import AutoModelForCausalLM

    if tc.method != "qlora":
        return load_model(model_dir, dtype=dtype)
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(
            f"train.method qlora: bitsandbytes has no 4-bit kernels for {device.type}; use method: lora"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=_bnb_4bit(tc, dtype),
            dtype=dtype,
            device_map={"": str(device) if device.type != "cuda" else device.index or 0},
        )
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"train.method qlora: 4-bit loading failed on {device} ({type(e).__name__}: {str(e)[:200]}); "
            "this device probably lacks bitsandbytes 4-bit kernels: use method: lora (precision bf16-true if fast)"
        ) from None


def load_trained(
    base_dir: Path, artifact: Path, *, dtype=None, merge: bool = False, quantized: TrainConfig | None = None
):
    """A run's trained model for inference: base + adapter (merged when asked and possible), or a full model.
    `quantized` (a qlora run's train config) loads the base in 4 bits, exactly as it was trained."""
    if (artifact / "adapter_config.json").is_file():
        import torch
        from peft import PeftConfig, PeftModel

        if quantized is not None and not merge:
            model = load_base_for_training(base_dir, quantized, dtype or torch.float32, torch.device("cpu"))
        else:
            model = load_model(base_dir, dtype=dtype)
        try:
            peft_model = PeftModel.from_pretrained(model, str(artifact))
        except Exception as e:
            raise ModelError(f"cannot load adapter from {artifact}: {type(e).__name__}: {e}") from None
        peft_type = str(PeftConfig.from_pretrained(str(artifact)).peft_type).split(".")[-1].lower()
        if merge and peft_type in ("lora", "ia3"):
            return peft_model.merge_and_unload()
        return peft_model
    if (artifact / "config.json").is_file():
        return load_model(artifact, dtype=dtype)
    raise ModelError(
        f"{artifact}: neither a PEFT adapter (adapter_config.json) nor a model folder (config.json)"
    )


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends a generation: the generation config's (one id or a list) and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_for_inference(
    source: ModelSource,
    device: str | torch.device = "cpu",
    *,
    merge: bool = False,
    dtype: torch.dtype | None = None,
    log=print,
) -> tuple[object, object, frozenset[int]]:
    """Resolve the base, load its tokenizer and the model (with the trained folder on top, merged into the
    weights when `merge` and the method allows; float32 unless `dtype`), on `device` in eval mode:
    (model, tokenizer, eos ids)."""
    path = resolve_model(source.model, log=log)
    tokenizer = load_tokenizer(path)
    if source.trained:
        model = load_trained(path, source.trained, dtype=dtype, merge=merge)
    else:
        model = load_model(path, dtype=dtype)
    model = model.to(device).eval()
    return model, tokenizer, eos_ids(model, tokenizer)
