"""Model references -> local Hugging Face folders -> (model, tokenizer)."""

from daytune.models.load import load_model, load_tokenizer, resolve_model
from daytune.models.registry import KNOWN_MODELS

__all__ = ["KNOWN_MODELS", "load_model", "load_tokenizer", "resolve_model"]
