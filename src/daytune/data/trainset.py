"""What a training run reads: a JSONL file or a prepared folder (`daytune data prepare`), and the fingerprint
that ties the run to the exact bytes it trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from daytune.data.jsonl import read_records
from daytune.errors import DataError
from daytune.fileio import sha256_file

CARD = "data_card.json"


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over each file's name and content: the same data gives the same fingerprint wherever it lives."""
    outer = hashlib.sha256()
    for p in paths:
        outer.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return "sha256:" + outer.hexdigest()


def prepared_files(folder: Path) -> list[Path]:
    return [p for p in (folder / "train.jsonl", folder / "val.jsonl") if p.is_file()]


def resolve_train(train: str | None) -> tuple[Path, Path | None]:
    """(the JSONL to train on, the prepared folder it belongs to or None)."""
    if train is None:
        raise DataError(
            "data.train: no training data given (a JSONL with instruction, optional input, output, or a folder "
            "written by `daytune data prepare`); or set data.prepare to a data recipe"
        )
    path = Path(train)
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise DataError(f"data.train: {path} is a folder without train.jsonl (not a prepared dataset)")
        return path / "train.jsonl", path
    return path, None


def dataset_fingerprint(train: str) -> str:
    path, folder = resolve_train(train)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return fingerprint_files(prepared_files(folder) if folder else [path])


def load_train_data(dcfg) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records to train on, and what the run records about them (path, fingerprint, data card)."""
    path, folder = resolve_train(dcfg.train)
    records = read_records(path, dcfg.max_rows)
    info: dict[str, Any] = {"train": str(path), "rows": len(records)}
    if folder is not None:
        info["fingerprint"] = fingerprint_files(prepared_files(folder))
        card_path = folder / CARD
        if card_path.is_file():
            card = json.loads(card_path.read_text(encoding="utf-8"))
            if card.get("fingerprint") != info["fingerprint"]:
                raise DataError(
                    f"{folder}: train.jsonl/val.jsonl changed after `daytune data prepare` wrote {CARD} (files "
                    f"{info['fingerprint'][:19]}, card {str(card.get('fingerprint'))[:19]}); prepare it again, or "
                    f"train on the file itself (data.train: {path})"
                )
            info.update(dataset=card.get("name"), card=str(card_path))
        val = folder / "val.jsonl"
        if val.is_file() and val.stat().st_size > 0:
            info["val"] = str(val)  # the default validation set of a run training on the folder
    else:
        info["fingerprint"] = fingerprint_files([path])
    pinned = getattr(dcfg, "fingerprint", None)
    if pinned and pinned != info["fingerprint"]:
        raise DataError(
            f"data.fingerprint: the recipe pins {pinned} but {dcfg.train} is {info['fingerprint']}: the data "
            "changed since the run started; restore it, or start a new run"
        )
    return records, info
