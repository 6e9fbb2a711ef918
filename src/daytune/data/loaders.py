"""Loaders: one function per published format, each turning files into daytune records (see records.py).

Formats: dolly, oasst1, lima, sni (Super-NaturalInstructions), flan, gsm8k, alpaca, messages (ShareGPT-style chat),
text (continued pre-training), daytune (the schema `data prepare` writes). Each reads a local file or folder;
`hub.fetch_dataset` brings hub files to a local folder first. A malformed row raises `RowError` naming the file and
line, and the `ErrorPolicy` decides whether that fails the step or is skipped and counted.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from daytune.data.files import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    ErrorPolicy,
    RowError,
    has_suffix,
    iter_json,
    iter_objects,
    read_text,
)
from daytune.data.records import check_messages, make_record, parse_record
from daytune.data.templates import tk_instruct_prompt
from daytune.errors import DataError


@dataclass
class LoadOptions:
    few_shot: int = 0  # sni: positive examples shown after the definition
    prompt: str = "definition"  # sni: definition | tk-instruct (data/recipe.py)
    max_per_task: int | None = None  # sni, flan: at most N rows per task (seeded sample)
    tasks: list[str] = field(default_factory=list)  # sni, flan: task-name patterns to keep (default all)
    exclude_tasks: list[str] = field(default_factory=list)  # sni, flan: task-name patterns to drop
    refused: dict[str, str] = field(
        default_factory=dict
    )  # sni: held-out tasks (and their siblings) -> reason
    languages: list[str] = field(default_factory=lambda: ["en"])  # oasst1: conversation languages ([] = all)
    text_split: str = "paragraph"  # text: paragraph | line | file
    chunk_words: int = 200  # text: paragraphs are joined into chunks of up to this many words
    seed: int = 42


@dataclass
class Loaded:
    records: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    licences: dict[str, str] = field(default_factory=dict)  # per task, where the data states it
    dropped: dict[str, int] = field(default_factory=dict)  # rows a loader leaves out by design, with reason
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def _str(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required and key in obj:
            raise RowError(f"{where}: field '{key}' is null; expected a string")
        if required:
            raise RowError(
                f"{where}: missing field '{key}' (fields present: {', '.join(sorted(obj)) or 'none'})"
            )
        return ""
    if not isinstance(value, str):
        raise RowError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _rows(files: list[Path], policy: ErrorPolicy, convert) -> list[dict]:
    """Apply `convert(where, obj, n)` to every object row; its RowErrors go through the policy."""
    out = []
    for path in files:
        for where, obj in iter_objects(path, policy):
            try:
                rec = convert(where, obj, len(out))
            except RowError as e:
                policy.handle(e)
                continue
            if rec is not None:
                out.append(rec)
    return out


# ---- single-turn instruction formats ------------------------------------------------------------------------


def _single_turn(
    instruction: str, output: str, input: str | None = None, meta: str | None = None, clean=None
):
    """A loader for formats where each row is one instruction/response pair, named by the format's own fields."""

    def load(files, name, opts, policy, out: Loaded) -> None:
        def convert(where, obj, n):
            response = _str(obj, output, where)
            return make_record(
                source=name,
                id=f"{name}-{n}",
                instruction=_str(obj, instruction, where),
                input=_str(obj, input, where, False) if input else "",
                output=clean(response) if clean else response,
                meta={meta: obj[meta]} if meta and isinstance(obj.get(meta), str) else None,
            )

        out.records += _rows(files, policy, convert)

    return load


_CALCULATOR = re.compile(r"<<[^<>]*>>")

# databricks-dolly-15k: {instruction, context, response, category}
load_dolly = _single_turn("instruction", "response", input="context", meta="category")
# Alpaca format: a JSON array (or JSON lines) of {instruction, input, output}
load_alpaca = _single_turn("instruction", "output", input="input")
# GSM8K: {question, answer}; the answer's calculator annotations (<<48/2=24>>) are a dataset artifact
load_gsm8k = _single_turn("question", "answer", clean=lambda text: _CALCULATOR.sub("", text))


