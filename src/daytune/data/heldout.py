"""Tasks held out of training, so that evaluation on them measures what a model does on tasks it never saw.

A data recipe's `heldout_tasks:` names Super-NaturalInstructions tasks (their file names without `.json`; `unseen`
stands for the evaluation suite's default set below): the tasks a run's `unseen` suite scores. `validation_tasks:`
are held out the same way but never scored as the test: a sweep tunes on them (its objective), so its test tasks
stay untouched by the search. The data stage refuses to train on either, by task and by
`Source`: every other task built from the same source dataset is refused too (two tasks from one source count as
one), since its instances would leak into the held-out one. Naming a refused task explicitly in a source
(`tasks:` or `path:`) is an error; a folder or a wildcard pattern that would include one leaves it out and the
data card counts it. The held-out tasks' instances are added to decontamination as well, so that no other source
(LIMA carries some SNI examples) brings them back.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from daytune.errors import ConfigError, DataError

# The `unseen` evaluation suite's tasks (docs/eval.md says why these): the Super-NaturalInstructions paper's
# held-out categories where the 42 open tasks have one, spanning label formats, each from a source no other of
# the 42 tasks uses. Classification: CB entailment (3 labels), COPA cause/effect (A/B), poem sentiment (2),
# debate sentence type (4). Extraction: GAP coreference (a name from the text), Twitter location entities.
# Short generation: BARD word analogy (one word), Gigaword headlines, Disfl-QA question repair, E2E data-to-text.
UNSEEN_TASKS: tuple[str, ...] = (
    "task1388_cb_entailment",
    "task1393_superglue_copa_text_completion",
    "task833_poem_sentiment_classification",
    "task375_classify_type_of_sentence_in_debate",
    "task891_gap_coreference_resolution",
    "task1452_location_entity_extraction_btc_corpus",
    "task1152_bard_analogical_reasoning_causation",
    "task288_gigaword_summarization",
    "task1622_disfl_qa_text_modication",
    "task957_e2e_nlg_text_generation_generate",
)
ALIAS = "unseen"  # in heldout_tasks: the UNSEEN_TASKS above
HELD_OUT = "held out (heldout_tasks)"
VALIDATION = "held out (validation_tasks)"
SAME_SOURCE = "same Source as a held-out task"
SNI_FOLDER = "natural_instructions"  # where a datasets folder keeps the SNI task files


@dataclass(frozen=True)
class TaskInfo:
    name: str
    path: Path
    sources: frozenset[str]  # the task's `Source` field, split into dataset names
    categories: tuple[str, ...]


def source_names(value) -> frozenset[str]:
    """SNI's `Source` as a set of dataset names: ["wsc; enhanced_wsc"] -> {wsc, enhanced_wsc}."""
    items = value if isinstance(value, list) else [value]
    names = set()
    for item in items:
        names.update(n.strip().lower() for n in re.split(r"[;,]", str(item)) if n.strip())
    return frozenset(names)


_INDEX_CACHE: dict[tuple[str, float], TaskInfo] = {}


def _task_info(path: Path) -> TaskInfo | None:
    key = (str(path), path.stat().st_mtime)
    if key not in _INDEX_CACHE:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read as a Super-NaturalInstructions task file ({e})") from None
        if not isinstance(obj, dict) or "Instances" not in obj:
            return None
        cats = obj.get("Categories") or []
        _INDEX_CACHE[key] = TaskInfo(
            path.name[: -len(".json")],
            path,
            source_names(obj.get("Source") or []),
            tuple(str(c) for c in (cats if isinstance(cats, list) else [cats])),
        )
    return _INDEX_CACHE[key]


def task_index(places: list[Path]) -> dict[str, TaskInfo]:
    """Every SNI task file found in `places` (task files, or folders of them), by task name; the first wins."""
    index: dict[str, TaskInfo] = {}
    for place in places:
        files = [place] if place.is_file() else sorted(place.glob("task*.json")) if place.is_dir() else []
        for f in files:
            name = f.name[: -len(".json")]
            if name not in index and f.name.endswith(".json"):
                info = _task_info(f)
                if info is not None:
                    index[name] = info
    return index


