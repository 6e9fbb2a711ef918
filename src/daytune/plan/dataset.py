"""What one epoch of a dataset costs: tokens, label positions, and the positions a batch plan computes.

Token counts come from the model's own tokenizer when its files are local, otherwise from the embedded SmolLM2
tokenizer (BPE, 49k vocabulary; other tokenizers of the same family count within about 15 % on English text),
and the plan says which one it used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daytune.errors import DataError


@dataclass
class DataStats:
    path: str
    tokenizer: str  # what counted the tokens
    examples: int
    truncated: int
    lengths: list[int] = field(repr=False)
    labels: list[int] = field(repr=False)  # loss positions per example
    seed: int = 42  # the batch plan's, as training would use them (train.seed, data.group_by_length)
    group_by_length: bool = False
    # epoch() results: the search repeats
    _epochs: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def label_tokens(self) -> int:
        return sum(self.labels)

    def epoch(self, micro_batch: int, seq_len: int, packing: bool) -> dict:
        """Positions computed per epoch (padding included), micro-batches, and the most label positions in one
        micro-batch, from the same batch plan training uses."""
        key = (micro_batch, seq_len, packing)
        if key not in self._epochs:
            self._epochs[key] = self._epoch(micro_batch, seq_len, packing)
        return dict(self._epochs[key])

    def _epoch(self, micro_batch: int, seq_len: int, packing: bool) -> dict:
        from daytune.data.batching import BatchPlan

        plan = BatchPlan(list(self.lengths), micro_batch, self.seed, seq_len, packing=packing,
                         group_by_length=self.group_by_length)  # fmt: skip
        positions, most_labels, longest = 0, 0, 0
        batches = plan.epoch(0)
        for mb in batches:
            widths = [sum(self.lengths[i] for i in row) for row in mb]
            positions += len(mb) * max(widths)
            longest = max(longest, max(widths))
            most_labels = max(most_labels, sum(self.labels[i] for row in mb for i in row))
        return {
            "micro_batches": len(batches),
            "positions": positions,
            "padding": 1 - self.tokens / positions if positions else 0.0,
            "max_labels": most_labels,
            "longest_row": longest,
        }

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "tokenizer": self.tokenizer,
            "examples": self.examples,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
        }


def train_file(path: str | Path) -> Path:
    """A JSONL file, or a dataset folder holding train.jsonl (or exactly one .jsonl)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "train.jsonl").is_file():
            return p / "train.jsonl"
        found = sorted(p.glob("*.jsonl"))
        if len(found) == 1:
            return found[0]
        raise DataError(
            f"{p}: expected train.jsonl or a single .jsonl file in the folder (found {len(found)})"
        )
    raise DataError(f"data not found: {p}")


def from_examples(path: str, tokenizer_name: str, examples, truncated: int) -> DataStats:
    """Stats of already-encoded examples (daytune.data.tokenize.Example)."""
    return DataStats(
        path=str(path),
        tokenizer=tokenizer_name,
        examples=len(examples),
        truncated=truncated,
        lengths=[len(e.input_ids) for e in examples],
        labels=[sum(1 for x in e.labels[1:] if x != -100) for e in examples],
    )


def measure(
    path: str | Path,
    tokenizer_dir: Path | None,
    template: str,
    max_seq_len: int,
    system_prompt: str | None = None,
) -> DataStats:
    """Tokenize a dataset the way training does (instruction, `messages` or `text` rows; template, prompt
    masking, truncation)."""
    from daytune.data import encode_records
    from daytune.data.jsonl import read_records
    from daytune.models import load_tokenizer, resolve_model

    file = train_file(path)
    name = str(tokenizer_dir) if tokenizer_dir else "smollm2-135m (the model's own tokenizer is not local)"
    folder = tokenizer_dir or resolve_model("smollm2-135m", log=lambda *a: None)
    tokenizer = load_tokenizer(folder)
    records = read_records(file, None)
    examples, stats = encode_records(records, tokenizer, template, max_seq_len, system_prompt)
    if not examples:
        raise DataError(f"{file}: no example keeps a response within {max_seq_len} tokens")
    return from_examples(str(file), name, examples, stats.truncated)
