"""Evaluation: held-out loss and multiple-choice accuracy by log-likelihood (deepened in the eval suite)."""

from daytune.eval.basic import evaluate, heldout_loss, multiple_choice_accuracy

__all__ = ["evaluate", "heldout_loss", "multiple_choice_accuracy"]
