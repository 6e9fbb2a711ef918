"""`daytune export`: a run's model as a folder that plain transformers (or PEFT) loads, for serving with anything.

--merge folds a LoRA/DoRA/IA3 adapter into the base (a QLoRA adapter into the weights it was trained on: the base
quantized to NF4 as in training, then dequantized) and writes HF safetensors + tokenizer, by default in the dtype
the weights came in (`--dtype auto`: the base's own, a QLoRA run's compute dtype), never inflated to fp32. Without --merge, PEFT adapters are copied as they are.
Prompt-learning adapters (prefix, prompt, ptuning, adapter) cannot be merged: they add tokens or attention paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from daytune.config import load_run_config
from daytune.errors import ConfigError, RunError
from daytune.fileio import replace_dir_atomic, temp_dir_beside
from daytune.models import load_for_inference, load_tokenizer, resolve_model
from daytune.models.trained import MERGEABLE
from daytune.track.runs import model_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype(cfg, trained: Path, base: Path) -> torch.dtype:
    """`--dtype auto`: what the weights came in. A QLoRA run: the dtype its 4-bit base computed in; otherwise the
    stored dtype of the model folder (a full run's model/, or the base), float32 when it says none."""
    from daytune.hardware import param_dtype
    from daytune.models.trained import trained_quantization

    quantized = trained_quantization(trained, trained.parent)
    if quantized is not None:
        return param_dtype(quantized.precision)
    folder = trained if (trained / "config.json").is_file() else base
    try:
        import json

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)


def export_run(
    run_dir: str | Path, out: str | Path, merge: bool = False, dtype: str = "auto", log=print
) -> Path:
    source = model_source(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(
            f"--out {out}: already exists and is not empty; choose a new folder (nothing is overwritten)"
        )
    if dtype not in DTYPES and dtype != "auto":
        raise ConfigError(f"--dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    cfg = load_run_config(source.run_dir / "config.yaml")
    trained = source.trained
    is_adapter = (trained / "adapter_config.json").is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        if is_adapter and not merge:
            shutil.copytree(trained, tmp, dirs_exist_ok=True)
        else:
            if is_adapter and cfg.train.method not in MERGEABLE:
                raise ConfigError(
                    f"--merge: method {cfg.train.method} adds virtual tokens or attention paths and cannot be folded "
                    "into the weights; export without --merge (a PEFT adapter) instead"
                )
            if dtype == "auto":
                torch_dtype = auto_dtype(cfg, trained, resolve_model(source.model, log=log))
            else:
                torch_dtype = DTYPES[dtype]
            model, tokenizer, _ = load_for_inference(source, merge=True, dtype=torch_dtype, log=log)
            model.save_pretrained(tmp, safe_serialization=True)
            if (trained / "tokenizer_config.json").is_file():  # the run saved its tokenizer: that one
                tokenizer = load_tokenizer(trained)
            tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
