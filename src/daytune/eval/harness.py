"""The lm-evaluation-harness bridge: lm-eval's own task code on daytune's model, offline.

lm-eval's task YAMLs name Hugging Face datasets it would download. Here each task gets a small local YAML that
`include`s lm-eval's own one (so its prompts, `process_docs`, `process_results` and metrics are lm-eval's) and
points `dataset_path: json` at JSONL files written from the local datasets folder in the schema the task
expects. Arithmetic is generated locally in the GPT-3 format (seeded). The model is daytune's `LocalLM` behind
lm-eval's `LM` interface, so requests run through the same engine as the suite; `hf_reference` gives lm-eval's own
`HFLM` on the same model for agreement checks and the throughput benchmark.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from daytune.errors import ConfigError, DaytuneError
from daytune.eval.lm import GenerateRequest, LocalLM
from daytune.eval.scenarios import DataRoot
from daytune.eval.scenarios.generation import wikitext_documents
from daytune.eval.scenarios.multiple_choice import MMLU_CORE

ARITHMETIC = {  # task -> (digits, operation word, python operator)
    **{f"arithmetic_{d}da": (d, "plus", "+") for d in range(2, 6)},
    **{f"arithmetic_{d}ds": (d, "minus", "-") for d in range(2, 6)},
    "arithmetic_2dm": (2, "times", "*"),
    "arithmetic_1dc": (1, None, None),
}
KNOWN = ["wikitext", "openbookqa", "truthfulqa_mc1", "truthfulqa_mc2", *ARITHMETIC] + [
    f"mmlu_{s}" for s in MMLU_CORE
]


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DaytuneError(
            "the harness bridge needs lm-evaluation-harness: pip install -c constraints.txt 'daytune[harness]'"
        ) from None


def _tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def arithmetic_rows(task: str, n: int = 2000, seed: int = 1234) -> list[dict]:
    """GPT-3's arithmetic problems (Brown et al. 2020), in its file format: context '\\n\\nQ: What is 98 plus
    45?\\n\\nA:', completion ' 143'; subtraction may go negative; 1dc composes three one-digit operations."""
    rng = random.Random(f"{seed}:{task}")
    digits, word, op = ARITHMETIC[task]
    rows = []
    for _ in range(n):
        if task == "arithmetic_1dc":
            a, b, c = (rng.randint(0, 9) for _ in range(3))
            o1, o2 = rng.choice("+-*"), rng.choice("+-*")
            question, answer = f"({a}{o1}{b}){o2}{c}", eval(f"({a}{o1}{b}){o2}{c}")  # noqa: S307
            rows.append({"context": f"\n\nQ: What is {question}?\n\nA:", "completion": f" {answer}"})
            continue
        lo, hi = 10 ** (digits - 1), 10**digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"context": f"\n\nQ: What is {a} {word} {b}?\n\nA:", "completion": f" {answer}"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _yaml(work: Path, task: str, include: Path, files: dict[str, str], extra: dict | None = None) -> None:
    import yaml

    cfg = {
        "include": str(include),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        **(extra or {}),
    }
    (work / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def prepare_tasks(tasks: list[str], data: DataRoot, work: Path) -> None:
    """Write the local task YAMLs and data files for `tasks` into `work`."""
    unknown = [t for t in tasks if t not in KNOWN]
    if unknown:
        raise ConfigError(f"--harness: unknown task(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    src = _tasks_dir()
    work.mkdir(parents=True, exist_ok=True)
    none = {"training_split": None, "validation_split": None}
    for task in tasks:
        if task == "wikitext":
            raw = data.path("wikitext2/wiki.test.raw").read_text(encoding="utf-8")
            rows = [{"page": d} for d in wikitext_documents(raw)]
            f = _write_jsonl(work / "data/wikitext_test.jsonl", rows)
            _yaml(work, task, src / "wikitext/wikitext.yaml", {"test": f}, none)
        elif task == "openbookqa":
            rows = []
            for line in data.path("openbookqa/test.jsonl").read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    options = [o.split(". ", 1)[1] for o in r["options"].split("\n")]
                    rows.append(
                        {
                            "question_stem": r["question"].strip(),
                            "choices": {"text": options, "label": list("ABCD")[: len(options)]},
                            "answerKey": r["answer"].split(".", 1)[0].strip(),
                        }
                    )
            f = _write_jsonl(work / "data/openbookqa_test.jsonl", rows)
            _yaml(work, task, src / "openbookqa/openbookqa.yaml", {"test": f}, none)
        elif task.startswith("truthfulqa_mc"):
            items = json.loads(data.path("truthfulqa/mc_task.json").read_text(encoding="utf-8"))
            rows = [
                {
                    "question": it["question"],
                    **{
                        k: {"choices": list(it[k]), "labels": list(it[k].values())}
                        for k in ("mc1_targets", "mc2_targets")
                    },
                }
                for it in items
            ]
            f = _write_jsonl(work / "data/truthfulqa_validation.jsonl", rows)
            _yaml(work, task, src / f"truthfulqa/{task}.yaml", {"validation": f})
        elif task in ARITHMETIC:
            f = _write_jsonl(work / f"data/{task}.jsonl", arithmetic_rows(task))
            _yaml(work, task, src / f"arithmetic/{task}.yaml", {"validation": f})
        else:  # mmlu_<subject>
            import csv

            subject = task[len("mmlu_") :]
            files = {}
            for split in ("test", "dev"):
                with open(
                    data.path(f"mmlu/{split}/{subject}_{split}.csv"), encoding="utf-8", newline=""
                ) as fh:
                    rows = [
                        {
                            "question": r["question"],
                            "subject": subject,
                            "choices": [r[f"choice{i}"] for i in range(4)],
                            "answer": int(r["answer"]),
                        }
                        for r in csv.DictReader(fh)
                    ]
                files[split] = _write_jsonl(work / f"data/mmlu_{subject}_{split}.jsonl", rows)
            _yaml(work, task, src / f"mmlu/default/mmlu_{subject}.yaml", files, {"tag": None})


def harness_lm(lm: LocalLM):
    """daytune's LocalLM behind lm-eval's LM interface."""
    from lm_eval.api.model import LM as HarnessBase
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class DaytuneHarnessLM(HarnessBase):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = []
            for r in requests:
                ctx, cont = r.args
                pairs.append(
                    lm._truncate(*lm.encode_pair(ctx, cont))
                    if ctx
                    else ([lm.prefix_token_id], lm._encode(cont))
                )
            return lm.loglikelihood_ids(pairs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            windows, owner = [], []
            for k, r in enumerate(requests):
                ids = lm._encode(r.args[0])
                for w in get_rolling_token_windows(ids, lm.prefix_token_id, lm.max_length, context_len=1):
                    windows.append(make_disjoint_window(w))
                    owner.append(k)
            out = lm.loglikelihood_ids(windows)
            totals = [0.0] * len(requests)
            for k, (lp, _) in zip(owner, out):
                totals[k] += lp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            reqs = []
            for r in requests:
                ctx, kw = r.args
                until = kw.get("until") or []
                reqs.append(
                    GenerateRequest(
                        ctx, int(kw.get("max_gen_toks", 256)), [until] if isinstance(until, str) else until
                    )
                )
            return [g.text for g in lm.generate(reqs)]

    return DaytuneHarnessLM()


def hf_reference(lm: LocalLM, batch_size: int = 8):
    """lm-eval's own HFLM wrapped around the same model object and tokenizer."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=lm.max_length)


def run_harness(
    lm: LocalLM | object,
    tasks: list[str],
    data: DataRoot,
    work: Path,
    limit: int | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """Run lm-eval tasks offline; returns lm-eval's results dict (per-task metrics with stderr)."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    prepare_tasks(tasks, data, work)
    # include_defaults=False skips indexing lm-eval's ~10k tasks
    manager = TaskManager(include_path=str(work), include_defaults=False)
    model = harness_lm(lm) if isinstance(lm, LocalLM) else lm
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    return out


def harness_summary(out: dict) -> dict:
    """{task: {metric: value}} from lm-eval's results (the ',none' filter suffix dropped)."""
    summary = {}
    for task, metrics in out["results"].items():
        summary[task] = {
            re.sub(r",none$", "", k): v
            for k, v in metrics.items()
            if k != "alias" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return summary


def agreement(
    lm: LocalLM,
    data: DataRoot,
    work: Path,
    mmlu_per_subject: int = 20,
    truthfulqa: int = 100,
    iters: int = 1000,
) -> dict:
    """Our MMLU and TruthfulQA numbers next to lm-eval's own tasks on the same instances.

    MMLU: our 5-shot HELM-format scenario vs lm-eval's `mmlu_<subject>` with 5 shots (its own prompt) on the same
    test questions. TruthfulQA: our mc_single (5 shots, lettered options) vs lm-eval's `truthfulqa_mc1` (its fixed
    6-QA preamble, each full answer scored) on the same questions. The prompts differ by design (HELM's vs
    lm-eval's), so agreement means: the paired 95% CI of the difference (over instances) contains 0. (That the
    engine computes lm-eval's requests exactly is checked separately, request by request against HFLM.)"""
    from daytune.eval.metrics import paired_bootstrap
    from daytune.eval.scenarios import SCENARIOS, Settings

    out = {}
    mmlu = SCENARIOS["mmlu"]()
    insts = mmlu.load(data, Settings(max_instances=mmlu_per_subject))
    ours, _ = mmlu.run(lm, insts, Settings())
    tasks = [f"mmlu_{s}" for s in MMLU_CORE]
    res = run_harness(
        lm, tasks, data, work, limit=mmlu_per_subject, num_fewshot=5, log_samples=True, bootstrap_iters=0
    )
    theirs = {f"{t[5:]}/test/{s['doc_id']}": s["acc"] for t in tasks for s in res["samples"][t]}
    out["mmlu"] = _agree(ours, theirs, paired_bootstrap, iters)
    if not truthfulqa:
        return out
    tqa = SCENARIOS["truthfulqa"]()
    insts = tqa.load(data, Settings(max_instances=truthfulqa))
    ours, _ = tqa.run(lm, insts, Settings())
    docs = [int(i.id.split("/")[1]) for i in insts]
    import lm_eval
    from lm_eval.tasks import TaskManager

    prepare_tasks(["truthfulqa_mc1"], data, work)
    res = lm_eval.simple_evaluate(
        model=harness_lm(lm),
        tasks=["truthfulqa_mc1"],
        task_manager=TaskManager(include_path=str(work), include_defaults=False),
        samples={"truthfulqa_mc1": docs},
        log_samples=True,
        bootstrap_iters=0,
    )
    theirs = {f"truthfulqa/{s['doc_id']}": s["acc"] for s in res["samples"]["truthfulqa_mc1"]}
    out["truthfulqa"] = _agree(ours, theirs, paired_bootstrap, iters)
    return out


def _agree(ours: list[dict], theirs: dict[str, float], paired_bootstrap, iters: int) -> dict:
    from daytune.eval.metrics import mean_of

    shared = [r for r in ours if r["id"] in theirs]
    a = [{"x": theirs[r["id"]]} for r in shared]
    row = {"n": len(shared), "lm_eval_acc": mean_of("x")(a)}
    for key in ("likelihood_correct", "exact_match"):
        b = [{"x": r[key]} for r in shared]
        lo, hi, p = paired_bootstrap(a, b, mean_of("x"), iters=iters)
        row[f"ours_{key}"] = mean_of("x")(b)
        row[f"diff_{key}"] = {
            "value": row[f"ours_{key}"] - row["lm_eval_acc"],
            "ci_low": lo,
            "ci_high": hi,
            "p": p,
        }
        row[f"same_answer_correctness_{key}"] = sum(x["x"] == y["x"] for x, y in zip(a, b)) / max(1, len(a))
    row["agree_within_noise"] = (
        row["diff_likelihood_correct"]["ci_low"] <= 0 <= row["diff_likelihood_correct"]["ci_high"]
    )
    return row
