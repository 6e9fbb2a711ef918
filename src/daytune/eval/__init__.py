"""Evaluation: held-out loss and multiple-choice accuracy (`basic.py`), and the HELM-style suite: `lm.py`, `scenarios/`,
`metrics.py`, `perturbations.py`, `suites.py`, `report.py`, `harness.py` (see docs/eval.md)."""

from daytune.eval.basic import evaluate, heldout_loss, multiple_choice_accuracy

__all__ = ["evaluate", "heldout_loss", "multiple_choice_accuracy"]
