"""HELM's perturbations, as crfm-helm 0.5.16 applies them (Apache-2.0; a port, not an approximation).

- robustness: `mild_mix` — lowercase, contractions, misspellings (probability 0.1 per word found in HELM's
  dictionary of common misspellings, `correct_to_misspelling.json`, from Wikipedia's list for machines), then 1-3
  spaces in place of each run of spaces; the references are left alone.
- fairness: gender pronouns, male -> female with probability 1 (the references too). HELM's canonical fairness
  also applies its dialect (SAE -> AAVE) and person-name perturbations, whose word lists HELM downloads at run
  time; they are not reproduced here (daytune works offline), so `fairness` is the gender-pronoun part of it.

Each copy is seeded by HELM's instance id (`Random(instance.id)`), and a copy whose input did not change is
dropped, as HELM's data augmenter drops it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from random import Random

from daytune.eval.helm.adapter import HelmInstance, Reference

CONTRACTION_MAP = {
    "ain't": "is not", "aren't": "are not", "can't": "cannot", "can't've": "cannot have", "could've": "could have",
    "couldn't": "could not", "didn't": "did not", "doesn't": "does not", "don't": "do not", "hadn't": "had not",
    "hasn't": "has not", "haven't": "have not", "he'd": "he would", "he'd've": "he would have", "he'll": "he will",
    "he's": "he is", "how'd": "how did", "how'd'y": "how do you", "how'll": "how will", "how's": "how is",
    "I'd": "I would", "I'll": "I will", "I'm": "I am", "I've": "I have", "i'd": "i would", "i'll": "i will",
    "i'm": "i am", "i've": "i have", "isn't": "is not", "it'd": "it would", "it'll": "it will", "it's": "it is",
    "ma'am": "madam", "might've": "might have", "mightn't": "might not", "must've": "must have",
    "mustn't": "must not", "needn't": "need not", "oughtn't": "ought not", "shan't": "shall not",
    "she'd": "she would", "she'll": "she will", "she's": "she is", "should've": "should have",
    "shouldn't": "should not", "that'd": "that would", "that's": "that is", "there'd": "there would",
    "there's": "there is", "they'd": "they would", "they'll": "they will", "they're": "they are",
    "they've": "they have", "wasn't": "was not", "we'd": "we would", "we'll": "we will", "we're": "we are",
    "we've": "we have", "weren't": "were not", "what're": "what are", "what's": "what is", "when's": "when is",
    "where'd": "where did", "where's": "where is", "where've": "where have", "who'll": "who will",
    "who's": "who is", "who've": "who have", "why's": "why is", "won't": "will not", "would've": "would have",
    "wouldn't": "would not", "you'd": "you would", "you'd've": "you would have", "you'll": "you will",
    "you're": "you are", "you've": "you have",
}  # fmt: skip
_REVERSE_CONTRACTIONS = {v: k for k, v in CONTRACTION_MAP.items()}
_CONTRACT = re.compile(r"\b({})\b ".format("|".join(_REVERSE_CONTRACTIONS)), flags=re.IGNORECASE | re.DOTALL)
GENDER_PRONOUNS = [  # (neutral, female, male)
    ("they", "she", "he"),
    ("them", "her", "him"),
    ("their", "her", "his"),
    ("theirs", "hers", "his"),
    ("themselves", "herself", "himself"),
]


def match_case(source: str, target: str) -> str:
    """`target` in the case of `source` (HELM's helm.common.general.match_case)."""
    if all(c.islower() for c in source):
        return target.lower()
    if all(c.isupper() for c in source):
        return target.upper()
    if source and source[0].isupper():
        return target.capitalize()
    return target


@lru_cache(maxsize=1)
def _misspellings() -> tuple[dict[str, list[str]], re.Pattern]:
    table = json.loads((Path(__file__).parent / "correct_to_misspelling.json").read_text(encoding="utf-8"))
    return table, re.compile(r"\b({})\b".format("|".join(table)))


def contract(text: str) -> str:
    def sub(m: re.Match) -> str:
        word = m.group(1)
        contracted = _REVERSE_CONTRACTIONS.get(word, _REVERSE_CONTRACTIONS.get(word.lower()))
        return match_case(word, contracted) + " "

    return _CONTRACT.sub(sub, text)


def misspell(text: str, rng: Random, prob: float = 0.1) -> str:
    table, pattern = _misspellings()

    def sub(m: re.Match) -> str:
        word = m.group(1)
        if rng.random() < prob:
            return match_case(word, str(rng.choice(table[word])))
        return word

    return pattern.sub(sub, text)


def mild_mix(text: str, rng: Random) -> str:
    text = contract(text.lower())
    text = misspell(text, rng)
    return re.sub(r" +", lambda m: " " * rng.randint(1, 3), text)


def gender_pronouns(text: str, rng: Random, prob: float = 1.0) -> str:
    for _, female, male in GENDER_PRONOUNS:

        def sub(m: re.Match, female=female) -> str:
            whole, word = m.group(0), m.group(1)
            if rng.uniform(0, 1) < prob:
                whole = whole.replace(word, match_case(word, female))
            return whole

        text = re.sub(f"[^\\w]({male})[^\\w]", sub, text, flags=re.IGNORECASE)
    return text


# name -> (function, perturbs the references too, robustness, fairness)
PERTURBATIONS = {
    "mild_mix": (mild_mix, False, True, False),
    "gender": (gender_pronouns, True, False, True),
}
GROUPS = {"robustness": ["mild_mix"], "fairness": ["gender"]}


def perturb(inst: HelmInstance, name: str) -> HelmInstance:
    """One perturbed copy of an instance (same id), as HELM's TextPerturbation.apply makes it."""
    fn, references_too, robustness, fairness = PERTURBATIONS[name]
    rng = Random(inst.id)
    refs = inst.references
    if references_too:  # HELM perturbs the references first, with the same generator
        refs = tuple(Reference(fn(r.text, rng), r.correct) for r in refs)
    return replace(
        inst,
        input=fn(inst.input, rng),
        references=refs,
        perturbation=name,
        robustness=robustness,
        fairness=fairness,
    )


def augment(instances: list[HelmInstance], groups: list[str]) -> list[HelmInstance]:
    """Each evaluation instance, then its perturbed copies whose input changed (HELM's DataAugmenter with
    include_original and skip_unchanged)."""
    names = [n for g in groups for n in GROUPS[g]]
    out = []
    for inst in instances:
        out.append(inst)
        for name in names:
            copy = perturb(inst, name)
            if copy.input != inst.input:
                out.append(copy)
    return out
