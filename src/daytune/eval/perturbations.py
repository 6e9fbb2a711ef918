"""Input perturbations for HELM's robustness and fairness metrics.

HELM scores each instance on its original text and on perturbed copies, and reports the worst score per instance
("worst case across perturbations"). Robustness uses HELM's canonical `mild_mix` (lowercase, contractions, typos
with probability 0.1 per word, 1-3 spaces between words; the question is perturbed, the answer options are not);
fairness uses dialect (Standard American English -> African American English), gender (male -> female terms) and
person-name (first names associated with white Americans -> with Black Americans, gender kept) substitutions, which
also apply to the options. Each perturbation is seeded by the instance id, so a rerun perturbs identically.

The word lists are short, hand-written versions of HELM's (HELM downloads its dialect mapping and misspelling
dictionary at run time; daytune works offline): typos are keyboard slips rather than a dictionary of common
misspellings, and the dialect lexicon covers frequent spellings only. Scores are comparable between daytune runs,
not digit for digit with HELM's.
"""

from __future__ import annotations

import re
import zlib
from random import Random

# -- robustness ---------------------------------------------------------------------------------------------------

CONTRACTIONS = {
    "are not": "aren't", "can not": "can't", "cannot": "can't", "could not": "couldn't", "did not": "didn't",
    "does not": "doesn't", "do not": "don't", "had not": "hadn't", "has not": "hasn't", "have not": "haven't",
    "he is": "he's", "he will": "he'll", "how is": "how's", "I am": "I'm", "I have": "I've", "I will": "I'll",
    "is not": "isn't", "it is": "it's", "it will": "it'll", "let us": "let's", "she is": "she's",
    "she will": "she'll", "should not": "shouldn't", "that is": "that's", "there is": "there's",
    "they are": "they're", "they have": "they've", "they will": "they'll", "we are": "we're", "we have": "we've",
    "was not": "wasn't", "were not": "weren't", "what is": "what's", "where is": "where's", "who is": "who's",
    "will not": "won't", "would not": "wouldn't", "you are": "you're", "you have": "you've", "you will": "you'll",
}  # fmt: skip
_CONTRACT = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, CONTRACTIONS), key=len, reverse=True)) + r")\b", re.I
)

KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS: dict[str, str] = {}
for r, row in enumerate(KEYBOARD):
    for c, ch in enumerate(row):
        near = [row[c - 1] if c > 0 else "", row[c + 1] if c + 1 < len(row) else ""]
        for rr in (r - 1, r + 1):
            if 0 <= rr < len(KEYBOARD) and c < len(KEYBOARD[rr]):
                near.append(KEYBOARD[rr][c])
        _NEIGHBOURS[ch] = "".join(near)


def lowercase(text: str, rng: Random) -> str:
    return text.lower()


def contractions(text: str, rng: Random) -> str:
    def sub(m: re.Match) -> str:
        out = CONTRACTIONS.get(m.group(0)) or CONTRACTIONS.get(m.group(0).lower(), m.group(0))
        return out[0].upper() + out[1:] if m.group(0)[0].isupper() else out

    return _CONTRACT.sub(sub, text)


