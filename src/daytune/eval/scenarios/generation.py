"""Generation and language-modeling scenarios: GSM8K (chain of thought), XSum summarization, WikiText-2."""

from __future__ import annotations

import json
import re

from daytune.errors import DataError
from daytune.eval import metrics as M
from daytune.eval.lm import LM, GenerateRequest
from daytune.eval.scenarios.base import DataRoot, Instance, Metric, Scenario, Settings, take


def _jsonl(path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer as HELM shows it: calculator annotations removed, '#### N' -> 'The answer is N.'"""
    answer = re.sub(r"<<[^>]*>>", "", answer)
    if "####" in answer:
        body, final = answer.rsplit("####", 1)
        answer = f"{body.strip()} The answer is {final.strip()}."
    return " ".join(line.strip() for line in answer.strip().splitlines())


class GSM8K(Scenario):
    name = "gsm8k"
    description = "GSM8K, 5-shot chain of thought (HELM's Q/A format), exact match on the final number"
    main_metric = "exact_match"
    metrics = {"exact_match": Metric(M.mean_of("exact_match"))}

    def _rows(self, path, split: str) -> list[Instance]:
        out = []
        for n, r in enumerate(_jsonl(path)):
            q = r.get("question", r.get("instruction"))
            a = r.get("answer", r.get("output"))
            if not isinstance(q, str) or not isinstance(a, str):
                raise DataError(f"{path}:{n + 1}: expected question/answer (or instruction/output) strings")
            out.append(Instance(f"gsm8k/{split}/{n}", q.strip(), reference=gsm8k_solution(a)))
        return out

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        self._shots = self._rows(data.path("gsm8k/train.jsonl"), "train")[: s.shots]
        return take(self._rows(data.path("gsm8k/test.jsonl"), "test"), s.max_instances)

    def prompt(self, inst: Instance) -> str:
        blocks = [f"Q: {ex.input}\nA: {ex.reference}" for ex in self._shots]
        blocks.append(f"Q: {inst.input}\nA:")
        return "\n\n".join(blocks)

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        prompts = [self.prompt(i) for i in instances]
        gens = lm.generate([GenerateRequest(p, s.max_new_tokens or 400, ["\n\n"]) for p in prompts])
        records = [
            {
                "id": inst.id,
                "prediction": g.text,
                "gold": M.final_number(inst.reference),
                "predicted": M.final_number(g.text),
                "exact_match": M.final_number_exact_match(inst.reference, g.text),
            }
            for inst, g in zip(instances, gens)
        ]
        return records, ({"prompt": prompts[0], "output": gens[0].text} if prompts else {})


class XSum(Scenario):
    name = "xsum"
    description = (
        "XSum (1,000-article sample), one-sentence summaries; ROUGE-2 and ROUGE-L (rouge-score, stemmed)"
    )
    main_metric = "rouge_2"
    metrics = {"rouge_2": Metric(M.mean_of("rouge_2")), "rouge_l": Metric(M.mean_of("rouge_l"))}

    def _article(self, text: str, s: Settings) -> str:
        words = text.split()
        if s.max_words and len(words) > s.max_words:
            return " ".join(words[: s.max_words])
        return text.strip()

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        path = data.path("xsum_sample/test.jsonl")
        rows = []
        for n, r in enumerate(_jsonl(path)):
            if not isinstance(r.get("document"), str) or not isinstance(r.get("summary"), str):
                raise DataError(f"{path}:{n + 1}: expected 'document' and 'summary' strings")
            rows.append(
                Instance(f"xsum/{r.get('id', n)}", self._article(r["document"], s), reference=r["summary"])
            )
        self._shots = rows[: s.shots]
        return take(rows[len(self._shots) :], s.max_instances)

    def prompt(self, inst: Instance) -> str:
        """HELM's summarization adapter: '###' separates examples; the instruction precedes each summary."""
        instr = "Summarize the above article in 1 sentence.\n"
        blocks = [f"###\nArticle: {ex.input}\n\n{instr}{ex.reference}\n" for ex in self._shots]
        blocks.append(f"###\nArticle: {inst.input}\n\n{instr}")
        return "\n".join(blocks).rstrip()

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        prompts = [self.prompt(i) for i in instances]
        gens = lm.generate([GenerateRequest(p, s.max_new_tokens or 64, ["###"]) for p in prompts])
        records = []
        for inst, g in zip(instances, gens):
            pred = g.text.strip().split("\n")[0]  # the summary is one sentence on one line
            records.append({"id": inst.id, "prediction": pred, **M.rouge(inst.reference, pred)})
        return records, ({"prompt": prompts[0][-600:], "output": gens[0].text} if prompts else {})


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenization undone (the rules lm-evaluation-harness applies before scoring)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". ")):
        s = s.replace(a, b)
    for a, b in ((" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176))):
        s = s.replace(a, b)
    for a, b in ((" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_documents(raw: str) -> list[str]:
    """Split WikiText-2 into articles at its top-level headings (' = Title = ')."""
    docs: list[list[str]] = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        if _TITLE.match(line):
            docs.append([])
        if docs and line.strip():
            docs[-1].append(line)
    return ["\n".join(d) + "\n" for d in docs if d]


class WikiText2(Scenario):
    name = "wikitext2"
    description = (
        "WikiText-2 test articles: word perplexity and bits per byte (lm-evaluation-harness's definitions)"
    )
    main_metric = "bits_per_byte"
    metrics = {
        "word_perplexity": Metric(lambda rs: M.perplexities(rs)["word_perplexity"], False),
        "byte_perplexity": Metric(lambda rs: M.perplexities(rs)["byte_perplexity"], False),
        "bits_per_byte": Metric(lambda rs: M.perplexities(rs)["bits_per_byte"], False),
    }

    def load(self, data: DataRoot, s: Settings) -> list[Instance]:
        raw = data.path("wikitext2/wiki.test.raw").read_text(encoding="utf-8")
        docs = wikitext_documents(raw)
        if not docs:
            raise DataError(f"{data.path('wikitext2/wiki.test.raw')}: no ' = Title = ' headings found")
        return take([Instance(f"wikitext2/{i}", d) for i, d in enumerate(docs)], s.max_instances)

    def run(self, lm: LM, instances: list[Instance], s: Settings) -> tuple[list[dict], dict]:
        scored = lm.loglikelihood_rolling([wikitext_detokenize(i.input) for i in instances])
        records = [
            {
                "id": inst.id,
                "logprob": lp,
                "tokens": n,
                "words": len(re.split(r"\s+", inst.input)),  # counted on the original text, as lm-eval does
                "bytes": len(inst.input.encode("utf-8")),
            }
            for inst, (lp, n) in zip(instances, scored)
        ]
        return records, ({"document": instances[0].input[:300]} if instances else {})
