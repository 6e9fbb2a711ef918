"""Readers for JSONL files. Every error names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daytune.data.records import text_field
from daytune.errors import DataError

NESTED = "JSON nested too deeply to read (thousands of levels of arrays or objects)"


def read_jsonl(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    count = 0
    with open(path, "rb") as f:  # binary: a decoding error is reported on its own line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may start the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: {NESTED}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            count += 1
            yield lineno, obj


def read_instructions(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Instruction records: `instruction` and `output` required, `input` optional."""
    path = Path(path)
    rows = []
    for lineno, obj in read_jsonl(path, limit):
        rows.append(
            {
                "instruction": text_field(obj, "instruction", f"{path}:{lineno}", True),
                "input": text_field(obj, "input", f"{path}:{lineno}", False),
                "output": text_field(obj, "output", f"{path}:{lineno}", True),
            }
        )
    if not rows:
        raise DataError(f"{path}: no records (expected JSON lines with 'instruction' and 'output')")
    return rows


def read_multiple_choice(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice records: `question`, `choices` (list of strings), `answer` (index into choices)."""
    path = Path(path)
    rows = []
    for lineno, obj in read_jsonl(path, limit):
        question = text_field(obj, "question", f"{path}:{lineno}", True)
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}:{lineno}: 'choices' must be a list of at least two strings")
        answer = obj.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f"{path}:{lineno}: 'answer' must be an index into choices (0..{len(choices) - 1})"
            )
        rows.append(
            {"question": question, "choices": choices, "answer": answer, "subject": obj.get("subject", "")}
        )
    if not rows:
        raise DataError(f"{path}: no records (expected JSON lines with 'question', 'choices', 'answer')")
    return rows


def read_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Training records in daytune's schema: instruction/input/output, multi-turn `messages`, or `text`."""
    from daytune.data.records import parse_record

    path = Path(path)
    rows = [parse_record(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path, limit)]
    if not rows:
        raise DataError(
            f"{path}: no records (expected JSON lines with 'instruction' and 'output', 'messages', or 'text')"
        )
    return rows
