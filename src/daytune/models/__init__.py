"""Model references -> local Hugging Face folders -> (model, tokenizer); the registry of named models."""

from daytune.models.load import list_models, load_model, load_tokenizer, resolve_model
from daytune.models.registry import KNOWN_MODELS, MODELS

__all__ = ["KNOWN_MODELS", "MODELS", "list_models", "load_model", "load_tokenizer", "resolve_model"]