@dataclass
class HeldOut:
    tasks: list[str] = field(default_factory=list)  # the held-out (test) tasks, as named (alias expanded)
    validation: list[str] = field(default_factory=list)  # held out for tuning, not scored as unseen
    refused: dict[str, str] = field(default_factory=dict)  # every task the data stage refuses -> the reason
    because: dict[str, str] = field(
        default_factory=dict
    )  # a refused sibling -> the held-out task it shares with
    index: dict[str, TaskInfo] = field(default_factory=dict)

    def card(self) -> dict:
        return {
            "tasks": self.tasks,
            "validation_tasks": self.validation,
            "sources": {t: sorted(self.index[t].sources) for t in self.tasks + self.validation},
            "refused": dict(sorted(self.refused.items())),
            "same_source_as": dict(sorted(self.because.items())),
        }


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        out += list(UNSEEN_TASKS) if n == ALIAS else [n]
    return list(dict.fromkeys(out))


def resolve(names: list[str], places: list[Path], validation: list[str] = ()) -> HeldOut:
    """The held-out tasks (and validation tasks) and every task refused with them; an unknown name is an error
    naming the field."""
    if not names and not validation:
        return HeldOut()
    index = task_index(places)
    tasks, val = expand(names), [t for t in expand(list(validation)) if t not in expand(names)]
    for field_name, given in (("heldout_tasks", tasks), ("validation_tasks", val)):
        for i, name in enumerate(given):
            if name not in index:
                near = difflib.get_close_matches(name, list(index), n=3, cutoff=0.5)
                where = ", ".join(str(p) for p in places) or "no folder"
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise ConfigError(
                    f"{field_name}[{i}]: unknown task '{name}': no Super-NaturalInstructions task file "
                    f"{name}.json in {where}{hint} (set datasets_dir to the folder that holds {SNI_FOLDER}/)"
                )
    refused = {t: HELD_OUT for t in tasks} | {t: VALIDATION for t in val}
    held = HeldOut(tasks, val, refused, {}, index)
    for t in tasks + val:
        for other, info in index.items():
            if other not in held.refused and info.sources & index[t].sources:
                held.refused[other] = SAME_SOURCE
                held.because[other] = t
    return held


def _explicit(pattern: str) -> bool:
    return not any(ch in pattern for ch in "*?[")


def check_sources(held: HeldOut, sources: list, formats: list[str]) -> None:
    """A source that names a refused task itself (in `tasks:` or as its `path:`) is an error naming both
    fields: the recipe asks to train on what it also holds out."""
    for i, (s, fmt) in enumerate(zip(sources, formats)):
        if fmt != "sni":
            continue
        named = [(f"sources[{i}].tasks", p) for p in s.tasks if _explicit(p)]
        if s.path and Path(s.path).is_file() and Path(s.path).name.endswith(".json"):
            named.append((f"sources[{i}].path", Path(s.path).name[: -len(".json")]))
        for where, task in named:
            if task in held.refused:
                why = (
                    "it is in heldout_tasks"
                    if held.refused[task] == HELD_OUT
                    else "it is in validation_tasks"
                    if held.refused[task] == VALIDATION
                    else f"it shares its Source ({', '.join(sorted(held.index[task].sources))}) with held-out "
                    f"task {held.because[task]}"
                )
                raise ConfigError(
                    f"{where}: task '{task}' is held out ({why}): the held-out tasks are evaluated as tasks the "
                    "model never saw, so no source may train on them. Remove it from one of the two fields."
                )


def heldout_items(held: HeldOut) -> list[tuple[str, str]]:
    """The held-out tasks' instances as decontamination items: (reference, input + first output)."""
    items = []
    for t in held.tasks + held.validation:
        obj = json.loads(held.index[t].path.read_text(encoding="utf-8"))
        for i, inst in enumerate(obj.get("Instances") or []):
            if isinstance(inst, dict):
                outputs = inst.get("output") or [""]
                items.append((f"heldout/{t}:{i}", f"{inst.get('input', '')}\n{outputs[0]}"))
    return items
