"""daytune: one LLM, one GPU, one day: from open data to a fine-tuned, evaluated, servable model."""

__version__ = "0.1.0"