def load_daytune(files, name, opts, policy, out: Loaded) -> None:
    """daytune's own schema: instruction/input/output, messages or text (what `data prepare` writes)."""

    def convert(where, obj, n):
        try:
            rec = parse_record(obj, where)
        except DataError as e:
            raise RowError(str(e)) from None
        rec["id"] = rec.get("id") or f"{name}-{n}"
        rec["source"] = name
        return rec

    out.records += _rows(files, policy, convert)


# ---- task collections -----------------------------------------------------------------------------------------


def _task_refused(task: str, opts: LoadOptions, out: Loaded, n: int = 1) -> bool:
    """A held-out task (or one sharing its source) is left out and counted, whatever selected it."""
    if task in opts.refused:
        out.drop(opts.refused[task], n)
        return True
    return False


def _task_selected(task: str, opts: LoadOptions) -> bool:
    if opts.tasks and not any(fnmatch.fnmatch(task, p) for p in opts.tasks):
        return False
    return not any(fnmatch.fnmatch(task, p) for p in opts.exclude_tasks)


def _cap_per_task(records: list[dict], opts: LoadOptions, out: Loaded) -> list[dict]:
    if opts.max_per_task is None:
        return records
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[r.get("meta", {}).get("task", "")].append(i)
    rng = random.Random(opts.seed)
    keep: set[int] = set()
    for task in sorted(by_task):
        idx = by_task[task]
        keep.update(idx if len(idx) <= opts.max_per_task else rng.sample(idx, opts.max_per_task))
    if len(keep) < len(records):
        out.drop("max_per_task", len(records) - len(keep))
    return [r for i, r in enumerate(records) if i in keep]


@dataclass(frozen=True)
class _TaskFields:
    """Where a task collection exported one instance per line keeps each part (SNI and FLAN name them apart)."""

    task: tuple[str, ...]  # the task name: the first of these fields that is set
    instruction: str
    input: str | None  # None: the instruction field holds the input too
    own_id: bool  # a row's own `id` names its record
    targets: str  # what the error says 'targets' must be


_SNI_ROW = _TaskFields(("task_name", "task"), "definition", "inputs", True, "a string or a list of strings")
_FLAN_ROW = _TaskFields(("task_name", "_task_name", "task"), "inputs", None, False, "a string")


def _task_row(fields: _TaskFields, name: str, opts: LoadOptions, out: Loaded, where: str, obj: dict, n: int):
    """One exported task-collection row (its first target is the response), or None for an unselected task."""
    task = str(next((obj[k] for k in fields.task if obj.get(k)), ""))
    if _task_refused(task, opts, out):
        return None
    if not _task_selected(task, opts):
        out.drop("task not selected")
        return None
    targets = obj.get("targets")
    if isinstance(targets, list):
        targets = targets[0] if targets else None
    if not isinstance(targets, str):
        raise RowError(f"{where}: 'targets' must be {fields.targets}")
    return make_record(
        source=name,
        id=str(obj.get("id") or f"{name}-{n}") if fields.own_id else f"{name}-{n}",
        instruction=_str(obj, fields.instruction, where),
        input=_str(obj, fields.input, where) if fields.input else "",
        output=targets,
        meta={"task": task} if task else None,
    )


def _sni_instruction(definition: str, positives: list[dict], k: int) -> str:
    parts = [definition.strip()]
    for i, ex in enumerate(positives[:k], start=1):
        parts.append(
            f"Example {i}:\nInput: {str(ex.get('input', '')).strip()}\nOutput: {str(ex.get('output', '')).strip()}"
        )
    return "\n\n".join(parts)


def load_sni(files, name, opts, policy, out: Loaded) -> None:
    """Super-NaturalInstructions task files ({Definition, Positive Examples, Instances, Instance License}), or rows
    exported one instance per line ({task_name, id, definition, inputs, targets})."""
    records: list[dict] = []
    for path in files:
        if path.name.lower().endswith(".json"):
            for where, task_obj in iter_json(path):
                if isinstance(task_obj, dict) and "Instances" in task_obj:
                    records += _sni_task(path, where, task_obj, name, opts, policy, out)
                    break
                raise DataError(f"{where}: not a Super-NaturalInstructions task file (no 'Instances')")
            continue

        records += _rows([path], policy, partial(_task_row, _SNI_ROW, name, opts, out))
    out.records += _cap_per_task(records, opts, out)


