"""HELM's prompts, perturbations and metrics, reproduced so that a local score is the score `helm-run` gives.

Ported from crfm-helm 0.5.16 (Apache-2.0, Stanford CRFM): the in-context example selection and prompt layout of its
`multiple_choice_joint` and `generation` adapters (`adapter.py`), the canonical robustness perturbation and the
gender-pronoun fairness perturbation (`perturbations.py`, with HELM's misspelling dictionary), and the exact-match
family, final-number match and calibration error (`metrics.py`). The scenarios that use them are in
`daytune.eval.scenarios.helm`; `tests/test_helm_agreement.py` checks prompts, completions and scores against
`helm-run` itself.
"""
