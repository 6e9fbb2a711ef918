"""`daytune data prepare`: a data recipe in, a dataset folder out.

    provenance gate -> load each source -> filters (empty, min/max tokens, truncated) -> exact dedup -> near dedup
    (MinHash) -> decontamination (n-gram overlap with the evaluation sets) -> per-source selection (max_rows,
    weight) -> validation split -> train.jsonl, val.jsonl, data_card.json, data_card.md, token_lengths.png

Every row that does not reach the output is counted in the card with its step, its reason and a few examples; the
card's fingerprint is what training runs record. The folder is written to a temporary place and moved into
`--out` whole, so a failed prepare leaves nothing half-written, and an existing folder is never overwritten unless
asked (`--force`, which swaps the new folder in atomically).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daytune.data import card as cards
from daytune.data import heldout, loaders
from daytune.data.decontam import EvalIndex
from daytune.data.dedup import exact_duplicates, near_duplicates
from daytune.data.evalsets import (
    EVAL_SETS,
    daytune_eval_file,
    default_datasets_dir,
    find_files,
    read_eval_set,
)
from daytune.data.files import ErrorPolicy
from daytune.data.hub import fetch_dataset
from daytune.data.recipe import DataRecipe, format_of, label_of, load_options, provenance_of
from daytune.data.records import record_text, responses
from daytune.data.sources import SOURCES, Provenance, check_provenance, licence_allows_commercial
from daytune.data.templates import render_segments
from daytune.data.trainset import fingerprint_files
from daytune.errors import ConfigError, DataError
from daytune.fileio import replace_dir_atomic, temp_dir_beside

STEPS = [
    "loaded",
    "after_filters",
    "after_exact_dedup",
    "after_near_dedup",
    "after_decontamination",
    "selected",
]


@dataclass
class Removal:
    step: str
    reason: str
    count: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)


class Ledger:
    """Every removed row, by step and reason: what the card reports."""

    def __init__(self, examples_per_reason: int):
        self.k = examples_per_reason
        self.entries: dict[tuple[str, str], Removal] = {}

    def remove(
        self, step: str, reason: str, source: str, row_id: str = "", detail: str = "", text: str = "", n=1
    ):
        r = self.entries.setdefault((step, reason), Removal(step, reason))
        r.count += n
        r.by_source[source] = r.by_source.get(source, 0) + n
        if len(r.examples) < self.k and (row_id or detail or text):
            r.examples.append(
                {"id": row_id, "source": source, "detail": detail, "text": cards.clip(text, 300)}
            )

    def as_list(self) -> list[dict[str, Any]]:
        return [vars(r) for r in self.entries.values()]


@dataclass
class Books:
    """What the steps report for the card as they go: removed rows, the rows each source has after each step,
    where each source came from, the decontamination check, warnings and each step's seconds."""

    ledger: Ledger
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> step -> rows
    sources: list[dict[str, Any]] = field(default_factory=list)
    decontamination: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    heldout: heldout.HeldOut = field(default_factory=heldout.HeldOut)

    def keep(self, step: str, keep: list[bool], candidates: list[dict]) -> list[dict]:
        """The candidates marked to keep; counts what each source has left after `step`."""
        kept = [r for r, k in zip(candidates, keep) if k]
        n_by_source: dict[str, int] = defaultdict(int)
        for r in kept:
            n_by_source[r["source"]] += 1
        for label in self.counts:
            self.counts[label][step] = n_by_source.get(label, 0)
        return kept

    @contextmanager
    def timed(self, step: str):
        t0 = time.perf_counter()
        yield
        self.seconds[step] = time.perf_counter() - t0


def near_text(rec: dict) -> str:
    """What near-duplicates are judged on: what differs between rows. Task collections repeat one definition
    across thousands of rows, so a row with an input is compared on its input and output (a Tk-Instruct prompt
    holds the definition and the input in one text: its instance's input is kept apart for this)."""
    if "text" in rec or rec.get("messages"):
        return record_text(rec)
    own = rec.get("input") or (rec.get("meta") or {}).get("instance_input")
    if own:
        return f"{own}\n{rec['output']}"
    return f"{rec['instruction']}\n{rec['output']}"


def _log(reporter, msg: str) -> None:
    if reporter is not None:
        reporter.log(msg)


