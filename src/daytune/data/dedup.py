"""Duplicate removal: exact (after normalizing case, punctuation and spacing) and near (MinHash + LSH).

Near duplicates use datasketch's MinHash definition and its LSH index. The signatures are computed for a whole
batch of rows with numpy, with datasketch's own permutations and formula (a test checks they equal what
`MinHash.update_batch` gives for the same shingle hashes), because hashing shingle by shingle in Python is what makes the textbook version
slow. Rows are visited in order: a row whose estimated Jaccard similarity with an earlier kept row reaches the
threshold is dropped as that row's near duplicate, so the first occurrence always survives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from daytune.data.ngrams import WordValues, ngram_hashes, words

SCHEME = "affine32"  # datasketch's default MinHash scheme since 2.0
_MAX_HASH = np.uint32((1 << 32) - 1)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, which datasketch applies before its affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(words(text)).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: list[str]) -> dict[int, int]:
    """row -> the earlier row it duplicates."""
    seen: dict[bytes, int] = {}
    dups = {}
    for i, t in enumerate(texts):
        k = exact_key(t)
        if k in seen:
            dups[i] = seen[k]
        else:
            seen[k] = i
    return dups


@dataclass
class MinHasher:
    num_perm: int = 128
    shingle: int = 3  # words per shingle
    seed: int = 1

    def __post_init__(self):
        from datasketch import MinHash

        self.a, self.b = MinHash(num_perm=self.num_perm, seed=self.seed, scheme=SCHEME).permutations
        self.values = WordValues()

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit shingle hashes of all texts (concatenated) and per-text offsets. A text shorter than one
        shingle is one shingle of all its words."""
        docs = [words(t) for t in texts]
        values, offsets = self.values.encode(docs)
        k = self.shingle
        h, doc, _ = ngram_hashes(values, offsets, [k])[k]
        lengths = np.diff(offsets)
        short = np.flatnonzero((lengths > 0) & (lengths < k))
        if len(short):
            sh = ngram_hashes(values, offsets, sorted(set(lengths[short].tolist())))
            extra_h, extra_d = [], []
            for n, (hn, dn, pn) in sh.items():
                sel = (lengths[dn] == n) & (pn == offsets[dn])
                extra_h.append(hn[sel])
                extra_d.append(dn[sel])
            h = np.concatenate([h, *extra_h])
            doc = np.concatenate([doc, *extra_d])
        order = np.argsort(doc, kind="stable")
        h, doc = (h[order] >> np.uint64(32)).astype(np.uint32), doc[order]
        counts = np.bincount(doc, minlength=len(texts))
        return h, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def signatures(self, texts: list[str], chunk: int = 1 << 15) -> np.ndarray:
        """MinHash signatures, shape (len(texts), num_perm); a text without words keeps the all-max signature."""
        hv, offsets = self.shingle_hashes(texts)
        sig = np.full((len(texts), self.num_perm), _MAX_HASH, dtype=np.uint32)
        doc_of = np.repeat(np.arange(len(texts)), np.diff(offsets))
        with np.errstate(over="ignore"):
            for s in range(0, len(hv), chunk):
                part = _fmix32(hv[s : s + chunk])
                phv = part[:, None] * self.a + self.b  # modulo 2**32: uint32 arithmetic wraps
                d = doc_of[s : s + chunk]
                starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
                mins = np.minimum.reduceat(phv, starts, axis=0)
                rows = d[starts]
                sig[rows] = np.minimum(sig[rows], mins)
        return sig


def near_duplicates(
    texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle: int = 3, seed: int = 1
) -> dict[int, tuple[int, float]]:
    """row -> (the earlier kept row it nearly duplicates, estimated Jaccard similarity)."""
    from datasketch import LeanMinHash, MinHashLSH

    hasher = MinHasher(num_perm=num_perm, shingle=shingle, seed=seed)
    sig = hasher.signatures(texts)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    empty = np.all(sig == _MAX_HASH, axis=1)
    dups: dict[int, tuple[int, float]] = {}
    for i in range(len(texts)):
        if empty[i]:
            continue
        m = LeanMinHash(seed=seed, hashvalues=sig[i], scheme=SCHEME)
        best, best_sim = -1, 0.0
        for j in lsh.query(m):
            sim = float(np.mean(sig[j] == sig[i]))
            if sim >= threshold and (sim > best_sim or (sim == best_sim and j < best)):
                best, best_sim = j, sim
        if best >= 0:
            dups[i] = (best, best_sim)
        else:
            lsh.insert(i, m, check_duplication=False)
    return dups


def naive_near_duplicates(
    texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle: int = 3
) -> dict[int, int]:
    """The textbook datasketch loop (one MinHash.update per shingle), kept as the benchmark's reference."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[int, MinHash] = {}
    dups = {}
    for i, text in enumerate(texts):
        ws = words(text)
        shingles = [" ".join(ws[j : j + shingle]) for j in range(max(1, len(ws) - shingle + 1))]
        m = MinHash(num_perm=num_perm)
        for s in shingles:
            m.update(s.encode("utf-8"))
        cands = [j for j in lsh.query(m) if kept[j].jaccard(m) >= threshold]
        if cands:
            dups[i] = min(cands)
        else:
            lsh.insert(i, m)
            kept[i] = m
    return dups