def _sni_task(path: Path, where: str, task_obj: dict, name: str, opts, policy, out: Loaded) -> list[dict]:
    task = path.name[: -len(".json")]
    if _task_refused(task, opts, out, len(task_obj.get("Instances") or [])):
        return []
    if not _task_selected(task, opts):
        out.drop("task not selected", len(task_obj.get("Instances") or []))
        return []
    definition = task_obj.get("Definition")
    if isinstance(definition, list):
        definition = "\n".join(str(d) for d in definition)
    if not isinstance(definition, str) or not definition.strip():
        raise DataError(f"{where}: task file has no 'Definition'")
    licence = task_obj.get("Instance License") or ["unknown"]
    out.licences[task] = ", ".join(licence) if isinstance(licence, list) else str(licence)
    positives = [p for p in task_obj.get("Positive Examples") or [] if isinstance(p, dict)]
    instruction = _sni_instruction(definition, positives, opts.few_shot)
    instances = task_obj.get("Instances")
    if not isinstance(instances, list):
        raise DataError(f"{where}: 'Instances' must be a list")
    records = []
    for i, inst in enumerate(instances):
        at = f"{path}: Instances[{i}]"
        try:
            if not isinstance(inst, dict):
                raise RowError(f"{at}: expected an object with input and output")
            outputs = inst.get("output")
            if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
                raise RowError(f"{at}: 'output' must be a non-empty list of strings")
            records.append(
                make_record(
                    source=name,
                    id=str(inst.get("id") or f"{task}-{i}"),
                    **(
                        {
                            "instruction": tk_instruct_prompt(
                                definition, positives, _str(inst, "input", at), opts.few_shot
                            ),
                            "input": "",
                        }
                        if opts.prompt == "tk-instruct"
                        else {"instruction": instruction, "input": _str(inst, "input", at)}
                    ),
                    output=outputs[0],
                    # the instance's own input: what near-dedup compares when the prompt carries the definition
                    meta={"task": task, "instance_input": _str(inst, "input", at)}
                    if opts.prompt == "tk-instruct"
                    else {"task": task},
                )
            )
        except RowError as e:
            policy.handle(e)
    return records


def load_flan(files, name, opts, policy, out: Loaded) -> None:
    """FLAN-style rows: {inputs, targets} with a task name (task_name, _task_name or task)."""
    rows = _rows(files, policy, partial(_task_row, _FLAN_ROW, name, opts, out))
    out.records += _cap_per_task(rows, opts, out)


# ---- conversations --------------------------------------------------------------------------------------------


def load_lima(files, name, opts, policy, out: Loaded) -> None:
    """LIMA, either as published by GAIR ({conversations: [user, assistant, ...], source}) or in the converted
    form ({instruction, input, output, history: [[user, assistant], ...]})."""

    def convert(where, obj, n):
        if "conversations" in obj:
            turns = obj["conversations"]
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise RowError(f"{where}: 'conversations' must be a list of strings")
            if len(turns) % 2:
                turns = turns[:-1]  # a final prompt without an answer trains nothing
            if not turns:
                out.drop("no response")
                return None
            messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
            src = obj.get("source")
            return make_record(
                source=name, id=f"{name}-{n}", messages=messages, meta={"origin": src} if src else None
            )
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history
        ):
            raise RowError(f"{where}: 'history' must be a list of [user, assistant] string pairs")
        instruction = _str(obj, "instruction", where)
        extra = _str(obj, "input", where, False)
        messages = []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages += [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": _str(obj, "output", where)},
        ]
        return make_record(source=name, id=f"{name}-{n}", messages=messages)

    out.records += _rows(files, policy, convert)


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


# (list field, role key, text key): OpenAI-style messages, then ShareGPT conversations
_CHAT_LAYOUTS = (("messages", "role", "content"), ("conversations", "from", "value"))


