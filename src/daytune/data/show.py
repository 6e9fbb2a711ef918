"""`daytune data inspect`: the card, and sample rows exactly as the model sees them in training (template,
special tokens, truncation), with the loss mask visible: trained tokens in green (or between ⟦ and ⟧ when the
output has no colour), masked tokens dimmed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from daytune.data.card import CARD_JSON, CARD_MD
from daytune.data.jsonl import read_records
from daytune.data.tokenize import IGNORE_INDEX, Example, encode_record
from daytune.errors import DataError

OPEN, CLOSE = "⟦", "⟧"


def load_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_JSON
    if not path.is_file():
        raise DataError(f"{folder}: no {CARD_JSON}; is it a folder written by `daytune data prepare`?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def masked_runs(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same mask, decoded: [(text, trained)]."""
    runs: list[tuple[list[int], bool]] = []
    for tok, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def rendered_sample(
    rec: dict, tokenizer, template: str, max_seq_len: int, system_prompt=None
) -> dict[str, Any]:
    full = encode_record(rec, tokenizer, template, system_prompt)
    ex = Example(full.input_ids[:max_seq_len], full.labels[:max_seq_len])
    return {
        "id": rec.get("id", ""),
        "source": rec.get("source", ""),
        "tokens": len(full.input_ids),
        "trained_tokens": ex.n_trained,
        "truncated": len(full.input_ids) > max_seq_len,
        "runs": masked_runs(ex, tokenizer),
    }


def inspect_dataset(
    folder: str | Path,
    reporter,
    n: int = 3,
    source: str | None = None,
    seed: int = 0,
    model: str | None = None,
    template: str | None = None,
    show_card: bool = True,
) -> list[dict[str, Any]]:
    from rich.markdown import Markdown
    from rich.text import Text

    from daytune.models import load_tokenizer, resolve_model

    folder = Path(folder)
    card = load_card(folder)
    if show_card:
        md = (folder / CARD_MD).read_text(encoding="utf-8") if (folder / CARD_MD).is_file() else ""
        md = md.split("\n## Recipe")[0]  # the recipe is in the file; the terminal gets the summary
        reporter.print(Markdown(md) if reporter.console.color_system else md)
    tok_cfg = card.get("tokenizer", {})
    model = model or tok_cfg.get("model") or "smollm2-135m"
    template = template or tok_cfg.get("template") or "chat"
    max_seq_len = int(tok_cfg.get("max_seq_len") or 2048)
    tokenizer = load_tokenizer(resolve_model(model, log=reporter.log))
    rows = read_records(folder / "train.jsonl")
    if source:
        rows = [r for r in rows if r.get("source") == source]
        if not rows:
            names = sorted({s["name"] for s in card.get("sources", [])})
            raise DataError(f"--source {source}: no training rows from it (sources: {', '.join(names)})")
    picked = random.Random(seed).sample(rows, min(n, len(rows)))
    colour = reporter.console.color_system is not None
    legend = (
        "trained tokens in green, masked tokens dimmed"
        if colour
        else f"trained tokens between {OPEN} and {CLOSE}"
    )
    reporter.print(
        f"\nSamples from train.jsonl as the model sees them ({model}, template {template}; {legend}):"
    )
    samples = []
    for rec in picked:
        s = rendered_sample(rec, tokenizer, template, max_seq_len, tok_cfg.get("system_prompt"))
        samples.append(s)
        head = (
            f"\n── {s['id']} ({s['source']}): {s['tokens']} tokens, {s['trained_tokens']} trained"
            + (f", truncated to {max_seq_len}" if s["truncated"] else "")
            + " ──"
        )
        reporter.print(head)
        text = Text()
        for piece, trained in s["runs"]:
            if colour:
                text.append(piece, style="bold green" if trained else "dim")
            else:
                text.append(f"{OPEN}{piece}{CLOSE}" if trained else piece)
        reporter.print(text)
    return samples
