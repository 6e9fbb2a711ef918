"""Decontamination: drop every training row that shares a word n-gram (13 by default) with an evaluation item.

Evaluation items shorter than n words but at least `min_ngram` words long are matched whole (the GPT-3 paper's
rule for short benchmarks), so a short question copied verbatim into a training row is still caught. The index is
a sorted array of 64-bit n-gram hashes per length (see ngrams.py); checking a row is a binary search per n-gram,
done for all rows of a batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daytune.data.ngrams import (
    HashSet,
    WordValues,
    ngram_hashes,
    rolling_hashes,
    whole_hash,
    words,
    words_left,
)


@dataclass
class Match:
    row: int  # index into the checked texts
    eval_set: str
    eval_item: str  # reference of the evaluation item, e.g. "mmlu/anatomy_test:12"
    ngram: str  # the shared words


class EvalIndex:
    def __init__(self, n: int = 13, min_ngram: int = 8):
        if n < 1 or min_ngram < 1:
            raise ValueError("n-gram lengths must be positive")
        self.n, self.min_ngram = n, min(min_ngram, n)
        self.values = WordValues()
        self.refs: list[str] = []  # eval item references
        self.sets: list[str] = []  # eval set of each item
        self.items_per_set: dict[str, int] = {}
        self._parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.keys: dict[int, HashSet] = {}  # n-gram length -> the hashes of the evaluation n-grams
        # aligned with keys: index of the first item holding the n-gram
        self.owner: dict[int, np.ndarray] = {}

    def add(self, eval_set: str, items: list[tuple[str, str]], batch: int = 20000) -> None:
        self.items_per_set[eval_set] = self.items_per_set.get(eval_set, 0) + len(items)
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            base = len(self.refs)
            self.refs += [ref for ref, _ in chunk]
            self.sets += [eval_set] * len(chunk)
            docs = [words(text) for _, text in chunk]
            values, offsets = self.values.encode(docs)
            h, doc, _ = ngram_hashes(values, offsets, [self.n])[self.n]
            self._parts.setdefault(self.n, []).append((h, doc + base))
            for i, ws in enumerate(docs):  # short items: the whole item is the n-gram
                if self.min_ngram <= len(ws) < self.n:
                    k = len(ws)
                    hv = np.array([whole_hash(values[offsets[i] : offsets[i + 1]])], np.uint64)
                    self._parts.setdefault(k, []).append((hv, np.array([base + i], np.int64)))
        self.keys.clear()

    def build(self) -> None:
        for k, parts in self._parts.items():
            h = np.concatenate([p[0] for p in parts])
            owner = np.concatenate([p[1] for p in parts])
            order = np.argsort(h, kind="stable")
            h, owner = h[order], owner[order]
            first = np.ones(len(h), bool)
            first[1:] = h[1:] != h[:-1]
            self.keys[k], self.owner[k] = HashSet(h[first], sorted_unique=True), owner[first]

    @property
    def n_ngrams(self) -> int:
        if not self.keys:
            self.build()
        return int(sum(len(v) for v in self.keys.values()))

    def check(self, texts: list[str], batch: int = 20000) -> list[Match]:
        """The first match of every contaminated text (texts without a match are absent)."""
        if not self.keys:
            self.build()
        lengths = sorted(self.keys)
        matches: list[Match] = []
        for start in range(0, len(texts), batch):
            docs = [words(t) for t in texts[start : start + batch]]
            values, offsets = self.values.encode(docs)
            found: dict[int, tuple[int, int, int]] = {}  # doc -> (n, start position, owner)
            room = words_left(offsets)
            for k, h in rolling_hashes(values, lengths):
                hit, idx = self.keys[k].lookup(h)
                pos = np.flatnonzero(hit)
                pos = pos[room[pos] >= k]  # n-grams inside one document only
                if not len(pos):
                    continue
                doc = np.searchsorted(offsets, pos, side="right") - 1
                hit_docs, first = np.unique(doc, return_index=True)
                for d, f in zip(hit_docs.tolist(), first.tolist()):
                    if d not in found or k > found[d][0]:
                        found[d] = (k, int(pos[f]), int(self.owner[k][idx[pos[f]]]))
            for d in sorted(found):
                k, p, owner = found[d]
                local = int(p - offsets[d])
                matches.append(
                    Match(
                        row=start + d,
                        eval_set=self.sets[owner],
                        eval_item=self.refs[owner],
                        ngram=" ".join(docs[d][local : local + k]),
                    )
                )
        return matches


def naive_index(eval_texts: list[str], n: int = 13) -> set[tuple[str, ...]]:
    """The straightforward way (a Python set of word tuples), kept as the benchmark's reference."""
    index: set[tuple[str, ...]] = set()
    for text in eval_texts:
        ws = words(text)
        index.update(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    return index


def naive_contaminated(train_texts: list[str], index: set[tuple[str, ...]], n: int = 13) -> list[int]:
    """Rows sharing an n-gram with `naive_index`: the same answers as EvalIndex(min_ngram=n), much more memory."""
    out = []
    for row, text in enumerate(train_texts):
        ws = words(text)
        if any(tuple(ws[i : i + n]) in index for i in range(len(ws) - n + 1)):
            out.append(row)
    return out
