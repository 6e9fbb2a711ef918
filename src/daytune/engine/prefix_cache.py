"""A cross-request prefix cache: the KV caches of recently prefilled prompts, kept under a byte bound, so that a
request whose prompt starts with tokens the server has already seen prefills only the rest.

HELM sends hundreds of requests that share a long few-shot prefix (MMLU: the instructions and five solved
questions of a subject, several hundred tokens, before each question of tens). Without a cache every request
prefills the whole prompt again; with it, the first request of a subject pays for the prefix and the others reuse it.

Entries are whole prompts (their KV for every layer, one row). A new prompt reuses the longest common prefix it has
with any entry, cut where it first differs, and always leaves its last token to compute (its logits choose the
first new token). When two prompts share a prefix, that prefix is stored as an entry of its own, so the shared part
outlives the prompts around it under least-recently-used eviction (by bytes). Lookups compare token ids on the
entries' device in one vectorised pass per entry.

Only plain dynamic caches (full attention, what `decode.can_merge` accepts) are cached; a prompt whose
log-probabilities are asked for (`echo_prompt`) is prefilled whole, since the cached prefix kept no hidden states,
and is then cached for the requests after it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from daytune.engine.forward import MIN_SHARED, _layers, prefix_groups


@dataclass
class Entry:
    key: tuple[int, ...]
    ids: torch.Tensor  # (length,) long, on the cache's device
    keys: list[torch.Tensor]  # per layer (1, kv_heads, length, head_dim)
    values: list[torch.Tensor]
    nbytes: int


@dataclass
class Hit:
    """A cached prefix of `length` tokens, to expand over a prefill batch (`cache_for`)."""

    length: int
    entry: Entry

    def cache_for(self, rows: int):
        """A new DynamicCache holding this prefix for `rows` rows (the entry itself is never written to)."""
        from transformers.cache_utils import DynamicCache

        n = self.length
        return DynamicCache(
            [
                (k[:, :, :n].expand(rows, -1, -1, -1), v[:, :, :n].expand(rows, -1, -1, -1))
                for k, v in zip(self.entry.keys, self.entry.values)
            ]
        )


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = MIN_SHARED):
        self.max_bytes = int(max_bytes)
        self.min_tokens = max(1, min_tokens)
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        # entries by their first min_tokens tokens: a prefix worth reusing starts with them, so a lookup only
        # compares a prompt with the entries that begin as it does (thousands of unrelated prompts cost nothing)
        self.buckets: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        self.bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "tokens_reused": 0, "tokens_prefilled": 0, "evicted": 0}

    def lookup(self, ids: list[int]) -> Hit | None:
        """The longest cached prefix of `ids` worth reusing (at least `min_tokens`, at most len(ids) - 1)."""
        best: Hit | None = None
        query = None
        for key in sorted(self._bucket(ids), key=lambda k: (len(k), k)):  # ties: the shortest entry, always
            entry = self.entries[key]
            if query is None or query.device != entry.ids.device:
                query = torch.tensor(ids, dtype=torch.long, device=entry.ids.device)
            n = min(_common(query, entry.ids), len(ids) - 1)
            if n >= self.min_tokens and (best is None or n > best.length):
                best = Hit(n, entry)
        return best

    def plan(
        self, model, prompts: list[list[int]], eligible: list[bool], pad_id: int = 0
    ) -> list[tuple[Hit | None, list[int]]]:
        """Split a prefill's prompts into groups that run together: (a prefix, the indices that reuse it), then
        (None, the rest). A prompt reuses the longest cached prefix it has (one group per entry, at the shortest
        length its members share); prompts that found none but share a prefix among themselves (the first
        requests of a few-shot run, arriving together) get that prefix computed once here and kept. Prompts not
        `eligible` (those whose own log-probabilities are wanted) always run whole."""
        groups: dict[tuple[int, ...], tuple[Hit, list[int]]] = {}
        rest = []
        for i, ids in enumerate(prompts):
            hit = self.lookup(ids) if eligible[i] else None
            self.stats["lookups"] += 1
            if hit is None:
                rest.append(i)
            elif hit.entry.key in groups:
                group = groups[hit.entry.key]
                group[0].length = min(group[0].length, hit.length)
                group[1].append(i)
            else:
                groups[hit.entry.key] = (hit, [i])
        out: list[tuple[Hit | None, list[int]]] = list(groups.values())
        for key in groups:
            self.entries.move_to_end(key)
        computed = 0
        misses = [i for i in rest if eligible[i]]
        if len(misses) > 1:
            shared, _ = prefix_groups(
                [prompts[i] for i in misses], [len(prompts[i]) - 1 for i in misses], self.min_tokens
            )
            for length, group in shared:
                members = [misses[j] for j in group]
                hit = self._compute(model, prompts[members[0]][:length], pad_id)
                if hit is not None:
                    out.append((hit, members))
                    computed += length
                    rest = [i for i in rest if i not in members]
        reused = sum(hit.length * len(members) for hit, members in out)
        self.stats["hits"] += len(prompts) - len(rest)
        self.stats["tokens_reused"] += reused
        self.stats["tokens_prefilled"] += sum(len(p) for p in prompts) - reused + computed
        return out + ([(None, rest)] if rest else [])

    def _compute(self, model, prefix: list[int], pad_id: int) -> Hit | None:
        """Prefill `prefix` alone and keep it as an entry; None when it does not fit the bound."""
        from daytune.engine.decode import prefill

        try:
            layers = _layers(prefill(model, [prefix], pad_id=pad_id).batch.cache)
        except NotImplementedError:  # a cache rows cannot share (sliding windows): the scheduler turns it off
            return None
        key = tuple(prefix)
        self._add(key, [layer.keys for layer in layers], [layer.values for layer in layers])
        entry = self.entries.get(key)
        return Hit(len(prefix), entry) if entry is not None else None

    def insert(self, ids: list[int], cache, row: int, columns: torch.Tensor, hit: Hit | None = None) -> None:
        """Keep row `row` of a prefilled batch's `cache` as the entry for `ids`: `columns` are that row's real
        (non-padding) cache columns, in order. With the `hit` it was prefilled from, the prefix it shares with
        the hit's prompt becomes an entry of its own; the prompt itself is kept only when its part beyond that
        prefix is long (a quarter of it or more: its tail may be what later prompts share), since an MMLU
        question's few tens of tokens after a cached few-shot prefix would only take memory."""
        if self.max_bytes <= 0 or len(ids) < self.min_tokens:
            return
        key = tuple(ids)
        if (
            hit is not None
            and hit.length < len(hit.entry.key)
            and not self._covered(hit.entry.key[: hit.length])
        ):
            # the two prompts share hit.length tokens: that prefix becomes an entry (it outlives both)
            n = hit.length
            self._add(
                hit.entry.key[:n],
                [k[:, :, :n].clone() for k in hit.entry.keys],
                [v[:, :, :n].clone() for v in hit.entry.values],
            )
        if hit is not None and len(ids) - hit.length < max(self.min_tokens, len(ids) / 4):
            return
        if any(len(k) >= len(key) and k[: len(key)] == key for k in self._bucket(key)):
            return  # an entry already holds this prompt's KV
        layers = _layers(cache)
        self._add(
            key,
            [layer.keys[row : row + 1, :, columns].clone() for layer in layers],
            [layer.values[row : row + 1, :, columns].clone() for layer in layers],
        )

    def _add(self, key: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        if nbytes > self.max_bytes:
            return
        while self.entries and self.bytes + nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.stats["evicted"] += 1
        ids = torch.tensor(key, dtype=torch.long, device=keys[0].device)
        self.entries[key] = Entry(key, ids, keys, values, nbytes)
        self.buckets.setdefault(key[: self.min_tokens], set()).add(key)
        self.bytes += nbytes

    def _covered(self, prefix: tuple[int, ...]) -> bool:
        """Whether an entry is this prefix, or its first 90% or more (then another copy of nearly the same
        tokens would only take memory)."""
        return any(
            0.9 * len(prefix) <= len(k) <= len(prefix) and prefix[: len(k)] == k for k in self._bucket(prefix)
        )

    def _bucket(self, ids) -> set[tuple[int, ...]]:
        return self.buckets.get(tuple(ids[: self.min_tokens]), set())

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes -= self.entries.pop(key).nbytes
        bucket = self.buckets[key[: self.min_tokens]]
        bucket.discard(key)
        if not bucket:
            del self.buckets[key[: self.min_tokens]]

    def info(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes, **self.stats}


def _common(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the common prefix of two 1-D id tensors."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n
