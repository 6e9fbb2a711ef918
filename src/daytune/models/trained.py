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

from daytune.config import QuantConfig, TrainConfig
from daytune.errors import ConfigError, ModelError, RunError
from daytune.models.load import load_model, load_tokenizer, resolve_model

if TYPE_CHECKING:
    import torch

MERGEABLE = ("lora", "dora", "qlora", "ia3")  # methods whose adapters fold into the weights
# Beside a qlora adapter (written by the training run): the 4-bit base it was trained on, so whoever loads the
# adapter (serve, export, eval, a submission image) merges it into those weights, not the full-precision ones.
QUANT_FILE = "quantization.json"


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
    """The base model as the method trains it: quantized to 4 bits for qlora, on `device` (cuda: the current
    CUDA device unless `device` names one)."""
    import torch
    from transformers import AutoModelForCausalLM

    if tc.method != "qlora":
        return load_model(model_dir, dtype=dtype)
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(
            f"train.method qlora: bitsandbytes has no 4-bit kernels for {device.type}; use method: lora"
        )
    if device.type == "cuda":
        where = device.index if device.index is not None else torch.cuda.current_device()
    else:
        where = str(device)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=_bnb_4bit(tc, dtype),
            dtype=dtype,
            device_map={"": where},
        )
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"train.method qlora: 4-bit loading failed on {device} ({type(e).__name__}: {str(e)[:200]}); "
            "this device probably lacks bitsandbytes 4-bit kernels: use method: lora (precision bf16-true if fast)"
        ) from None


def quantization_note(tc: TrainConfig, load_dtype: torch.dtype) -> dict:
    """What QUANT_FILE says: the 4-bit format and the dtype the base was loaded in before quantizing."""
    return {
        "method": "qlora",
        "quant_type": tc.quant.quant_type,
        "double_quant": tc.quant.double_quant,
        "load_dtype": str(load_dtype).removeprefix("torch."),
    }


def trained_quantization(trained: Path | None, run_dir: Path | None = None) -> TrainConfig | None:
    """The 4-bit setup a qlora adapter was trained on (a TrainConfig with method qlora), or None for any other
    artifact: from the adapter's QUANT_FILE, else from the config.yaml of the run it belongs to (runs saved
    before the file existed)."""
    import json

    if trained is None or not (trained / "adapter_config.json").is_file():
        return None
    note = trained / QUANT_FILE
    if note.is_file():
        try:
            q = json.loads(note.read_text(encoding="utf-8"))
            dtype = {"bfloat16": "bf16-true"}.get(q.get("load_dtype"), "32-true")
            return TrainConfig(
                method="qlora", quant=QuantConfig(q["quant_type"], bool(q["double_quant"])), precision=dtype
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{note}: unreadable ({type(e).__name__}: {e})") from None
    for folder in (run_dir, trained.parent):
        if folder is not None and (folder / "config.yaml").is_file():
            from daytune.config import load_run_config

            try:
                tc = load_run_config(folder / "config.yaml").train
            except Exception:  # not a daytune run's config: nothing to learn from it
                continue
            return tc if tc.method == "qlora" else None
    return None


def dequantized_base(base_dir: Path, quantized: TrainConfig, dtype, device) -> object:
    """The weights a qlora adapter was trained on, in `dtype`: the base quantized to NF4 exactly as training
    did (same format, from the same load dtype), then dequantized. Merging an adapter into these keeps what it
    learned; merging into the original full-precision weights shifts every layer by the quantization error."""
    import torch

    from daytune.hardware import param_dtype

    load_dtype = param_dtype(quantized.precision) if quantized.precision != "auto" else torch.bfloat16
    model = load_base_for_training(base_dir, quantized, load_dtype, torch.device(device))
    model.dequantize()  # transformers: every 4-bit linear layer back to a plain one
    return model.to(dtype)


def load_trained(
    base_dir: Path,
    artifact: Path,
    *,
    dtype=None,
    merge: bool = False,
    quantized: TrainConfig | None = None,
    dequantize: bool = False,
    device=None,
):
    """A run's trained model for inference: base + adapter (merged when asked and possible), or a full model.
    `quantized` (a qlora run's train config): the base is loaded in 4 bits, exactly as it was trained; merged
    (or with `dequantize`), those 4-bit weights are dequantized to `dtype` first (the same numbers, plain
    matmuls). `device`: where the weights are loaded (a GPU: straight onto it)."""
    if (artifact / "adapter_config.json").is_file():
        import torch
        from peft import PeftConfig, PeftModel

        if quantized is not None and not (merge or dequantize):
            where = torch.device(device or "cpu")
            model = load_base_for_training(base_dir, quantized, dtype or torch.float32, where)
        elif quantized is not None:
            model = dequantized_base(base_dir, quantized, dtype or torch.float32, device or "cpu")
        else:
            model = load_model(base_dir, dtype=dtype, device=device)
        try:
            peft_model = PeftModel.from_pretrained(model, str(artifact))
        except Exception as e:
            raise ModelError(f"cannot load adapter from {artifact}: {type(e).__name__}: {e}") from None
        peft_type = str(PeftConfig.from_pretrained(str(artifact)).peft_type).split(".")[-1].lower()
        if merge and peft_type in ("lora", "ia3"):
            return peft_model.merge_and_unload()
        return peft_model
    if (artifact / "config.json").is_file():
        return load_model(artifact, dtype=dtype, device=device)
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
    weights when `merge` and the method allows; a qlora adapter into its dequantized 4-bit base), on `device` in
    eval mode: (model, tokenizer, eos ids). `dtype` defaults to the device's inference dtype (bf16 on GPUs that
    have it, fp16 on older ones, fp32 on CPUs); on a GPU the weights are read straight onto it."""
    import torch

    from daytune.hardware import inference_dtype

    device = torch.device(device)
    dtype = dtype or inference_dtype(device)
    path = resolve_model(source.model, log=log)
    tokenizer = load_tokenizer(path)
    if source.trained:
        quantized = trained_quantization(source.trained, source.run_dir)
        if quantized is not None:
            log(f"{source.trained}: a qlora adapter, on its NF4 base dequantized to {dtype}")
        kwargs = {
            "dtype": dtype,
            "merge": merge,
            "quantized": quantized,
            "dequantize": True,
            "device": device,
        }
        model = load_trained(path, source.trained, **kwargs)
    else:
        model = load_model(path, dtype=dtype, device=device)
    model = model.to(device).eval()
    return model, tokenizer, eos_ids(model, tokenizer)
