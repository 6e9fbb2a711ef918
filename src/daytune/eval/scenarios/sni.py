"""Super-NaturalInstructions tasks as an evaluation scenario: tasks a model never trained on (the `unseen` suite).

Each task file gives a Definition, Positive Examples and Instances. The prompt is Tk-Instruct's encoding (Wang et al.
2022): "Definition: ..." then, with `shots` k > 0, k of the task's Positive Examples, then "Now complete the following
example -\\nInput: ...\\nOutput:"; zero-shot by default. The model generates greedily up to a newline. Scores, as the
paper's scorer (Tk-Instruct's compute_metrics.py) computes them, each the best over the instance's references:

- exact match after SNI's normalization (lowercase, punctuation removed, spaces collapsed; articles kept);
- ROUGE-L F1 from `rouge-score` with the Porter stemmer;
- for tasks whose outputs come from a small fixed set (at most MAX_LABELS distinct normalized outputs over all of
  the task's instances): rank accuracy, the label with the highest log-likelihood as the continuation of the prompt
  is a reference, which measures the model's preference among the labels whatever it generates; valid label, the
  generated answer is one of the labels; and exact_match_labels, exact match on these tasks only.

Metrics are macro-averaged over tasks (every task weighs the same), the paper's convention. Instances are a seeded
shuffle of each task's instances (files are often sorted by label), the first `max_instances` of them. A prompt the
local model has to cut to fit its context is counted per instance (`truncated_tokens`) and reported.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from daytune.data.heldout import UNSEEN_TASKS
from daytune.data.templates import tk_instruct_prompt
from daytune.errors import DataError
from daytune.eval import metrics as M
from daytune.eval.lm import LM, GenerateRequest
from daytune.eval.scenarios.base import DataRoot, Instance, Metric, Scenario, Settings, take

MAX_LABELS = 10


@dataclass
class Task:
    name: str
    definition: str
    positives: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the fixed label set, or [] for open outputs
    categories: list[str] = field(default_factory=list)

    def prompt(self, text: str, shots: int) -> str:
        return tk_instruct_prompt(self.definition, self.positives, text, shots)


def label_set(instances: list[dict]) -> list[str]:
    """The task's labels when every instance's outputs come from at most MAX_LABELS normalized values, each used
    twice on average at least (the most frequent spelling of each), else []."""
    counts: Counter = Counter()
    spelling: dict[str, Counter] = {}
    for inst in instances:
        for out in inst["output"]:
            key = M.sni_normalize(out)
            counts[key] += 1
            spelling.setdefault(key, Counter())[out.strip()] += 1
            if len(counts) > MAX_LABELS or not key:
                return []
    if not counts or 2 * len(counts) > sum(counts.values()):  # labels repeat: a few instances are not a set
        return []
    return [spelling[k].most_common(1)[0][0] for k, _ in counts.most_common()]


def truncated_share(records: list[dict]) -> float:
    """The fraction of instances whose prompt was cut to fit the model's context."""
    return sum(1.0 for r in records if r["truncated_tokens"] > 0) / len(records) if records else float("nan")


def read_task(data: DataRoot, name: str) -> tuple[Task, list[dict]]:
    path = data.path(f"natural_instructions/{name}.json")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    definition = obj.get("Definition") if isinstance(obj, dict) else None
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str) or not isinstance(obj.get("Instances"), list):
        raise DataError(f"{path}: not a Super-NaturalInstructions task file (Definition, Instances)")
    instances = obj["Instances"]
    for i, inst in enumerate(instances):
        outs = inst.get("output") if isinstance(inst, dict) else None
        if not isinstance(inst.get("input") if isinstance(inst, dict) else None, str) or not (
            isinstance(outs, list) and outs and all(isinstance(o, str) for o in outs)
        ):
            raise DataError(f"{path}: Instances[{i}]: expected 'input' (a string) and 'output' (strings)")
    positives = [p for p in obj.get("Positive Examples") or [] if isinstance(p, dict)]
    cats = obj.get("Categories") or []
    return Task(name, definition, positives, label_set(instances), list(cats)), instances


