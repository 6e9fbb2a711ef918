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
from collections.abc import Iterable

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
        flat: list[int] = []
        offsets = [0]
        for ws in docs:
            flat.extend([cache[w] if w in cache else value(w) for w in ws])
            offsets.append(len(flat))
        return np.array(flat, dtype=np.uint64), np.array(offsets, dtype=np.int64)


def ngram_hashes(values: np.ndarray, offsets: np.ndarray, lengths: Iterable[int]) -> dict[int, tuple]:
    """For each n in `lengths`: (hashes, doc index, start position) of every n-gram inside one document."""
    wanted = sorted(set(lengths))
    out: dict[int, tuple] = {}
    if not wanted or len(values) == 0:
        return {n: _empty() for n in wanted}
    doc_of = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    end_of_doc = offsets[1:][doc_of]  # for each position, where its document ends
    positions = np.arange(len(values), dtype=np.int64)
    h = values.copy()
    with np.errstate(over="ignore"):
        for n in range(1, wanted[-1] + 1):
            if n > 1:
                if len(h) <= 1:
                    h = h[:0]
                else:
                    h = h[:-1] * _P + values[n - 1 :]
            if n in wanted:
                m = len(h)
                ok = positions[:m] + n <= end_of_doc[:m]
                out[n] = (h[ok], doc_of[:m][ok], positions[:m][ok])
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


def lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, index into sorted_keys) for each query."""
    if len(sorted_keys) == 0 or len(queries) == 0:
        return np.zeros(len(queries), bool), np.zeros(len(queries), np.int64)
    idx = np.searchsorted(sorted_keys, queries)
    idx = np.minimum(idx, len(sorted_keys) - 1)
    return sorted_keys[idx] == queries, idx
