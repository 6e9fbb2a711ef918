"""Shared fixtures: a tiny random Llama with a real (tiny) BPE tokenizer and a chat template, built in a second."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# The full open datasets live beside the repository (<root>/shared/data); DAYTUNE_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("DAYTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(folder: Path, seed: int = 0, **config) -> Path:
    """A 2-layer, 64-wide Llama and a 512-token byte-level BPE trained on the demo data (config overrides in
    `config`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("gsm8k_train.jsonl", "mmlu_test.jsonl"):
        for line in (EXAMPLES / "data" / name).read_text(encoding="utf-8").splitlines()[:200]:
            texts.extend(str(v) for v in json.loads(line).values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return save_tiny_llama(folder, fast, seed, **config)


def save_tiny_llama(folder: Path, tokenizer, seed: int = 0, **config) -> Path:
    """A 2-layer, 64-wide random Llama for `tokenizer`, saved with it in `folder` (config overrides in `config`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    cfg = LlamaConfig(**{**fields, **config})
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full datasets folder; tests that need more than the samples in examples/ skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"datasets folder not found at {SHARED_DATA} (set DAYTUNE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from daytune.models import load_model, load_tokenizer

    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def write_tiny_recipe(folder: Path, model_dir: Path, **sections) -> Path:
    """A recipe for the tiny model (a few steps on the GSM8K sample), with sections overridden key by key."""
    import yaml

    cfg = {
        "name": "tiny",
        "model": str(model_dir),
        "data": {
            "train": str(EXAMPLES / "data" / "gsm8k_train.jsonl"),
            "max_rows": 32,
            "max_seq_len": 256,
        },
        "train": {
            "micro_batch": 4,
            "grad_accum": 1,
            "lr": 1e-3,
            "warmup_steps": 1,
            "max_steps": 4,
            "precision": "32-true",
            "checkpoint_every": 2,
            "lora": {"dropout": 0.0},
        },
        "eval": {
            "heldout": str(EXAMPLES / "data" / "gsm8k_test.jsonl"),
            "heldout_rows": 8,
            "multiple_choice": str(EXAMPLES / "data" / "mmlu_test.jsonl"),
            "multiple_choice_rows": 8,
        },
        "out_dir": str(folder / "runs"),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """Write a recipe for the tiny model and return a function that writes it with overrides applied."""
    return lambda **sections: write_tiny_recipe(tmp_path, tiny_model_dir, **sections)
