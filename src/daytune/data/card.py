"""The data card: what a prepared dataset holds, where every row came from, and what was removed and why.

data_card.json is for machines (training runs record its fingerprint); data_card.md is the same for people;
token_lengths.png is a histogram of the training rows' lengths in the model's tokens, per source.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

CARD_JSON = "data_card.json"
CARD_MD = "data_card.md"
HISTOGRAM = "token_lengths.png"

STEP_TITLES = {
    "loaded": "loaded",
    "after_filters": "filters",
    "after_exact_dedup": "exact dedup",
    "after_near_dedup": "near dedup",
    "after_decontamination": "decontam.",
    "selected": "selected",
    "val": "val",
    "train": "train",
}


def clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"rows": 0, "total": 0}
    s = sorted(lengths)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]

    return {
        "rows": len(s),
        "total": sum(s),
        "min": s[0],
        "mean": round(sum(s) / len(s), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": s[-1],
    }


def token_stats(train: list[dict], val: list[dict]) -> dict[str, Any]:
    by_source: dict[str, list[int]] = defaultdict(list)
    for r in train:
        by_source[r["source"]].append(r["_tokens"])
    return {
        "train": _stats([r["_tokens"] for r in train]),
        "val": _stats([r["_tokens"] for r in val]),
        "train_by_source": {k: _stats(v) for k, v in by_source.items()},
    }


def licence_table(sources: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for s in sources:
        out[s["licence"]].append(s["name"])
        for task, lic in (s.get("task_licences") or {}).items():
            out[f"{lic} (instances)"].append(f"{s['name']}/{task}")
    return dict(out)


def recipe_for_card(recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def write_histogram(path: Path, train: list[dict], max_seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_source: dict[str, list[int]] = defaultdict(list)
    for r in train:
        by_source[r["source"]].append(r["_tokens"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    names = sorted(by_source)
    top = max((max(v) for v in by_source.values() if v), default=1)
    bins = min(60, max(5, top // 8))
    ax.hist([by_source[n] for n in names], bins=bins, stacked=True, label=names)
    ax.axvline(max_seq_len, color="black", linestyle="--", linewidth=1, label=f"max_seq_len {max_seq_len}")
    ax.set_xlabel("tokens per training example (rendered with the template)")
    ax.set_ylabel("rows")
    ax.set_title(f"Token lengths of {len(train)} training rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(card: dict[str, Any]) -> str:
    """The card for people: same content as data_card.json."""
    out = _md_summary(card) + _md_sources(card) + _md_heldout(card) + _md_removed(card)
    out += _md_decontamination(card)
    out += _md_tokens(card)
    out += ["## Licences", ""]
    out += [f"- {lic}: {', '.join(names)}" for lic, names in card["licences"].items()] + [""]
    out += ["## Recipe", "", "```yaml", yaml.safe_dump(card["recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(out)


def _md_summary(card: dict[str, Any]) -> list[str]:
    files = card["files"]
    tok = card["tokenizer"]
    out = [
        f"# Data card: {card['name']}",
        "",
        f"- fingerprint: `{card['fingerprint']}` (training runs record it)",
        f"- created: {card['created']}"
        + (f" from `{card['recipe_file']}`" if card.get("recipe_file") else ""),
        f"- train.jsonl: {files['train.jsonl']['rows']} rows; val.jsonl: {files['val.jsonl']['rows']} rows",
        f"- tokens counted with `{tok['model']}`, template `{tok['template']}`, max_seq_len {tok['max_seq_len']}",
        f"- rules: allow_llm_generated: {str(card['rules']['allow_llm_generated']).lower()}, "
        f"allow_noncommercial: {str(card['rules']['allow_noncommercial']).lower()}",
        "",
    ]
    if card["warnings"]:
        out += ["## Warnings", ""] + [f"- {w}" for w in card["warnings"]] + [""]
    return out


def _md_sources(card: dict[str, Any]) -> list[str]:
    """Each source's terms and citation, and its rows after each step."""
    sources = card["sources"]
    terms = [
        [
            s["name"],
            s["licence"],
            "yes" if s["commercial"] else "no",
            "LLM" if s["llm_generated"] else "people",
            s["origin"],
        ]
        for s in sources
    ]
    out = ["## Sources", "", _table(["source", "licence", "commercial", "written by", "origin"], terms)]
    out += ["", "Citations:", ""] + [f"- {s['name']}: {s['citation']}" for s in sources] + [""]
    out += ["## Rows per source after each step", ""]
    steps = card["steps"]
    rows = [[s["name"], *[s["rows"].get(k, "") for k in steps]] for s in sources]
    rows.append(["**total**", *[sum(s["rows"].get(k, 0) for s in sources) for k in steps]])
    return out + [_table(["source", *[STEP_TITLES.get(k, k) for k in steps]], rows), ""]