def load_messages(files, name, opts, policy, out: Loaded) -> None:
    """Chat rows: {messages: [{role, content}]} (OpenAI style) or {conversations: [{from, value}]} (ShareGPT)."""

    def convert(where, obj, n):
        layout = next((lay for lay in _CHAT_LAYOUTS if lay[0] in obj), None)
        if layout is None:
            raise RowError(
                f"{where}: expected 'messages' or 'conversations' (fields present: {', '.join(sorted(obj))})"
            )
        key, role_key, text_key = layout
        raw = obj[key]
        if not isinstance(raw, list):
            raise RowError(f"{where}: '{key}' must be a list")
        turns = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise RowError(f"{where}: {key}[{i}] must be an object with {role_key} and {text_key}")
            turns.append((m.get(role_key), m.get(text_key), i))
        messages = []
        for role, content, i in turns:
            mapped = _SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
            if mapped is None:
                raise RowError(
                    f"{where}: turn {i} has role {role!r}; expected user/human, assistant/gpt or system"
                )
            if not isinstance(content, str):
                raise RowError(f"{where}: turn {i} content must be a string")
            messages.append({"role": mapped, "content": content})
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()  # trailing prompts without an answer train nothing
        if not any(m["role"] == "assistant" for m in messages):
            out.drop("no assistant turn")
            return None
        try:
            messages = check_messages(messages, where)
        except DataError as e:
            raise RowError(str(e)) from None
        return make_record(source=name, id=str(obj.get("id") or f"{name}-{n}"), messages=messages)

    out.records += _rows(files, policy, convert)


def load_oasst1(files, name, opts, policy, out: Loaded) -> None:
    """OpenAssistant oasst1: message rows (message_id, parent_id, role, text, lang, rank, ...) or whole trees
    ({message_tree_id, prompt: {..., replies: [...]}}). Each tree gives one conversation: from the root prompt,
    follow the best-ranked reply at every level (rank 0 is best; unranked replies come last)."""
    messages = _oasst_messages(files, policy)
    excluded = {
        mid
        for mid, m in messages.items()
        if m.get("deleted") or m.get("synthetic") or m.get("review_result") is False
    }
    if excluded:
        out.drop("deleted, synthetic or failed review", len(excluded))
    children: dict[str | None, list[dict]] = defaultdict(list)
    for mid, m in messages.items():
        if mid not in excluded:
            children[m.get("parent_id")].append(m)
    langs = {lang.lower() for lang in opts.languages}
    for root in sorted(children[None], key=lambda m: m["message_id"]):
        if root["role"] != "prompter":
            continue
        if langs and str(root.get("lang", "")).lower() not in langs:
            out.drop("language not selected")
            continue
        path_msgs = _best_path(root, children)
        if not path_msgs:
            out.drop("no assistant reply")
            continue
        roles = [m["role"] for m in path_msgs]
        if any(a == b for a, b in zip(roles, roles[1:])):
            policy.handle(RowError(f"{root['_where']}: tree {root['message_id']}: roles do not alternate"))
            continue
        conversation = [
            {"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"]}
            for m in path_msgs
        ]
        tree_id = str(root.get("message_tree_id") or root["message_id"])
        out.records.append(
            make_record(
                source=name, id=f"{name}-{tree_id}", messages=conversation, meta={"lang": root.get("lang")}
            )
        )


def _oasst_messages(files: list[Path], policy: ErrorPolicy) -> dict[str, dict]:
    """Every message of the files by id, from message rows or whole trees (each remembers where it was read)."""
    messages: dict[str, dict] = {}
    for path in files:
        for where, obj in iter_objects(path, policy):
            try:
                if "prompt" in obj and "message_id" not in obj:
                    _oasst_walk_tree(messages, where, obj["prompt"], None)
                else:
                    _oasst_add(messages, where, obj)
            except RowError as e:
                policy.handle(e)
    return messages


def _oasst_add(messages: dict[str, dict], where: str, m: dict) -> None:
    for key in ("message_id", "role", "text"):
        if not isinstance(m.get(key), str):
            raise RowError(f"{where}: field '{key}' must be a string")
    if m["role"] not in ("prompter", "assistant"):
        raise RowError(f"{where}: role {m['role']!r} is not prompter or assistant")
    rank = m.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise RowError(f"{where}: 'rank' must be a number or null")
    messages[m["message_id"]] = {**m, "_where": where}


