"""HELM's reference metrics and calibration error, as crfm-helm 0.5.16 computes them (Apache-2.0 port).

Every score is the maximum over the correct references of metric(reference, prediction), where a joint
multiple-choice prediction is first mapped from its letter to the option's text (an unknown letter maps to
nothing and scores 0). Calibration is `ece_10_bin` (equal-mass bins) and `ece_1_bin` of the uncertainty-calibration
package HELM uses, on each instance's `max_prob` (the generated completion's probability) against exact match.
"""

from __future__ import annotations

import re
import string

import numpy as np


def normalize_text(text: str, remove_articles: bool = True) -> str:
    """Lower case, no punctuation, no articles, single spaces (HELM's, from the QuAC scorer)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    if remove_articles:
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(gold: str, pred: str | None) -> float:
    return 0 if not pred else float(gold.strip() == pred.strip())


def quasi_exact_match(gold: str, pred: str | None) -> float:
    return 0 if not pred else float(normalize_text(gold) == normalize_text(pred))


def prefix_exact_match(gold: str, pred: str | None) -> float:
    return 0 if not pred else float(pred.strip().startswith(gold.strip()))


def quasi_prefix_exact_match(gold: str, pred: str | None) -> float:
    return 0 if not pred else float(normalize_text(pred).startswith(normalize_text(gold)))


def exact_match_indicator(gold: str, pred: str | None, indicator: str = " ") -> float:
    if pred is None:
        return 0
    return exact_match(gold.split(indicator)[-1].strip(), pred.split(indicator)[-1].strip())


def final_number_exact_match(gold: str, pred: str | None) -> float:
    def final(x: str) -> str:
        found = re.findall(r"-?[\d,]+(?:.\d+)?", x)
        return found[-1].replace(",", "") if found else ""

    return 0 if pred is None else exact_match(final(gold), final(pred))


METRIC_FNS = {
    "exact_match": exact_match,
    "quasi_exact_match": quasi_exact_match,
    "prefix_exact_match": prefix_exact_match,
    "quasi_prefix_exact_match": quasi_prefix_exact_match,
    "exact_match_indicator": exact_match_indicator,
    "final_number_exact_match": final_number_exact_match,
}


def score(names: list[str], golds: list[str], pred: str | None) -> dict[str, float]:
    return {n: float(max(METRIC_FNS[n](g, pred) for g in golds)) for n in names}


def _equal_mass_bins(probs: np.ndarray, num_bins: int) -> list[float]:
    ordered = sorted(probs)
    num_bins = min(num_bins, len(ordered))
    parts = [list(p) for p in np.array_split(ordered, num_bins)]
    bins = [(parts[i][-1] + parts[i + 1][0]) / 2.0 for i in range(len(parts) - 1)] + [1.0]
    return sorted(set(bins))


def ece(probs: list[float], correct: list[int], num_bins: int = 10, equal_mass: bool = True) -> float:
    """The plug-in l1 calibration error over `num_bins` bins (uncertainty-calibration's get_ece_em/get_ece)."""
    p = np.array(probs, dtype=float)
    data = np.stack([p, np.array(correct, dtype=float)], axis=1)
    if equal_mass:
        bins = _equal_mass_bins(p, num_bins)
    else:
        bins = [i / num_bins for i in range(1, num_bins + 1)]
    idx = np.searchsorted(bins, data[:, 0])
    order = np.argsort(idx)
    splits = np.searchsorted(idx[order], list(range(1, len(bins))))
    total = 0.0
    for part in np.split(data[order], splits):
        if len(part):
            total += len(part) / len(data) * abs(np.mean(part[:, 0]) - np.mean(part[:, 1]))
    return float(total)
