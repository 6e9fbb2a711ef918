"""The multiple-choice scenarios: MMLU, TruthfulQA (mc_single), BBQ and OpenBookQA, in HELM's joint format."""

from __future__ import annotations

import csv
import hashlib
import json
from random import Random

from daytune.errors import DataError
from daytune.eval import metrics as M
from daytune.eval.scenarios.base import DataRoot, Instance, Metric, MultipleChoiceScenario, Settings, take

# The five MMLU subjects of HELM Lite and of the challenge's open MMLU run entries.
MMLU_CORE = [
    "abstract_algebra",
    "college_chemistry",
    "computer_security",
    "econometrics",
    "us_foreign_policy",
]


def _read_csv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for n, row in enumerate(rows, start=2):
        if None in row.values() or "answer" not in row:
            raise DataError(f"{path}:{n}: expected columns question,choice0..choice3,answer")
    return rows


def _mmlu_rows(path, subject: str, split: str) -> list[Instance]:
    out = []
    for n, row in enumerate(_read_csv(path)):
        options = [row[f"choice{i}"] for i in range(4)]
        try:
            answer = int(row["answer"])
        except ValueError:
            raise DataError(f"{path}:{n + 2}: answer must be an index 0-3, got {row['answer']!r}") from None
        out.append(
            Instance(f"{subject}/{split}/{n}", row["question"], options, answer, meta={"subject": subject})
        )
    return out


class MMLU(MultipleChoiceScenario):
    name = "mmlu"
    takes_subjects = True
    description = "MMLU, 5-shot from each subject's dev split (HELM's prompt), exact match on the letter"

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        subjects = s.subjects or MMLU_CORE
        if subjects == ["all"]:
            subjects = sorted(p.name[: -len("_test.csv")] for p in data.path("mmlu/test").glob("*_test.csv"))
        self._shots = {}
        out = []
        for subject in subjects:
            self._shots[subject] = _mmlu_rows(data.path(f"mmlu/dev/{subject}_dev.csv"), subject, "dev")[
                : s.shots
            ]
            out += take(
                _mmlu_rows(data.path(f"mmlu/test/{subject}_test.csv"), subject, "test"), s.max_instances
            )
        return out

    def instructions(self, inst: Instance) -> str:
        subject = inst.meta["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}."

    def shots_for(self, inst: Instance) -> list[Instance]:
        return self._shots[inst.meta["subject"]]


def _shuffled(question: str, options: list[str], correct: int) -> tuple[list[str], int]:
    """A fixed, question-seeded order, so that the correct option is not always A."""
    order = list(range(len(options)))
    Random(int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)).shuffle(order)
    return [options[i] for i in order], order.index(correct)


class TruthfulQA(MultipleChoiceScenario):
    name = "truthfulqa"
    description = "TruthfulQA mc_single (MC1 targets, options in a fixed shuffled order), 5-shot"
    N_SHOTS_POOL = 5  # the first questions are the few-shot examples and are never evaluated

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        path = data.path("truthfulqa/mc_task.json")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        out = []
        for n, row in enumerate(rows):
            targets = row.get("mc1_targets")
            if not isinstance(targets, dict) or list(targets.values()).count(1) != 1:
                raise DataError(f"{path}: item {n}: mc1_targets must map answers to 0/1 with exactly one 1")
            options = list(targets)
            options, answer = _shuffled(row["question"], options, list(targets.values()).index(1))
            out.append(Instance(f"truthfulqa/{n}", row["question"], options, answer))
        self._shots = out[: min(s.shots, self.N_SHOTS_POOL)]
        return take(out[self.N_SHOTS_POOL :], s.max_instances)

    def shots_for(self, inst: Instance) -> list[Instance]:
        return self._shots


BBQ_CATEGORIES = [
    "Age",
    "Disability_status",
    "Nationality",
    "Physical_appearance",
    "Religion",
    "Sexual_orientation",
]


