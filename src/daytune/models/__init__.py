"""Model references -> local Hugging Face folders -> (model, tokenizer); the registry of named models."""

from daytune.models.load import list_models, load_model, load_tokenizer, resolve_model
from daytune.models.registry import MODELS

__all__ = ["MODELS", "list_models", "load_model", "load_tokenizer", "resolve_model"]
