"""The evaluation sets daytune knows, and how to read each one's items as text for contamination checks.

They are looked up in a datasets folder laid out as `<dir>/<set>/...` (mmlu/test/*.csv, gsm8k/test.jsonl, ...).
The folder is `decontaminate.eval_dir` in a data recipe, else the recipe's `datasets_dir`, else
$DAYTUNE_DATASETS, else $DAYTUNE_HOME/datasets (default ~/.cache/daytune/datasets). Extra files (daytune's
instruction or multiple-choice JSONL, such as the samples in examples/data) are added with
`decontaminate.eval_files`, and `daytune run` adds the run's own eval files. A known set that is not found is
listed in the data card as not checked: nothing is skipped silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from daytune.data.files import ErrorPolicy, iter_objects, read_text
from daytune.errors import DataError

Item = tuple[str, str]  # (reference, text)


@dataclass(frozen=True)
class EvalSet:
    name: str
    patterns: tuple[str, ...]  # files inside the datasets folder
    read: Callable[[Path], Iterator[Item]]
    description: str
    alternatives: bool = False  # the patterns are the same set in other layouts: the first that matches wins


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(read_text(path)))
    for row in reader:
        yield reader.line_num, row  # the line the row ends on (quoted fields may span lines)


def _mmlu(path: Path) -> Iterator[Item]:
    for line, row in _csv_rows(path):
        choices = [row.get(f"choice{i}") or "" for i in range(4)]
        yield f"{path.stem}:{line}", "\n".join([row.get("question") or "", *choices])


def _truthfulqa(path: Path) -> Iterator[Item]:
    if path.suffix == ".json":  # the multiple-choice layout (mc_task.json): question + every answer
        for i, row in enumerate(json.loads(read_text(path))):
            answers = [a for key in ("mc1_targets", "mc2_targets") for a in row.get(key, {})]
            yield f"{path.name}:{i}", "\n".join([row["question"], *dict.fromkeys(answers)])
        return
    for line, row in _csv_rows(path):
        parts = [
            row.get(k) or "" for k in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
        ]
        yield f"TruthfulQA.csv:{line}", "\n".join(parts)


def _json_fields(*keys: str) -> Callable[[Path], Iterator[Item]]:
    def read(path: Path) -> Iterator[Item]:
        for where, obj in iter_objects(path, ErrorPolicy("fail")):
            text = "\n".join(str(obj[k]) for k in keys if isinstance(obj.get(k), (str, int, float)))
            yield where.rsplit("/", 1)[-1], text

    return read


def _lines(path: Path) -> Iterator[Item]:
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            yield f"{path.name}:{i}", line


def daytune_eval_file(path: Path) -> Iterator[Item]:
    """daytune's eval files: instruction JSONL (instruction, input, output) or multiple choice (question,
    choices); any other JSON rows contribute all their string fields."""
    for where, obj in iter_objects(path, ErrorPolicy("fail")):
        parts = []
        for value in obj.values():
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                parts += [v for v in value if isinstance(v, str)]
        yield where.rsplit("/", 1)[-1], "\n".join(parts)


EVAL_SETS: dict[str, EvalSet] = {
    s.name: s
    for s in [
        EvalSet(
            "mmlu", ("mmlu/test/*.csv", "mmlu/dev/*.csv"), _mmlu, "MMLU test and dev (question + choices)"
        ),
        EvalSet("gsm8k", ("gsm8k/test.jsonl",), _json_fields("question", "answer"), "GSM8K test"),
        EvalSet(
            "truthfulqa",
            ("truthfulqa/TruthfulQA.csv", "truthfulqa/mc_task.json"),
            _truthfulqa,
            "TruthfulQA (question + answers)",
            alternatives=True,
        ),
        EvalSet("bbq", ("bbq/*.jsonl",), _json_fields("context", "question"), "BBQ (context + question)"),
        EvalSet(
            "openbookqa", ("openbookqa/test.jsonl",), _json_fields("question", "options"), "OpenBookQA test"
        ),
        EvalSet("wikitext2", ("wikitext2/wiki.test.raw",), _lines, "WikiText-2 test (paragraphs)"),
        EvalSet("xsum", ("xsum_sample/test.jsonl",), _json_fields("document", "summary"), "XSum test sample"),
    ]
}


def default_datasets_dir() -> Path:
    if os.environ.get("DAYTUNE_DATASETS"):
        return Path(os.environ["DAYTUNE_DATASETS"]).expanduser()
    home = Path(os.environ.get("DAYTUNE_HOME", Path.home() / ".cache" / "daytune")).expanduser()
    return home / "datasets"


def find_files(folder: Path, es: EvalSet) -> list[Path]:
    found = [sorted(p for p in folder.glob(pat) if p.is_file()) for pat in es.patterns]
    if es.alternatives:
        return next((files for files in found if files), [])
    return sorted({p for files in found for p in files})


def read_eval_set(name: str, files: list[Path]) -> list[Item]:
    es = EVAL_SETS[name]
    items: list[Item] = []
    for f in files:
        try:
            items += [(f"{name}/{ref}", text) for ref, text in es.read(f)]
        except DataError:
            raise
        except Exception as e:  # a file in an unexpected layout
            raise DataError(
                f"{f}: cannot read as the {name} evaluation set ({type(e).__name__}: {e})"
            ) from None
    return items
