"""Model references -> local Hugging Face folders -> (model, tokenizer); a run's trained model on top of its base."""

from daytune.models.load import load_model, load_tokenizer, resolve_model
from daytune.models.registry import KNOWN_MODELS
from daytune.models.trained import ModelSource, load_for_inference, load_trained

__all__ = [
    "KNOWN_MODELS",
    "ModelSource",
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "load_trained",
    "resolve_model",
]
