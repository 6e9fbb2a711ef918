"""Dedup and decontamination: the fast paths agree with the straightforward ones, and with datasketch."""

import numpy as np
from datasketch import MinHash

from daytune.data.decontam import EvalIndex, naive_contaminated, naive_index
from daytune.data.dedup import SCHEME, MinHasher, exact_duplicates, naive_near_duplicates, near_duplicates
from daytune.data.ngrams import WordValues, ngram_hashes, whole_hash, words

EVAL = [
    (
        "gsm8k/1",
        "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins.",
    ),
    ("mmlu/2", "Which planet is known as the red planet in our solar system?"),  # 12 words: matched whole
    ("mmlu/3", "What is two plus two?"),  # 5 words: too short to match
]


def test_ngram_hashes_stay_inside_documents():
    values, offsets = WordValues().encode([["a", "b", "c"], ["d", "e"]])
    h, doc, pos = ngram_hashes(values, offsets, [2])[2]
    assert doc.tolist() == [0, 0, 1] and pos.tolist() == [0, 1, 3]
    assert int(h[2]) == whole_hash(values[3:5])


def test_decontamination_finds_13_grams_and_whole_short_items():
    index = EvalIndex(n=13, min_ngram=8)
    index.add("evals", EVAL)
    train = [
        "Q: janets ducks lay 16 eggs per day; she eats THREE for breakfast every morning. How many are left?",
        "Trivia: which planet is known as the red planet in our solar system? Mars.",
        "What is two plus two? Four.",
        "Ducks lay eggs. Planets orbit stars.",
    ]
    matches = index.check(train)
    assert [m.row for m in matches] == [0, 1]
    assert matches[0].eval_item == "gsm8k/1" and matches[0].ngram.startswith("ducks lay 16 eggs")
    assert matches[1].eval_item == "mmlu/2" and len(matches[1].ngram.split()) == 12
    # the naive reference agrees on 13-gram matches
    assert naive_contaminated(train, naive_index([t for _, t in EVAL])) == [0]
    strict = EvalIndex(n=13, min_ngram=13)
    strict.add("evals", EVAL)
    assert [m.row for m in strict.check(train)] == [0]


def test_minhash_signatures_equal_datasketch():
    hasher = MinHasher(num_perm=64, shingle=3, seed=7)
    texts = ["the quick brown fox jumps over the lazy dog", "two words", "", "one"]
    sig = hasher.signatures(texts)
    hv, offsets = hasher.shingle_hashes(texts)
    for i in range(len(texts)):
        m = MinHash(num_perm=64, seed=7, hashfunc=lambda x: x, scheme=SCHEME)
        part = hv[offsets[i] : offsets[i + 1]]
        if len(part):
            m.update_batch([int(x) for x in part])
        assert np.array_equal(m.hashvalues, sig[i]), i


def test_exact_and_near_duplicates_keep_the_first():
    base = "the committee approved the new budget for the city library after a long debate on monday evening"
    texts = [
        base,
        "The committee approved the NEW budget, for the city library after a long debate on Monday evening!",
        base.replace("monday", "tuesday"),
        "a completely different sentence about rivers and deltas and floods and silt in the plains",
    ]
    assert exact_duplicates(texts) == {1: 0}
    near = near_duplicates(texts, threshold=0.7)
    assert set(near) == {1, 2} and near[2][0] == 0 and 0.7 <= near[2][1] <= 1
    assert set(naive_near_duplicates(texts, threshold=0.7)) == {1, 2}
    assert words("Don't stop") == ["don", "t", "stop"]


def test_every_evaluation_set_reads_from_both_layouts(shared_data):
    """The data stage decontaminates against the sets the suites score: the shipped samples (the quick suite's
    layout) and the full datasets folder. TruthfulQA comes as the CSV or as the multiple-choice JSON."""
    from conftest import EXAMPLES

    from daytune.data.evalsets import EVAL_SETS, find_files, read_eval_set

    samples = EXAMPLES / "data" / "eval"
    for name in ("mmlu", "gsm8k", "truthfulqa", "bbq", "openbookqa", "wikitext2"):
        items = read_eval_set(name, find_files(samples, EVAL_SETS[name]))
        assert items and all(text.strip() for _, text in items), name
    tqa = read_eval_set("truthfulqa", find_files(samples, EVAL_SETS["truthfulqa"]))
    assert tqa[0][0] == "truthfulqa/mc_task.json:0" and "pomegranate" in tqa[0][1]
    full = find_files(shared_data, EVAL_SETS["truthfulqa"])  # both layouts there: the CSV wins, no doubles
    assert [p.name for p in full] == ["TruthfulQA.csv"]
    assert len(read_eval_set("truthfulqa", full)) == 817