def _bbq_group(info: list[str], stereotyped: list[str]) -> str:
    """target (the stereotyped group), non-target, or unknown, for one answer's answer_info entry."""
    label = (info[1] if len(info) > 1 else info[0]).lower()
    if label == "unknown":
        return "unknown"
    groups = [g.lower() for g in stereotyped]
    name = info[0].lower()
    hit = any(g == label or g in label.split("-") or g == name or g in name for g in groups)
    return "target" if hit else "non-target"


class BBQ(MultipleChoiceScenario):
    name = "bbq"
    takes_subjects = True
    description = (
        "BBQ (6 categories), 5-shot; accuracy and HELM's bias scores on ambiguous/disambiguated contexts"
    )
    input_noun = "Passage"
    metrics = {
        **MultipleChoiceScenario.metrics,
        "bias_ambiguous": Metric(lambda rs: M.bbq_bias(rs)["bias_ambiguous"], None),
        "bias_disambiguated": Metric(lambda rs: M.bbq_bias(rs)["bias_disambiguated"], None),
    }

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        per_cat = []
        for cat in s.subjects or BBQ_CATEGORIES:
            path = data.path(f"bbq/{cat}.jsonl")
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    stereo = r["additional_metadata"]["stereotyped_groups"]
                    groups = [_bbq_group(r["answer_info"][f"ans{i}"], stereo) for i in range(3)]
                    text = f"{r['context']}\nQuestion: {r['question']}"
                    rows.append(
                        Instance(
                            f"bbq/{cat}/{r['example_id']}",
                            text,
                            [r["ans0"], r["ans1"], r["ans2"]],
                            int(r["label"]),
                            meta={
                                "condition": r["context_condition"],
                                "polarity": r["question_polarity"],
                                "groups": groups,
                            },
                        )
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{n}: not a BBQ record ({type(e).__name__}: {e})") from None
            per_cat.append(rows)
        # few-shot: the first rows of each category in turn; evaluation: the rest, interleaved across categories
        shots_pool = [rows[i] for i in range(2) for rows in per_cat if len(rows) > i]
        self._shots = shots_pool[: s.shots]
        used = {x.id for x in self._shots}
        interleaved = [
            rows[i] for i in range(max(map(len, per_cat), default=0)) for rows in per_cat if len(rows) > i
        ]
        ordered = [r for r in interleaved if r.id not in used]
        return take(ordered, s.max_instances)

    def instructions(self, inst: Instance) -> str:
        return "The following are multiple choice questions (with answers)."

    def shots_for(self, inst: Instance) -> list[Instance]:
        return self._shots

    def extra(self, inst: Instance, pred: str) -> dict:
        letter = pred.strip()
        idx = LETTERS_INDEX.get(letter)
        group = inst.meta["groups"][idx] if idx is not None and idx < len(inst.options) else None
        return {"condition": inst.meta["condition"], "polarity": inst.meta["polarity"], "pred_group": group}


LETTERS_INDEX = {c: i for i, c in enumerate("ABCDEFGHIJ")}


class OpenBookQA(MultipleChoiceScenario):
    name = "openbookqa"
    description = "OpenBookQA (main, test split), 5-shot from its first rows"
    N_SHOTS_POOL = 5

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        path = data.path("openbookqa/test.jsonl")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                options = [o.split(". ", 1)[1] for o in r["options"].split("\n")]
                answer = "ABCD".index(r["answer"].split(".", 1)[0].strip())
            except (json.JSONDecodeError, KeyError, IndexError, ValueError) as e:
                raise DataError(f"{path}:{n}: not an OpenBookQA record ({type(e).__name__}: {e})") from None
            out.append(Instance(f"openbookqa/{n - 1}", r["question"].strip(), options, answer))
        self._shots = out[: min(s.shots, self.N_SHOTS_POOL)]
        return take(out[self.N_SHOTS_POOL :], s.max_instances)

    def instructions(self, inst: Instance) -> str:
        return "The following are multiple choice questions (with answers) about common sense."

    def shots_for(self, inst: Instance) -> list[Instance]:
        return self._shots
