"""Model references -> local Hugging Face folders -> (model, tokenizer); the registry of named models; a run's trained
model on top of its base."""

from daytune.models.load import list_models, load_model, load_tokenizer, resolve_model
from daytune.models.registry import MODELS
from daytune.models.trained import ModelSource, load_for_inference, load_trained

__all__ = [
    "MODELS",
    "ModelSource",
    "list_models",
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "load_trained",
    "resolve_model",
]