def _source_files(s, fmt: str, datasets_dir: Path) -> tuple[list[Path], str]:
    """The local files of one source, and where they came from (for the card)."""
    registered = SOURCES.get(s.source) if s.source else None
    patterns = list(s.files) or None
    if s.path:
        return loaders.data_files(fmt, Path(s.path), patterns), s.path
    hub = s.hub
    if hub is None and registered is not None:
        if registered.local_path and (datasets_dir / registered.local_path).exists():
            local = datasets_dir / registered.local_path
            return loaders.data_files(fmt, local, patterns), str(local)
        hub = registered.hub_id
        if hub is None:
            raise DataError(
                f"source '{s.source}': not found at {datasets_dir / (registered.local_path or s.source)} and it has "
                "no hub copy daytune knows; give `path:` or `hub:`"
            )
    hub_patterns = patterns or (
        list(registered.hub_files)
        if registered is not None and hub == registered.hub_id and registered.hub_files
        else []
    )
    try:
        folder = fetch_dataset(hub, hub_patterns, s.revision)
    except DataError as e:
        if s.hub is None and registered is not None and registered.local_path:
            raise DataError(
                f"source '{s.source}': not in the datasets folder ({datasets_dir / registered.local_path}; set "
                f"datasets_dir or DAYTUNE_DATASETS, or give path:), and {e}"
            ) from None
        raise
    origin = f"hub:{hub}" + (f"@{s.revision}" if s.revision else "")
    return loaders.data_files(fmt, folder, hub_patterns or None), origin


def _token_lengths(rows: list[dict], tokenizer, recipe: DataRecipe, batch: int = 1024) -> list[int]:
    """Tokens of each rendered example, counted exactly as training tokenizes it (span by span, plus BOS)."""
    bos = 1 if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else 0
    lengths: list[int] = []
    for start in range(0, len(rows), batch):
        texts, owners = [], []
        for i, rec in enumerate(rows[start : start + batch]):
            for text, _ in render_segments(rec, tokenizer, recipe.template, recipe.system_prompt):
                texts.append(text)
                owners.append(i)
        counts = [bos] * min(batch, len(rows) - start)
        if texts:
            for i, ids in zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"]):
                counts[i] += len(ids)
        lengths += counts
    return lengths


def _eval_index(
    recipe: DataRecipe,
    datasets_dir: Path,
    extra_files: list[str],
    extra_dirs: list[Path],
    held: heldout.HeldOut | None = None,
) -> tuple[EvalIndex, dict]:
    """Every evaluation set is read from the recipe's eval_dir (or the datasets folder) and from `extra_dirs` (the
    run's own evaluation suite): training rows must not overlap whatever the run will be scored on."""
    dc = recipe.decontaminate
    eval_dir = Path(dc.eval_dir) if dc.eval_dir else datasets_dir
    index = EvalIndex(dc.ngram, dc.min_ngram)
    info: dict[str, Any] = {"eval_dir": str(eval_dir), "checked": [], "not_found": []}
    names = list(EVAL_SETS) if "all" in dc.eval_sets else list(dict.fromkeys(dc.eval_sets))
    roots = [d for d in dict.fromkeys([eval_dir, *extra_dirs]) if d.is_dir()]
    info["searched"] = [str(d) for d in dict.fromkeys([eval_dir, *extra_dirs])]
    for name in names:
        found = [(root, find_files(root, EVAL_SETS[name])) for root in roots]
        found = [(root, files) for root, files in found if files]
        if not found:
            if dc.require:
                raise DataError(
                    f"decontaminate: evaluation set '{name}' not found under {eval_dir} (expected "
                    f"{', '.join(EVAL_SETS[name].patterns)}); set decontaminate.eval_dir or DAYTUNE_DATASETS"
                )
            info["not_found"].append(name)
            continue
        for root, files in found:
            items = read_eval_set(name, files)
            index.add(name, items)
            info["checked"].append(
                {"name": name, "items": len(items), "files": len(files), "from": str(root)}
            )
    for f in dict.fromkeys([*dc.eval_files, *extra_files]):
        path = Path(f)
        if not path.is_file():
            raise DataError(f"decontaminate.eval_files: file not found: {path}")
        items = list(daytune_eval_file(path))  # references read "file.jsonl:line"
        index.add(path.name, items)
        info["checked"].append({"name": path.name, "items": len(items), "files": 1, "from": str(path)})
    named = (held.tasks + held.validation) if held is not None else []
    if named:  # no other source may bring the held-out tasks' instances back
        items = heldout.heldout_items(held)
        index.add("heldout_tasks", items)
        where = str(held.index[named[0]].path.parent)
        info["checked"].append(
            {"name": "heldout_tasks", "items": len(items), "files": len(named), "from": where}
        )
    index.build()
    info["ngrams_indexed"] = index.n_ngrams
    return index, info


