"""Tokenization with loss masking: labels are -100 on prompt tokens (and on every non-assistant turn of a
conversation), so only responses are trained. Each rendered span is tokenized on its own, so the mask boundary is
exact whatever the tokenizer would merge across it."""

from __future__ import annotations

from dataclasses import dataclass

from daytune.data.templates import render_segments
from daytune.engine import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_response: int = 0  # the prompt alone filled max_seq_len


def encode_record(record, tokenizer, template: str, system_prompt: str | None = None) -> Example:
    """The whole rendered record, untruncated."""
    segments = render_segments(record, tokenizer, template, system_prompt)
    pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    ids = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    labels = [IGNORE_INDEX] * len(ids)
    for (_, trained), piece in zip(segments, pieces):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Example(ids, labels)


def encode_records(
    records, tokenizer, template: str, max_seq_len: int, system_prompt: str | None = None
) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats()
    out = []
    for record in records:
        stats.rows += 1
        full = encode_record(record, tokenizer, template, system_prompt)
        ex = Example(full.input_ids[:max_seq_len], full.labels[:max_seq_len])
        if len(full.input_ids) > max_seq_len:
            stats.truncated += 1
        if ex.n_trained == 0:
            stats.dropped_no_response += 1
            continue
        out.append(ex)
        stats.kept += 1
    return out, stats