def _oasst_walk_tree(messages: dict[str, dict], where: str, node: dict, parent: str | None) -> None:
    if not isinstance(node, dict):
        raise RowError(f"{where}: a tree node must be an object")
    _oasst_add(messages, where, {**node, "parent_id": parent})
    for child in node.get("replies") or []:
        _oasst_walk_tree(messages, where, child, node["message_id"])


def _reply_order(m: dict) -> tuple:
    """Best reply first: ranked before unranked, then by rank, creation date and id."""
    return (m.get("rank") is None, m.get("rank") or 0, str(m.get("created_date", "")), m["message_id"])


def _best_path(root: dict, children: dict[str | None, list[dict]]) -> list[dict]:
    """From the root prompt down the best reply at every level, ending on an assistant turn ([] if none)."""
    path = [root]
    while children.get(path[-1]["message_id"]):
        path.append(min(children[path[-1]["message_id"]], key=_reply_order))
    while path and path[-1]["role"] != "assistant":
        path.pop()
    return path


# ---- plain text -----------------------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n\s*\n")


def _chunks(text: str, opts: LoadOptions) -> list[str]:
    text = text.replace("\r\n", "\n")
    if opts.text_split == "file":
        return [text.strip()] if text.strip() else []
    pieces = text.split("\n") if opts.text_split == "line" else _BLANK_LINES.split(text)
    pieces = [p.strip() for p in pieces if p.strip()]
    chunks, current, words = [], [], 0
    for p in pieces:
        n = len(p.split())
        if current and words + n > opts.chunk_words:
            chunks.append("\n\n".join(current) if opts.text_split == "paragraph" else "\n".join(current))
            current, words = [], 0
        current.append(p)
        words += n
    if current:
        chunks.append("\n\n".join(current) if opts.text_split == "paragraph" else "\n".join(current))
    return chunks


def load_text(files, name, opts, policy, out: Loaded) -> None:
    """Plain text for continued pre-training: .txt/.md files split into chunks, or rows with a 'text' field."""
    if opts.text_split not in ("paragraph", "line", "file"):
        raise DataError(f"text_split: {opts.text_split!r} is not one of paragraph, line, file")
    for path in files:
        if has_suffix(path, TEXT_SUFFIXES):
            for i, chunk in enumerate(_chunks(read_text(path), opts)):
                out.records.append(make_record(source=name, id=f"{name}-{path.stem}-{i}", text=chunk))
            continue

        def convert(where, obj, n):
            return make_record(
                source=name, id=str(obj.get("id") or f"{name}-{n}"), text=_str(obj, "text", where)
            )

        out.records += _rows([path], policy, convert)


FORMATS = {
    "dolly": load_dolly,
    "oasst1": load_oasst1,
    "lima": load_lima,
    "sni": load_sni,
    "flan": load_flan,
    "gsm8k": load_gsm8k,
    "alpaca": load_alpaca,
    "messages": load_messages,
    "text": load_text,
    "daytune": load_daytune,
}


def data_files(fmt: str, path: Path, patterns: list[str] | None) -> list[Path]:
    """The files of a source folder that its format reads."""
    from daytune.data.files import list_files

    if fmt == "text":
        return list_files(path, patterns, TEXT_SUFFIXES + JSON_SUFFIXES)
    if fmt == "daytune" and path.is_dir() and not patterns and (path / "train.jsonl").is_file():
        return [path / "train.jsonl"]  # a prepared folder: its training rows
    files = list_files(path, patterns, JSON_SUFFIXES)
    if fmt == "sni" and path.is_dir() and not patterns:
        files = [f for f in files if f.name.startswith("task") or not f.name.endswith(".json")]
    return files


def load(fmt: str, files: list[Path], name: str, opts: LoadOptions, policy: ErrorPolicy) -> Loaded:
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    out = Loaded(files=[str(f) for f in files])
    FORMATS[fmt](files, name, opts, policy, out)
    return out