def prepare(
    recipe: DataRecipe,
    out: str | Path,
    *,
    reporter=None,
    force: bool = False,
    extra_eval_files: list[str] = (),
    extra_eval_dirs: list[str | Path] = (),
    recipe_file: str | None = None,
) -> dict[str, Any]:
    """Build the dataset folder `out` from `recipe`; returns the data card."""
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise DataError(f"--out {out} already exists; choose another folder, or pass --force to replace it")
    recipe.validate()
    books = Books(Ledger(recipe.examples_per_reason))
    datasets_dir = Path(recipe.datasets_dir) if recipe.datasets_dir else default_datasets_dir()
    provenance = gate_provenance(recipe)  # before any data is read
    try:
        books.heldout = resolve_heldout(recipe, datasets_dir, [Path(d) for d in extra_eval_dirs])
    except ConfigError as e:
        raise ConfigError(f"{recipe_file}: {e}" if recipe_file else str(e)) from None
    from daytune.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(recipe.model, log=lambda m: _log(reporter, m)))
    with books.timed("load"):
        rows = load_sources(recipe, provenance, datasets_dir, books, reporter)
    with books.timed("filters"):
        rows = apply_filters(rows, tokenizer, recipe, books)
    with books.timed("exact_dedup"):
        rows = drop_exact_duplicates(rows, recipe, books)
    with books.timed("near_dedup"):
        rows = drop_near_duplicates(rows, recipe, books)
    with books.timed("decontamination"):
        eval_dirs = [Path(d) for d in extra_eval_dirs]
        rows = decontaminate(rows, recipe, datasets_dir, list(extra_eval_files), eval_dirs, books)
    rng = random.Random(recipe.seed)  # one stream for selection, split and shuffles, in this order
    selected = select_rows(rows, recipe, rng, books)
    train_rows, val_rows = split_rows(selected, recipe, rng, books)
    card = write_dataset(out, force, recipe, recipe_file, train_rows, val_rows, books, t_start)
    _log(
        reporter,
        f"Wrote {len(train_rows)} training and {len(val_rows)} validation rows to {out} "
        f"(fingerprint {card['fingerprint'][:19]}) in {card['seconds']['total']:.1f}s.",
    )
    return card


def gate_provenance(recipe: DataRecipe) -> dict[str, Provenance]:
    """Each source's provenance, checked against the recipe's rules: refused sources are never read."""
    provs = {}
    for i, s in enumerate(recipe.sources):
        label = label_of(s)
        prov = provenance_of(s, f"sources[{i}]")
        check_provenance(
            f"sources[{i}] '{label}'", prov, recipe.allow_llm_generated, recipe.allow_noncommercial
        )
        provs[label] = prov
    return provs


def resolve_heldout(recipe: DataRecipe, datasets_dir: Path, extra_dirs: list[Path]) -> heldout.HeldOut:
    """heldout_tasks, resolved against the SNI task files the recipe's sources and the datasets folders hold; a
    source that names a refused task is an error (before anything is read or written)."""
    formats = [format_of(s) for s in recipe.sources]
    places = [Path(s.path) for s, fmt in zip(recipe.sources, formats) if fmt == "sni" and s.path]
    places += [d / heldout.SNI_FOLDER for d in dict.fromkeys([datasets_dir, *extra_dirs])]
    held = heldout.resolve(recipe.heldout_tasks, places, recipe.validation_tasks)
    heldout.check_sources(held, recipe.sources, formats)
    return held