def _md_heldout(card: dict[str, Any]) -> list[str]:
    """The tasks this data never trains on (heldout_tasks) and the ones refused with them."""
    held = card.get("heldout") or {}
    val = held.get("validation_tasks") or []
    if not held.get("tasks") and not val:
        return []
    out = [
        "## Held-out tasks",
        "",
        "Never trained on: the test tasks are what `--suite unseen` scores; a sweep tunes on",
    ]
    out += ["the validation tasks.", ""]
    rows = [[t, "test", ", ".join(held["sources"].get(t, []))] for t in held.get("tasks", [])]
    rows += [[t, "validation", ", ".join(held["sources"].get(t, []))] for t in val]
    out += [_table(["task", "role", "Source"], rows), ""]
    siblings = held.get("same_source_as") or {}
    if siblings:
        out += [
            "Refused with them (same Source): " + ", ".join(f"{t} (as {h})" for t, h in siblings.items()),
            "",
        ]
    return out


def _md_removed(card: dict[str, Any]) -> list[str]:
    out = ["## Removed rows", ""]
    if not card["removed"]:
        return out + ["Nothing was removed.", ""]
    rows = [
        [r["step"], r["reason"], r["count"], ", ".join(f"{k}: {v}" for k, v in r["by_source"].items())]
        for r in card["removed"]
    ]
    out += [_table(["step", "reason", "rows", "by source"], rows), ""]
    for r in card["removed"]:
        if not r["examples"]:
            continue
        out += [f"**{r['step']}: {r['reason']}**", ""]
        for ex in r["examples"]:
            head = " ".join(x for x in (f"`{ex['id']}`" if ex["id"] else "", ex["detail"]) if x)
            out.append(f"- {head}" + (f"<br>“{ex['text']}”" if ex["text"] else ""))
        out.append("")
    return out


def _md_decontamination(card: dict[str, Any]) -> list[str]:
    d = card["decontamination"]
    out = ["## Decontamination", ""]
    if not d["enabled"]:
        return out + ["**Off**: training rows were not checked against any evaluation set."]
    out += [
        f"Word {d['ngram']}-gram overlap (items of {d['min_ngram']}–{d['ngram'] - 1} words matched whole) "
        f"against {d.get('ngrams_indexed', 0)} indexed n-grams; {d.get('removed', 0)} rows removed.",
        "",
    ]
    removed = d.get("removed_by_eval_set", {})
    out.append(
        _table(
            ["evaluation set", "items", "rows removed", "from"],
            [[c["name"], c["items"], removed.get(c["name"], 0), c["from"]] for c in d["checked"]],
        )
    )
    if d["not_found"]:
        out += [
            "",
            f"Not found, so **not checked**: {', '.join(d['not_found'])} (looked in `{d['eval_dir']}`).",
        ]
    return out


def _md_tokens(card: dict[str, Any]) -> list[str]:
    t = card["tokens"]
    stat_keys = ["rows", "total", "min", "mean", "p50", "p95", "max"]
    stat_rows = [["train", *[t["train"].get(k, "") for k in stat_keys]]]
    stat_rows += [
        [f"train: {k}", *[v.get(k, "") for k in stat_keys]] for k, v in t["train_by_source"].items()
    ]
    stat_rows.append(["val", *[t["val"].get(k, "") for k in stat_keys]])
    return [
        "",
        "## Token lengths",
        "",
        _table(["split", *stat_keys], stat_rows),
        "",
        f"![token lengths]({t.get('histogram', HISTOGRAM)})",
        "",
    ]
