"""What every scenario shares: the data root, instances, settings, HELM's multiple-choice prompt format and the
loop that scores original and perturbed instances."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from daytune.errors import DataError
from daytune.eval import metrics as M
from daytune.eval.lm import LM, GenerateRequest
from daytune.eval.perturbations import GROUPS, perturb

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REPO = Path(__file__).resolve().parents[4]
SAMPLES = REPO / "examples" / "data" / "eval"  # small samples shipped with daytune (the quick suite's data)


def default_data_root() -> Path:
    """$DAYTUNE_EVAL_DATA, else the datasets folder beside the repository (<repo>/../shared/data)."""
    env = os.environ.get("DAYTUNE_EVAL_DATA")
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


@dataclass
class DataRoot:
    root: Path

    def path(self, rel: str) -> Path:
        p = self.root / rel
        if not p.exists():
            raise DataError(
                f"evaluation data not found: {p} (set --data-root or $DAYTUNE_EVAL_DATA to the datasets folder; "
                "its SOURCES.md lists the files)"
            )
        return p


@dataclass
class Instance:
    id: str
    input: str
    options: list[str] = field(default_factory=list)  # multiple choice
    answer: int | None = None  # index of the correct option
    reference: str | None = None  # gold output (generation)
    meta: dict = field(default_factory=dict)


@dataclass
class Settings:
    max_instances: int | None = None  # per scenario (MMLU: per subject)
    shots: int = 5
    perturbations: list[str] = field(default_factory=list)  # groups: robustness, fairness
    max_new_tokens: int | None = None
    subjects: list[str] | None = None  # MMLU subjects, BBQ categories
    max_words: int | None = None  # summarization: truncate articles to this many words


@dataclass
class Metric:
    fn: object  # records -> float
    higher_is_better: bool | None = True  # None: closer to 0 is better (bias scores)


class Scenario:
    name = "scenario"
    description = ""
    main_metric = "exact_match"
    metrics: dict[str, Metric] = {}
    takes_subjects = False  # Settings.subjects picks this scenario's subjects (MMLU) or categories (BBQ)

    @classmethod
    def defaults(cls) -> Settings:
        """The settings a suite that does not list this scenario runs it with (--scenarios)."""
        return Settings()

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        raise NotImplementedError

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        """Per-instance records, and one example prompt/output for the report."""
        raise NotImplementedError

    def breakdown(self, records: list[dict]) -> dict:
        """Scores by group (SNI: by task) for the results file; {} when a scenario has no groups."""
        return {}


def take(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


class MultipleChoiceScenario(Scenario):
    """HELM's `multiple_choice_joint` adapter: the options are listed with letters, `shots` solved examples come
    first, and the model generates the answer (greedy, one token, stop sequence a newline); exact match
    compares the stripped output with the letter (prefix exact match: the output starts with it). The options' log-likelihoods (one forward pass with the letters
    as one-token continuations) give calibration (ECE of the option probabilities) and accuracy by likelihood."""

    input_noun: str | None = "Question"
    output_noun = "Answer"
    max_new_tokens = 1  # HELM's multiple_choice_joint asks for one token (crfm-helm 0.5.16's MMLU run spec)
    metrics = {
        "exact_match": Metric(M.mean_of("exact_match")),
        "prefix_exact_match": Metric(M.mean_of("prefix_exact_match")),
        "exact_match_robustness": Metric(M.mean_of("exact_match_robustness")),
        "exact_match_fairness": Metric(M.mean_of("exact_match_fairness")),
        "accuracy_by_likelihood": Metric(M.mean_of("likelihood_correct")),
        "ece_10_bin": Metric(
            lambda rs: M.ece([r["confidence"] for r in rs], [r["likelihood_correct"] for r in rs]), False
        ),
    }

    def instructions(self, inst: Instance) -> str:
        return ""

    def shots_for(self, inst: Instance) -> list[Instance]:
        return []

    def block(self, inst: Instance, options: list[str], text: str, with_answer: bool) -> str:
        lines = [f"{self.input_noun}: {text}" if self.input_noun else text]
        lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
        lines.append(f"{self.output_noun}:" + (f" {LETTERS[inst.answer]}" if with_answer else ""))
        return "\n".join(lines)

    def prompt(self, inst: Instance, text: str | None = None, options: list[str] | None = None) -> str:
        head = self.instructions(inst)
        blocks = [self.block(ex, ex.options, ex.input, True) for ex in self.shots_for(inst)]
        blocks.append(
            self.block(inst, options if options is not None else inst.options, text or inst.input, False)
        )
        return (head + "\n\n" if head else "") + "\n\n".join(blocks)

    def variants(self, inst: Instance, s: Settings) -> list[tuple[str, str, list[str]]]:
        """(perturbation name, input, options): the original first, then each requested perturbation."""
        out = [("original", inst.input, list(inst.options))]
        for group in s.perturbations:
            for name in GROUPS[group]:
                text, options = perturb(name, inst.id, inst.input, inst.options)
                out.append((name, text, options))
        return out

    CHUNK = 64  # instances per round of requests (bounds what a local model keeps between the two calls)

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        records: list[dict] = []
        example: dict = {}
        for c in range(0, len(instances), self.CHUNK):
            recs, ex = self._run_chunk(lm, instances[c : c + self.CHUNK], s)
            records += recs
            example = example or ex
        return records, example

    def _run_chunk(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        variants = {}  # (instance index, perturbation) -> prompt
        for k, inst in enumerate(instances):
            for name, text, options in self.variants(inst, s):
                variants[(k, name)] = self.prompt(inst, text, options)
        unique = list(dict.fromkeys(variants.values()))  # a perturbation that changed nothing costs nothing
        gens = dict(
            zip(unique, lm.generate([GenerateRequest(p, self.max_new_tokens, ["\n"]) for p in unique]))
        )
        originals = [(k, variants[(k, "original")]) for k in range(len(instances))]
        ll_requests = [(p, f" {LETTERS[i]}") for k, p in originals for i in range(len(instances[k].options))]
        lls = iter(lm.loglikelihood(ll_requests))
        records = []
        for k, prompt in originals:
            inst = instances[k]
            n_opt = len(inst.options)
            option_lps = [next(lls).logprob for _ in range(n_opt)]
            probs = M.softmax(option_lps)
            best = max(range(n_opt), key=lambda i: option_lps[i])
            gold = LETTERS[inst.answer]
            pred = gens[prompt].text
            rec = {
                "id": inst.id,
                "prediction": pred,
                "exact_match": M.exact_match(gold, pred),
                "prefix_exact_match": M.prefix_exact_match(gold, pred),
                "likelihood_correct": float(best == inst.answer),
                "confidence": max(probs),
                "option_logprobs": [round(x, 5) for x in option_lps],
            }
            for group, key in (
                ("robustness", "exact_match_robustness"),
                ("fairness", "exact_match_fairness"),
            ):
                if group in s.perturbations:
                    per = {n: M.exact_match(gold, gens[variants[(k, n)]].text) for n in GROUPS[group]}
                    rec[key] = min([rec["exact_match"], *per.values()])
                    rec.update({f"exact_match_{n}": v for n, v in per.items()})
            rec.update(self.extra(inst, pred))
            records.append(rec)
        example = {"prompt": originals[0][1], "output": gens[originals[0][1]].text} if originals else {}
        return records, example

    def extra(self, inst: Instance, pred: str) -> dict:
        return {}