def load_sources(
    recipe: DataRecipe, provenance: dict[str, Provenance], datasets_dir: Path, books: Books, reporter
) -> list[dict]:
    """Every source's rows, in recipe order; what each source is goes into the books."""
    rows: list[dict] = []
    for i, s in enumerate(recipe.sources):
        label, fmt = label_of(s), format_of(s)
        files, origin = _source_files(s, fmt, datasets_dir)
        policy = ErrorPolicy(s.on_error or recipe.on_error)
        refused = books.heldout.refused if fmt == "sni" else None
        loaded = loaders.load(fmt, files, label, load_options(s, recipe.seed, refused), policy)
        if loaded.licences and not recipe.allow_noncommercial:
            _refuse_noncommercial_tasks(f"sources[{i}] '{label}'", loaded.licences)
        for msg in policy.skipped:
            books.ledger.remove("load", "malformed row (on_error: skip)", label, detail=msg)
        for reason, n in loaded.dropped.items():
            books.ledger.remove("load", reason, label, n=n)
        prov = provenance[label]
        books.sources.append(
            {
                "name": label,
                "source": s.source,
                "format": fmt,
                "origin": origin,
                "files": [str(f) for f in files],
                "licence": prov.licence,
                "commercial": prov.commercial,
                "llm_generated": prov.llm_generated,
                "citation": prov.citation,
                "url": prov.url,
                **({"task_licences": loaded.licences} if loaded.licences else {}),
                "skipped_malformed": len(policy.skipped),
            }
        )
        rows += loaded.records
        books.counts[label] = {"loaded": len(loaded.records)}
        _log(reporter, f"Loaded {len(loaded.records)} rows from {label} ({origin}).")
    if not rows:
        raise DataError("no rows loaded from any source")
    return rows


def _refuse_noncommercial_tasks(label: str, licences: dict[str, str]) -> None:
    """Task collections state a licence per task: one that forbids commercial use refuses the source."""
    bad = {t: lic for t, lic in licences.items() if not licence_allows_commercial(lic)}
    if bad:
        shown = "; ".join(f"{t} ({lic})" for t, lic in sorted(bad.items())[:5])
        raise ConfigError(
            f"{label}: refused: {len(bad)} task(s) have a licence that does not allow "
            f"commercial use and the recipe has allow_noncommercial: false: {shown}. Leave them out with "
            "exclude_tasks, or set allow_noncommercial: true."
        )


def apply_filters(rows: list[dict], tokenizer, recipe: DataRecipe, books: Books) -> list[dict]:
    """Drop empty responses, rows outside [min_tokens, max_tokens] and rows training would truncate; every row
    gets its token count (`_tokens`, not written)."""
    lengths = _token_lengths(rows, tokenizer, recipe)
    keep = []
    for rec, n in zip(rows, lengths):
        reason, detail = _filter_reason(rec, n, recipe)
        if reason:
            books.ledger.remove("filters", reason, rec["source"], rec["id"], detail, record_text(rec))
        keep.append(reason is None)
    for rec, n in zip(rows, lengths):
        rec["_tokens"] = n
    return books.keep("after_filters", keep, rows)


def _filter_reason(rec: dict, n: int, recipe: DataRecipe) -> tuple[str | None, str]:
    """Why the filters drop a row of `n` tokens (None: kept), and the detail the card shows."""
    fc = recipe.filters
    if fc.drop_empty and any(not r.strip() for r in responses(rec)):
        return "empty response", "a response (or an assistant turn) is empty"
    if n < fc.min_tokens:
        return f"shorter than min_tokens ({fc.min_tokens})", f"{n} tokens"
    if fc.max_tokens is not None and n > fc.max_tokens:
        return f"longer than max_tokens ({fc.max_tokens})", f"{n} tokens"
    if fc.drop_truncated and n > recipe.max_seq_len:
        reason = f"truncated: longer than max_seq_len ({recipe.max_seq_len})"
        return reason, f"{n} tokens: the response would be cut in training"
    return None, ""


def drop_exact_duplicates(rows: list[dict], recipe: DataRecipe, books: Books) -> list[dict]:
    if not recipe.dedup.exact:
        books.warnings.append("exact deduplication is off (dedup.exact: false)")
        return books.keep("after_exact_dedup", [True] * len(rows), rows)
    dups = exact_duplicates([record_text(r) for r in rows])
    for i, j in dups.items():
        books.ledger.remove(
            "exact_dedup",
            "exact duplicate",
            rows[i]["source"],
            rows[i]["id"],
            f"same text as {rows[j]['id']}",
            record_text(rows[i]),
        )
    return books.keep("after_exact_dedup", [i not in dups for i in range(len(rows))], rows)


