"""Row readers for the file types datasets come in, each yielding (location, row) so that every error can name
the file and the line: JSON lines (optionally gzipped), JSON arrays, JSON objects, Parquet, plain text.

A row that cannot be parsed raises `RowError`; the caller's `ErrorPolicy` decides whether that fails the step
(the default) or skips the row and counts it (`on_error: skip`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daytune.data.jsonl import NESTED
from daytune.errors import DataError

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet")
TEXT_SUFFIXES = (".txt", ".md", ".text")


class RowError(DataError):
    """One malformed row; the rest of the file can still be read."""


class ErrorPolicy:
    """`fail` raises the first malformed row; `skip` counts it (with its message) and goes on."""

    def __init__(self, mode: str = "fail"):
        if mode not in ("fail", "skip"):
            raise DataError(f"on_error: {mode!r} is not one of fail, skip")
        self.mode = mode
        self.skipped: list[str] = []

    def handle(self, err: RowError) -> None:
        if self.mode == "fail":
            raise err
        self.skipped.append(str(err))


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def list_files(path: Path, patterns: list[str] | None, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, or the matching files under a folder (sorted, so the order never depends on the file system)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"data path not found: {path}")
    if patterns:
        found = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
    else:
        found = sorted(p for p in path.rglob("*") if p.is_file() and has_suffix(p, suffixes))
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not found:
        what = ", ".join(patterns) if patterns else " or ".join(suffixes)
        raise DataError(f"{path}: no data files matching {what}")
    return found


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return path.read_bytes()


def read_text(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """JSON lines; a bad line raises RowError naming it, and reading can go on after it."""
    raw = _read_bytes(path)
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield where, RowError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            obj = RowError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            obj = RowError(f"{where}: {NESTED}")
        yield where, obj


def iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array yields its elements, each located by the line it starts on; any other value is one row."""
    text = read_text(path)
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(e: json.JSONDecodeError):
        return DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a broken JSON file cannot be "
            "read past this point"
        )

    i = skip_ws(0)
    if i >= n:
        return
    if text[i] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        except RecursionError:
            raise DataError(f"{path}: {NESTED}") from None
        yield f"{path}:{text.count(chr(10), 0, i) + 1}", obj
        return
    line, pos = 1 + text.count("\n", 0, i), i
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        line += text.count("\n", pos, i)
        pos = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e) from None
        except RecursionError:
            raise DataError(f"{path}:{line}: {NESTED}") from None
        yield f"{path}:{line}", obj
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            return
        line += text.count("\n", pos, i)
        raise DataError(f"{path}:{line}: not valid JSON (expected ',' or ']' after an array element)")


def iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install 'daytune[hub]'), or convert it to JSONL"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}#row{i}", row


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of any structured data file; RowError values stand for rows that could not be parsed."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from iter_jsonl(path)
    elif name.endswith((".json", ".json.gz")):
        yield from iter_json(path)
    elif name.endswith(".parquet"):
        yield from iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type (expected {', '.join(JSON_SUFFIXES)})")


def iter_objects(path: Path, policy: ErrorPolicy) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows that are JSON objects; anything else goes through the error policy."""
    for where, obj in iter_rows(path):
        if isinstance(obj, RowError):
            policy.handle(obj)
        elif not isinstance(obj, dict):
            policy.handle(RowError(f"{where}: expected a JSON object, got {type(obj).__name__}"))
        else:
            yield where, obj
