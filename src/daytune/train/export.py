"""`daytune export`: a run's model as a folder that plain transformers (or PEFT) loads, for serving with anything,
or (--format gguf, export_gguf.py) as one GGUF file for llama.cpp, Ollama and LM Studio.

--merge folds a LoRA/DoRA/IA3 adapter into the base (a QLoRA adapter into the weights it was trained on: the base
quantized to NF4 as in training, then dequantized) and writes HF safetensors + tokenizer, by default in the dtype
the weights came in (`--dtype auto`: the base's own, a QLoRA run's compute dtype), never inflated to fp32. Without --merge, PEFT adapters are copied as they are.
Prompt-learning adapters (prefix, prompt, ptuning, adapter) cannot be merged: they add tokens or attention paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from daytune.errors import ConfigError, RunError
from daytune.fileio import replace_dir_atomic, temp_dir_beside
from daytune.models import ModelSource, load_for_inference, load_tokenizer, resolve_model
from daytune.track.runs import model_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("hf", "gguf")
MERGES = ("LORA", "IA3")  # PEFT types whose adapters fold into the weights (DoRA and QLoRA are LORA)


def _peft_type(source: ModelSource) -> str | None:
    """The adapter's PEFT type (LORA, IA3, PROMPT_TUNING, ...), or None when the source is a full model."""
    config = source.trained / "adapter_config.json" if source.trained else None
    if config is None or not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("peft_type", "")).upper()
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config}: not a readable adapter config ({e})") from None


def auto_dtype(trained: Path | None, base: Path) -> torch.dtype:
    """`--dtype auto`: what the weights came in. A QLoRA run: the dtype its 4-bit base computed in; otherwise the
    stored dtype of the model folder (a full run's model/, or the base), float32 when it says none."""
    from daytune.hardware import param_dtype
    from daytune.models.trained import trained_quantization

    quantized = trained_quantization(trained, trained.parent) if trained else None
    if quantized is not None:
        return param_dtype(quantized.precision)
    folder = trained if trained and (trained / "config.json").is_file() else base
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)


def export_run(
    run_dir: str | Path | None,
    out: str | Path,
    merge: bool = False,
    dtype: str = "auto",
    log=print,
    *,
    model: str | None = None,
    adapter: str | Path | None = None,
    format: str = "hf",
    quant: str = "q8_0",
) -> Path:
    """Export a run (or --model REF [--adapter DIR]) to `out`; returns the folder, or the GGUF file in it."""
    source = model_source(run_dir, model, adapter, log=log)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(
            f"--out {out}: already exists and is not empty; choose a new folder (nothing is overwritten)"
        )
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES and dtype != "auto":
        raise ConfigError(f"--dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    peft_type = _peft_type(source)
    if peft_type is not None and peft_type not in MERGES and (merge or format == "gguf"):
        raise ConfigError(
            f"{'--format gguf' if format == 'gguf' else '--merge'}: the adapter in {source.trained} is "
            f"{peft_type.lower()}, which adds virtual tokens or attention paths and cannot be folded into the "
            "weights; export it as a PEFT adapter instead (without --merge and --format gguf)"
        )
    if format == "gguf":
        from daytune.train.export_gguf import export_gguf

        return export_gguf(source, out, quant, log=log)
    trained = source.trained
    is_adapter = peft_type is not None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        if is_adapter and not merge:
            shutil.copytree(trained, tmp, dirs_exist_ok=True)
        else:
            if dtype == "auto":
                torch_dtype = auto_dtype(trained, resolve_model(source.model, log=log))
            else:
                torch_dtype = DTYPES[dtype]
            model, tokenizer, _ = load_for_inference(source, merge=True, dtype=torch_dtype, log=log)
            model.save_pretrained(tmp, safe_serialization=True)
            if trained and (trained / "tokenizer_config.json").is_file():
                tokenizer = load_tokenizer(trained)  # the run saved its tokenizer: that one
            tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