def drop_near_duplicates(rows: list[dict], recipe: DataRecipe, books: Books) -> list[dict]:
    dd = recipe.dedup
    if not dd.near:
        books.warnings.append("near-duplicate removal is off (dedup.near: false)")
        return books.keep("after_near_dedup", [True] * len(rows), rows)
    near = near_duplicates([near_text(r) for r in rows], dd.threshold, dd.num_perm, dd.shingle, recipe.seed)
    for i, (j, sim) in near.items():
        books.ledger.remove(
            "near_dedup",
            f"near duplicate (MinHash Jaccard >= {dd.threshold})",
            rows[i]["source"],
            rows[i]["id"],
            f"~{sim:.2f} similar to {rows[j]['id']}: {cards.clip(near_text(rows[j]), 120)}",
            near_text(rows[i]),
        )
    return books.keep("after_near_dedup", [i not in near for i in range(len(rows))], rows)


def decontaminate(
    rows: list[dict],
    recipe: DataRecipe,
    datasets_dir: Path,
    extra_files: list[str],
    extra_dirs: list[Path],
    books: Books,
) -> list[dict]:
    """Drop rows that share an n-gram with an evaluation set; the card lists what was checked and found."""
    dc = recipe.decontaminate
    decontam = books.decontamination
    decontam.update({"enabled": dc.enabled, "ngram": dc.ngram, "min_ngram": dc.min_ngram})
    if not dc.enabled:
        books.warnings.append("decontamination is off (decontaminate.enabled: false): nothing was checked")
        return books.keep("after_decontamination", [True] * len(rows), rows)
    index, info = _eval_index(recipe, datasets_dir, extra_files, extra_dirs, books.heldout)
    decontam.update(info)
    if info["not_found"]:
        books.warnings.append(
            f"evaluation sets not found under {' or '.join(info['searched'])} and so not checked: "
            f"{', '.join(info['not_found'])} (set decontaminate.eval_dir, datasets_dir or DAYTUNE_DATASETS)"
        )
    by_set: dict[str, int] = defaultdict(int)
    bad = set()
    for m in index.check([record_text(r) for r in rows]):
        rec = rows[m.row]
        bad.add(m.row)
        by_set[m.eval_set] += 1
        books.ledger.remove(
            "decontamination",
            f"overlaps {m.eval_set}",
            rec["source"],
            rec["id"],
            f"shares '{m.ngram}' with {m.eval_item}",
            record_text(rec),
        )
    decontam["removed_by_eval_set"] = dict(by_set)
    decontam["removed"] = len(bad)
    return books.keep("after_decontamination", [i not in bad for i in range(len(rows))], rows)