def _typo(word: str, rng: Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.choice(("swap", "neighbour", "drop", "double"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop":
        return word[:i] + word[i + 1 :]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    ch = word[i].lower()
    if ch not in _NEIGHBOURS:
        return word
    return word[:i] + rng.choice(_NEIGHBOURS[ch]) + word[i + 1 :]


def typos(text: str, rng: Random, prob: float = 0.1) -> str:
    return re.sub(
        r"[A-Za-z]{3,}", lambda m: _typo(m.group(0), rng) if rng.random() < prob else m.group(0), text
    )


def extra_spaces(text: str, rng: Random, max_spaces: int = 3) -> str:
    return re.sub(r" +", lambda m: " " * rng.randint(1, max_spaces), text)


def mild_mix(text: str, rng: Random) -> str:
    """HELM's canonical robustness perturbation, in its order: lowercase, contractions, typos, spaces."""
    for step in (lowercase, contractions, typos, extra_spaces):
        text = step(text, rng)
    return text


# -- fairness -----------------------------------------------------------------------------------------------------

GENDER_TERMS = {
    "he": "she", "him": "her", "his": "her", "himself": "herself", "man": "woman", "men": "women", "boy": "girl",
    "boys": "girls", "father": "mother", "fathers": "mothers", "dad": "mom", "son": "daughter",
    "sons": "daughters", "brother": "sister", "brothers": "sisters", "husband": "wife", "husbands": "wives",
    "king": "queen", "kings": "queens", "mr": "ms", "gentleman": "lady", "gentlemen": "ladies", "uncle": "aunt",
    "uncles": "aunts", "nephew": "niece", "nephews": "nieces", "grandfather": "grandmother",
    "grandson": "granddaughter", "male": "female", "males": "females", "boyfriend": "girlfriend",
    "sir": "madam", "prince": "princess", "actor": "actress", "waiter": "waitress", "guy": "gal",
}  # fmt: skip

# First names from Bertrand & Mullainathan (2004), as used by HELM's person-name perturbation.
NAMES = {
    (
        "white",
        "male",
    ): "Brad Brendan Geoffrey Greg Brett Jay Matthew Neil Todd Adam Chip Frank Harry Jack John "
    "Josh Ken Paul Peter Roger Steven",
    (
        "white",
        "female",
    ): "Allison Anne Carrie Emily Jill Laurie Kristen Meredith Sarah Amanda Betsy Courtney Heather "
    "Katie Melanie Nancy Rachel Kate Megan Colleen Ellen",
    (
        "black",
        "male",
    ): "Darnell Hakim Jermaine Kareem Jamal Leroy Rasheed Tremayne Tyrone Alonzo Alphonse Jerome "
    "Lamar Lionel Marcellus Terrence Theo Torrance Wardell Deion Lamont",
    (
        "black",
        "female",
    ): "Aisha Ebony Keisha Kenya Latonya Lakisha Latoya Tamika Tanisha Nichelle Shereen Tia "
    "Yolanda Yvette Malika Shanice Shaniqua Jasmine Ayanna Imani Precious",
}

# Frequent Standard American English -> African American English spellings (a small subset of HELM's mapping).
DIALECT = {
    "about": "bout", "brother": "brotha", "brothers": "brothas", "sister": "sista", "because": "cuz",
    "going": "goin", "doing": "doin", "nothing": "nothin", "something": "somethin", "anything": "anythin",
    "everything": "everythin", "talking": "talkin", "getting": "gettin", "coming": "comin", "trying": "tryin",
    "saying": "sayin", "looking": "lookin", "thinking": "thinkin", "working": "workin", "making": "makin",
    "the": "da", "this": "dis", "that": "dat", "these": "dese", "those": "dem", "them": "dem", "they": "dey",
    "their": "dey", "there": "dere", "with": "wit", "mother": "mama", "your": "yo", "you all": "y'all",
    "isn't": "ain't", "aren't": "ain't", "going to": "gonna", "want to": "wanna", "got to": "gotta",
    "probably": "prolly", "little": "lil", "really": "real", "before": "fore", "think": "thank",
}  # fmt: skip


def _case_like(src: str, out: str) -> str:
    if src.isupper() and len(src) > 1:
        return out.upper()
    if src[0].isupper():
        return out[0].upper() + out[1:]
    return out


def _word_map(table: dict[str, str]):
    pattern = re.compile(
        r"\b(" + "|".join(sorted(map(re.escape, table), key=len, reverse=True)) + r")\b", re.I
    )

    def apply(text: str, rng: Random) -> str:
        return pattern.sub(lambda m: _case_like(m.group(0), table[m.group(0).lower()]), text)

    return apply


gender = _word_map(GENDER_TERMS)
dialect = _word_map(DIALECT)
_SOURCE_NAMES = {n: g for (race, g), names in NAMES.items() if race == "white" for n in names.split()}
_NAME_RE = re.compile(r"\b(" + "|".join(_SOURCE_NAMES) + r")\b")


def person_name(text: str, rng: Random, mapping: dict[str, str] | None = None) -> str:
    """Each source name maps to one target name of the same gender, the same everywhere in an instance."""
    mapping = {} if mapping is None else mapping

    def sub(m: re.Match) -> str:
        name = m.group(0)
        if name not in mapping:
            mapping[name] = rng.choice(NAMES[("black", _SOURCE_NAMES[name])].split())
        return mapping[name]

    return _NAME_RE.sub(sub, text)


# name -> (function, perturbs the answer options too, kind)
PERTURBATIONS = {
    "mild_mix": (mild_mix, False, "robustness"),
    "dialect": (dialect, True, "fairness"),
    "gender": (gender, True, "fairness"),
    "person_name": (person_name, True, "fairness"),
}
GROUPS = {"robustness": ["mild_mix"], "fairness": ["dialect", "gender", "person_name"]}


def seeded_rng(instance_id: str, perturbation: str) -> Random:
    return Random(zlib.crc32(f"{perturbation}:{instance_id}".encode()))


def perturb(name: str, instance_id: str, text: str, options: list[str]) -> tuple[str, list[str]]:
    """Perturb an instance's input (and its options where the perturbation says so), deterministically."""
    fn, with_options, _ = PERTURBATIONS[name]
    rng = seeded_rng(instance_id, name)
    if fn is person_name:
        mapping: dict[str, str] = {}
        new_text = person_name(text, rng, mapping)
        return new_text, [person_name(o, rng, mapping) for o in options] if with_options else list(options)
    return fn(text, rng), [fn(o, rng) for o in options] if with_options else list(options)
