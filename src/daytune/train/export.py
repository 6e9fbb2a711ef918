"""`daytune export`: a run's model as a folder that plain transformers (or PEFT) loads, for serving with anything.

--merge folds a LoRA/DoRA/QLoRA/IA3 adapter into a full-precision copy of the base (QLoRA: the unquantized base,
as is standard) and writes HF safetensors + tokenizer. Without --merge, PEFT adapters are copied as they are.
Prompt-learning adapters (prefix, prompt, ptuning, adapter) cannot be merged: they add tokens or attention paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from daytune.config import load_run_config
from daytune.errors import ConfigError, RunError
from daytune.fileio import replace_dir_atomic, temp_dir_beside
from daytune.models import load_for_inference, load_tokenizer
from daytune.models.trained import MERGEABLE
from daytune.track.runs import model_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_run(
    run_dir: str | Path, out: str | Path, merge: bool = False, dtype: str = "float32", log=print
) -> Path:
    source = model_source(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(
            f"--out {out}: already exists and is not empty; choose a new folder (nothing is overwritten)"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
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
            model, tokenizer, _ = load_for_inference(source, merge=True, dtype=DTYPES[dtype], log=log)
            model.save_pretrained(tmp, safe_serialization=True)
            if (trained / "tokenizer_config.json").is_file():  # the run saved its tokenizer: that one
                tokenizer = load_tokenizer(trained)
            tokenizer.save_pretrained(tmp)
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