def select_rows(
    rows: list[dict], recipe: DataRecipe, rng: random.Random, books: Books
) -> dict[str, list[dict]]:
    """Each source's cleaned rows cut to max_rows, then sampled down by a weight below 1 (seeded)."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    selected: dict[str, list[dict]] = {}
    for s in recipe.sources:
        label = label_of(s)
        pool = by_source.get(label, [])
        if s.max_rows is not None and len(pool) > s.max_rows:
            chosen = set(rng.sample(range(len(pool)), s.max_rows))
            books.ledger.remove(
                "selection", f"beyond max_rows ({s.max_rows})", label, n=len(pool) - s.max_rows
            )
            pool = [r for i, r in enumerate(pool) if i in chosen]
        if s.weight < 1:
            n_keep = round(len(pool) * s.weight)
            chosen = set(rng.sample(range(len(pool)), n_keep))
            if len(pool) - n_keep:
                books.ledger.remove(
                    "selection", f"sampled out by weight {s.weight:g}", label, n=len(pool) - n_keep
                )
            pool = [r for i, r in enumerate(pool) if i in chosen]
        selected[label] = pool
        books.counts[label]["selected"] = len(pool)
    return selected


def split_rows(
    selected: dict[str, list[dict]], recipe: DataRecipe, rng: random.Random, books: Books
) -> tuple[list[dict], list[dict]]:
    """Validation rows per source (val_fraction, capped at val_max_rows in all), then the training rows repeated
    by a weight of 1 or more; both shuffled."""
    counts = books.counts
    n_val = {label: round(len(pool) * recipe.val_fraction) for label, pool in selected.items()}
    total_val = sum(n_val.values())
    if recipe.val_max_rows is not None and total_val > recipe.val_max_rows:
        n_val = {k: math.floor(v * recipe.val_max_rows / total_val) for k, v in n_val.items()}
    train_rows: list[dict] = []
    val_rows: list[dict] = []
    for s in recipe.sources:
        label = label_of(s)
        pool = list(selected[label])
        rng.shuffle(pool)
        val, train = pool[: n_val[label]], pool[n_val[label] :]
        copies = list(train) * int(s.weight) if s.weight >= 1 else list(train)
        frac = s.weight - int(s.weight) if s.weight >= 1 else 0.0
        if frac > 0 and train:
            copies += rng.sample(train, round(len(train) * frac))
        counts[label]["val"] = len(val)
        counts[label]["train"] = len(copies)
        val_rows += val
        train_rows += copies
    rng.shuffle(train_rows)
    rng.shuffle(val_rows)
    if not train_rows:
        raise DataError("no training rows left after cleaning and selection; see the removed rows above")
    if any(counts[label]["loaded"] == 0 for label in counts):
        empty = [label for label in counts if counts[label]["loaded"] == 0]
        books.warnings.append(f"sources that gave no rows: {', '.join(empty)}")
    return train_rows, val_rows


def write_dataset(
    out: Path,
    force: bool,
    recipe: DataRecipe,
    recipe_file: str | None,
    train_rows: list[dict],
    val_rows: list[dict],
    books: Books,
    t_start: float,
) -> dict[str, Any]:
    """Write the rows, the card and the histogram to a temporary folder, then move it into `out` whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        for name, data in (("train.jsonl", train_rows), ("val.jsonl", val_rows)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for r in data:
                    f.write(
                        json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False)
                        + "\n"
                    )
        card = _card(tmp, recipe, recipe_file, train_rows, val_rows, books)
        cards.write_histogram(tmp / cards.HISTOGRAM, train_rows, recipe.max_seq_len)
        card["tokens"]["histogram"] = cards.HISTOGRAM
        card["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
        card["recipe"] = cards.recipe_for_card(recipe)
        (tmp / cards.CARD_JSON).write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (tmp / cards.CARD_MD).write_text(cards.markdown(card), encoding="utf-8")
        if out.is_dir() and not force:
            out.rmdir()  # empty: prepare checked
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _card(
    folder: Path,
    recipe: DataRecipe,
    recipe_file: str | None,
    train_rows: list[dict],
    val_rows: list[dict],
    books: Books,
) -> dict[str, Any]:
    """The data card of the rows written to `folder` (its histogram, total time and recipe are added after)."""
    dd = recipe.dedup
    files = {
        name: {"rows": n, "bytes": (folder / name).stat().st_size}
        for name, n in (("train.jsonl", len(train_rows)), ("val.jsonl", len(val_rows)))
    }
    return {
        "name": recipe.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint_files([folder / "train.jsonl", folder / "val.jsonl"]),
        "files": files,
        "recipe_file": recipe_file,
        "tokenizer": {
            "model": recipe.model,
            "template": recipe.template,
            "system_prompt": recipe.system_prompt,
            "max_seq_len": recipe.max_seq_len,
        },
        "rules": {
            "allow_llm_generated": recipe.allow_llm_generated,
            "allow_noncommercial": recipe.allow_noncommercial,
        },
        "steps": [*STEPS, "val", "train"],
        "sources": [{**info, "rows": books.counts[info["name"]]} for info in books.sources],
        "removed": books.ledger.as_list(),
        "dedup": {
            "exact": dd.exact,
            "near": dd.near,
            "threshold": dd.threshold,
            "num_perm": dd.num_perm,
            "shingle_words": dd.shingle,
        },
        "decontamination": books.decontamination,
        "heldout": books.heldout.card(),
        "tokens": cards.token_stats(train_rows, val_rows),
        "licences": cards.licence_table(books.sources),
        "warnings": books.warnings,
        "seconds": {k: round(v, 2) for k, v in books.seconds.items()},
    }
