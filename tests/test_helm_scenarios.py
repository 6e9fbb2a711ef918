"""The HELM port without HELM: its selection rule, prompt layout, perturbations and metrics on small cases worked
out by hand from HELM's code (tests/test_helm_agreement.py checks them against helm-run itself)."""

from __future__ import annotations

from random import Random

import pytest

from daytune.cli import main
from daytune.errors import ConfigError
from daytune.eval.helm import adapter as A
from daytune.eval.helm import metrics as HM
from daytune.eval.helm.perturbations import augment, contract, gender_pronouns, match_case, mild_mix
from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings
from daytune.eval.scenarios.helm import _bbq_bias
from daytune.eval.suites import suite_plan


def inst(text: str, answer: str | None, split: str = A.TRAIN) -> A.HelmInstance:
    refs = (A.Reference(answer, True),) if answer else ()
    return A.HelmInstance(text, refs, split)


def test_examples_are_label_balanced_as_in_helms_docstring():
    """HELM's own example: from (no, yes, yes) two examples are one 'yes' and one 'no', 'yes' first (the label
    with more instances comes first)."""
    train = [inst("say no", "no"), inst("say yes", "yes"), inst("say yes", "yes")]
    spec = A.AdapterSpec(max_train_instances=2)
    picked = A.sample_examples(train, spec, seed=0)
    assert [p.first_correct.text for p in picked] == ["yes", "no"]
    # unlabeled instances fill what the labels cannot, and the draw depends only on the seed
    more = train + [inst("free text", None), inst("more text", None)]
    spec5 = A.AdapterSpec(max_train_instances=5)
    first = A.sample_examples(list(more), spec5, seed=0)
    assert len(first) == 5 and first == A.sample_examples(list(more), spec5, seed=0)
    assert {p.input for p in first} == {"say no", "say yes", "free text", "more text"}


def test_joint_prompt_layout_letters_and_mapping():
    spec = A.multiple_choice_joint_spec("The following are questions.", "Question", "Answer")
    ex = A.HelmInstance("2+2?", (A.Reference("3"), A.Reference("4", True)), A.TRAIN)
    q = A.HelmInstance("1+1?", (A.Reference("2", True), A.Reference("5")), A.TEST)
    prompt = A.build_prompt(spec, [ex], q)
    assert prompt.text == (
        "The following are questions.\n\n"
        "Question: 2+2?\nA. 3\nB. 4\nAnswer: B\n\n"
        "Question: 1+1?\nA. 2\nB. 5\nAnswer:"
    )
    assert A.output_mapping(spec, q) == {"A": "2", "B": "5"}
    assert spec.max_tokens == 1 and spec.stop_sequences == () and spec.temperature == 0


def test_window_fitting_drops_the_last_examples_first():
    spec = A.generation_spec(input_noun="Q", output_noun="A", max_tokens=10)
    examples = [inst(f"example {i} " + "x" * 40, "y") for i in range(3)]
    q = inst("question", "z", A.TEST)
    words = lambda t: len(t)  # noqa: E731  one "token" per character
    full = A.build_prompt(spec, examples, q, words, window=10_000)
    assert full.num_train_instances == 3
    room = len(A.build_prompt(spec, examples[:1], q).text) + 10 + 1
    fitted = A.build_prompt(spec, examples, q, words, window=room)
    assert fitted.num_train_instances == 1 and "example 0" in fitted.text and "example 1" not in fitted.text
    cut = A.build_prompt(spec, examples, q, words, lambda t, n: t[:n], window=15)
    assert cut.num_train_instances == 0 and cut.truncated and len(cut.text) == 5


def test_downsampling_is_numpys_seeded_permutation():
    import numpy as np

    evals = [inst(f"q{i}", "a", A.TEST) for i in range(30)]
    train = [inst("t", "a")]
    picked = A.downsample(A.with_ids(train + evals), 5)
    np.random.seed(0)
    expected = list(np.random.choice([f"q{i}" for i in range(30)], 5, replace=False))
    assert [p.input for p in picked] == ["t", *expected]
    assert picked[1].id == f"id{1 + int(expected[0][1:])}"  # ids count the training instances too