class SNI(Scenario):
    name = "sni"
    description = (
        "Super-NaturalInstructions tasks, definition + input (zero-shot unless shots > 0); exact match and "
        "ROUGE-L (the SNI scorer), rank accuracy over the label set, macro-averaged over tasks"
    )
    main_metric = "exact_match"
    metrics = {
        "exact_match": Metric(M.macro_mean_of("exact_match")),
        "rouge_l": Metric(M.macro_mean_of("rouge_l")),
        "rank_accuracy": Metric(M.macro_mean_of("rank_correct")),
        "valid_label": Metric(M.macro_mean_of("valid_label")),
        # exact match on the tasks with a label set only: the answers `valid_label` and `rank_accuracy` judge
        "exact_match_labels": Metric(M.macro_mean_of("label_exact_match")),
        "truncated": Metric(truncated_share, False),
    }

    @classmethod
    def defaults(cls) -> Settings:
        return Settings(shots=0, subjects=list(UNSEEN_TASKS), max_new_tokens=64)

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        self._tasks: dict[str, Task] = {}
        out = []
        for name in s.subjects or list(UNSEEN_TASKS):
            task, instances = read_task(data, name)
            self._tasks[name] = task
            order = list(range(len(instances)))
            random.Random(f"sni/{name}").shuffle(order)  # seeded by the task: the same instances every time
            for i in take(order, s.max_instances):
                inst = instances[i]
                refs = [o.strip() for o in inst["output"]]
                iid = str(inst.get("id") or f"{name}-{i}")
                out.append(Instance(iid, inst["input"], reference=refs[0], meta={"task": name, "refs": refs}))
        return out

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        prompts = [self._tasks[i.meta["task"]].prompt(i.input, s.shots) for i in instances]
        gens = lm.generate([GenerateRequest(p, s.max_new_tokens or 64, ["\n"]) for p in prompts])
        ranked = [(k, label) for k, i in enumerate(instances) for label in self._tasks[i.meta["task"]].labels]
        lls = iter(lm.loglikelihood([(prompts[k], f" {label}") for k, label in ranked]))
        records = []
        for inst, g in zip(instances, gens):
            task, refs, pred = self._tasks[inst.meta["task"]], inst.meta["refs"], g.text.strip()
            rec = {
                "id": inst.id,
                "task": task.name,
                "prediction": pred,
                "references": refs,
                "exact_match": M.sni_exact_match(refs, pred),
                "rouge_l": float(M.sni_rouge_l(refs, pred)),
                "truncated_tokens": g.truncated,
            }
            if task.labels:
                scores = [next(lls) for _ in task.labels]
                best = max(range(len(scores)), key=lambda j: scores[j].logprob)
                gold = {M.sni_normalize(r) for r in refs}
                rec["rank_correct"] = float(M.sni_normalize(task.labels[best]) in gold)
                rec["valid_label"] = float(M.sni_normalize(pred) in {M.sni_normalize(x) for x in task.labels})
                rec["label_exact_match"] = rec["exact_match"]
                rec["label_logprobs"] = [round(x.logprob, 5) for x in scores]
                rec["truncated_tokens"] = max(g.truncated, *(x.truncated for x in scores))
            records.append(rec)
        return records, ({"prompt": prompts[0], "output": gens[0].text} if prompts else {})

    def breakdown(self, records: list[dict]) -> dict:
        """Each task's own scores (means over its instances) and its label set."""
        out = {}
        for name, task in self._tasks.items():
            rs = [r for r in records if r["task"] == name]
            row = {"n": len(rs), "categories": task.categories, "labels": task.labels}
            for key, metric in (("exact_match", "exact_match"), ("rouge_l", "rouge_l")) + (
                (("rank_correct", "rank_accuracy"), ("valid_label", "valid_label")) if task.labels else ()
            ):
                value = M.mean_of(key)(rs) if rs else float("nan")
                row[metric] = None if value != value else round(value, 6)
            row["truncated"] = sum(1 for r in rs if r["truncated_tokens"] > 0)
            out[name] = row
        return out
