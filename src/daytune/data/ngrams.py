"""Word n-gram hashing in bulk with numpy: the shared engine of decontamination and near-duplicate detection.

Text is normalized to lowercase word tokens (`\\w+`). Each distinct word gets a stable 64-bit value (from blake2b,
so results do not depend on Python's per-process hash seed), and the hash of the n words starting at position i is
the polynomial h_n(i) = h_{n-1}(i) * P + value(word[i + n - 1]) modulo 2**64. All documents of a batch are
concatenated into one array, so each n-gram length costs a handful of vectorized passes instead of a Python loop
per n-gram; n-grams that would cross a document boundary are dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

_WORD = re.compile(r"\w+")
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier (the 64-bit golden ratio)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordValues:
    """word -> stable pseudo-random uint64, cached."""

    def __init__(self):
        self._cache: dict[str, int] = {}

    def _value(self, w: str) -> int:
        v = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        self._cache[w] = v
        return v

    def encode(self, docs: Iterable[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated word values of `docs` and the offsets where each document starts (len(docs) + 1)."""
        cache, value = self._cache, self._value
        docs = list(docs)
        flat = [w for ws in docs for w in ws]
        for w in set(flat).difference(cache):
            value(w)
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(ws) for ws in docs], out=offsets[1:])
        return np.fromiter(map(cache.__getitem__, flat), dtype=np.uint64, count=len(flat)), offsets


def words_left(offsets: np.ndarray) -> np.ndarray:
    """For each position of the concatenated documents, how many words its document has from there on."""
    lengths = np.diff(offsets)
    doc_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    return offsets[1:][doc_of] - np.arange(offsets[-1], dtype=np.int64)


def rolling_hashes(values: np.ndarray, lengths: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """For each n in `lengths` (ascending): a view h with h[i] = hash of the n words starting at i, computed in
    place. Entries whose n-gram crosses a document boundary are garbage: check words_left(...)[i] >= n. The view
    is overwritten by the next iteration."""
    wanted = set(lengths)
    if not wanted:
        return
    h = values.copy()
    with np.errstate(over="ignore"):
        for n in range(1, max(wanted) + 1):
            m = len(values) - n + 1  # n-grams starting at 0..m-1
            if m <= 0:
                return
            if n > 1:  # h[i] = h[i] * P + value[i + n - 1]
                np.multiply(h[:m], _P, out=h[:m])
                np.add(h[:m], values[n - 1 :], out=h[:m])
            if n in wanted:
                yield n, h[:m]


def ngram_hashes(values: np.ndarray, offsets: np.ndarray, lengths: Iterable[int]) -> dict[int, tuple]:
    """For each n in `lengths`: (hashes, doc index, start position) of every n-gram inside one document."""
    wanted = sorted(set(lengths))
    out = {n: _empty() for n in wanted}
    if not wanted or len(values) == 0:
        return out
    room = words_left(offsets)
    for n, h in rolling_hashes(values, wanted):
        pos = np.flatnonzero(room[: len(h)] >= n)
        out[n] = (h[pos], np.searchsorted(offsets, pos, side="right") - 1, pos)
    return out


def whole_hash(values: np.ndarray) -> int:
    """The n-gram hash of a whole word sequence (equal to ngram_hashes' value for n = len(values))."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for i, v in enumerate(values):
            h = v if i == 0 else h * _P + v
    return int(h)


def _empty():
    return (np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64))


class HashSet:
    """Sorted unique 64-bit keys with a bitmap in front: most queries miss, and a miss costs one memory read
    instead of a binary search."""

    BITS = 24

    def __init__(self, keys: np.ndarray, sorted_unique: bool = False):
        if not sorted_unique:
            keys = np.sort(keys)
            keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
        self.keys = keys
        self.bitmap = np.zeros(1 << self.BITS, dtype=bool)
        self.bitmap[self._slot(self.keys)] = True

    def _slot(self, h: np.ndarray) -> np.ndarray:
        return (h >> np.uint64(64 - self.BITS)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, index into keys) for each query."""
        found = np.zeros(len(queries), bool)
        idx = np.zeros(len(queries), np.int64)
        if len(self.keys) == 0 or len(queries) == 0:
            return found, idx
        cand = np.flatnonzero(self.bitmap[self._slot(queries)])
        if len(cand):
            pos = np.minimum(np.searchsorted(self.keys, queries[cand]), len(self.keys) - 1)
            hit = self.keys[pos] == queries[cand]
            found[cand[hit]] = True
            idx[cand[hit]] = pos[hit]
        return found, idx