def test_perturbations_follow_helms_rules():
    assert match_case("Hello", "world") == "World" and match_case("HI", "yo") == "YO"
    assert contract("It is what they are doing") == "It's what they're doing"
    text = "He gave his book to him himself."  # HELM's pattern needs a non-word character before the word:
    assert gender_pronouns(text, Random(0)) == "He gave her book to her herself."  # a leading "He" stays
    # mild_mix: lowercase, contract, misspell, respace, all from the instance-seeded generator
    out = mild_mix("The Government is not  available", Random("id3"))
    assert out == mild_mix("The Government is not  available", Random("id3"))
    words = out.split()
    assert out == out.lower() and words[0] == "the" and words[2] == "isn't" and words[3] == "available"
    # an unchanged copy is dropped; the originals come first and keep their ids
    insts = A.with_ids([inst("nothing to change", "a", A.TEST), inst("So he said", "a", A.TEST)])
    aug = augment(insts, ["fairness"])
    assert [(i.id, i.perturbation) for i in aug] == [("id0", None), ("id1", None), ("id1", "gender")]
    assert aug[2].input == "So she said" and aug[2].fairness


def test_metrics_as_helm_defines_them():
    assert HM.score(["exact_match", "quasi_exact_match"], ["The cat."], "the cat") == {
        "exact_match": 0.0,
        "quasi_exact_match": 1.0,
    }
    assert HM.final_number_exact_match("The answer is 1,200.", "so 1200 eggs") == 1
    assert HM.exact_match("A", None) == 0 and HM.prefix_exact_match("B", "B. yes") == 1
    # equal-mass ECE: two bins of two, |mean p - mean correct| weighted by size
    probs, correct = [0.9, 0.8, 0.3, 0.2], [1, 0, 0, 0]
    assert HM.ece(probs, correct, num_bins=2) == pytest.approx(0.5 * abs(0.25 - 0) + 0.5 * abs(0.85 - 0.5))
    assert HM.ece(probs, correct, num_bins=1, equal_mass=False) == pytest.approx(abs(0.55 - 0.25))


def test_bbq_bias_scores():
    def rec(c, label, ambiguous, negative, target="A", non_target="B", unknown="C"):
        b = dict(label=label, target=target, non_target=non_target, unknown=unknown)
        return {"completion": f" {c}", "bbq": {**b, "ambiguous": ambiguous, "negative": negative}}

    rs = [
        rec("A", "C", True, True),
        rec("B", "C", True, False),
        rec("C", "C", True, True),
        rec("A", "A", False, True),
    ]
    got = _bbq_bias(rs)
    assert got["bbq_accuracy"] == 0.5
    # ambiguous: 2 non-unknown answers, both biased -> (2*2/2 - 1) * (1 - 0.5); disambiguated: 1 of 1 biased
    assert got["bbq_metric_ambiguous_bias"] == 0.5 and got["bbq_metric_unambiguous_bias"] == 1.0


def test_neurips_open_runs_locally_and_subjects_are_checked(tmp_path, tiny_model_dir, shared_data):
    plan = suite_plan("neurips-open", ["helm_mmlu", "helm_bbq"], 2, ["abstract_algebra"])
    assert dict(plan)["helm_mmlu"].subjects == ["abstract_algebra"]
    with pytest.raises(ConfigError, match="--subjects"):
        suite_plan("neurips-open", ["helm_gsm8k"], 2, ["abstract_algebra"])
    out = tmp_path / "eval"
    args = ["--quiet", "eval", "--model", str(tiny_model_dir), "--suite", "neurips-open", "--device", "cpu"]
    args += [
        "--scenarios",
        "helm_mmlu,helm_truthfulqa",
        "--subjects",
        "abstract_algebra",
        "--max-instances",
        "2",
    ]
    assert main([*args, "--bootstrap", "0", "--data-root", str(shared_data), "--out", str(out)]) == 0
    import json

    res = json.loads((out / "results.json").read_text())["scenarios"]
    mmlu = res["helm_mmlu"]
    assert mmlu["n"] == 2 and {r["helm_id"] for r in mmlu["records"]} <= {f"id{i}" for i in range(105)}
    assert all(r["prompt"].startswith("The following are multiple choice questions (with answers) about abstract")
               for r in mmlu["records"])  # fmt: skip
    assert "exact_match_robustness" in mmlu["metrics"] and res["helm_truthfulqa"]["n"] == 2


def test_bad_perturbation_group_is_refused(shared_data):
    scen = SCENARIOS["helm_truthfulqa"]()
    with pytest.raises(Exception, match="perturbations"):
        scen.load(DataRoot(shared_data), Settings(max_instances=1, perturbations=["dialect"]))
