"""Batch order, packing and collation.

The order of micro-batches is a pure function of (seed, epoch), so a resumed run sees exactly the micro-batches the
interrupted run would have seen next, and every process of a multi-process run can compute every other's batches.

A micro-batch is a list of rows; a row is a list of example indices: one example per row normally, several when
packing. Packed rows carry per-example position ids and a block-diagonal causal mask, so examples never attend
to each other and each one's loss equals its unpacked loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from daytune.data.tokenize import IGNORE_INDEX, Example
from daytune.engine.loss import pad_batch

Row = list[int]
MicroBatch = list[Row]


def micro_batches_per_epoch(n_examples: int, micro_batch: int) -> int:
    return -(-n_examples // micro_batch)


def _pack(order: list[int], lengths: list[int], capacity: int, window: int = 64) -> list[Row]:
    """First-fit packing over a window of open rows (near-optimal fill, linear time, order stays shuffled)."""
    rows: list[Row] = []
    open_rows: list[tuple[int, Row]] = []  # (space left, row)
    for i in order:
        n = lengths[i]
        for j, (space, row) in enumerate(open_rows):
            if n <= space:
                row.append(i)
                open_rows[j] = (space - n, row)
                break
        else:
            open_rows.append((capacity - n, [i]))
            if len(open_rows) > window:  # close the fullest row
                j = min(range(len(open_rows)), key=lambda j: open_rows[j][0])
                rows.append(open_rows.pop(j)[1])
    rows.extend(row for _, row in open_rows)
    return rows


@dataclass
class BatchPlan:
    lengths: list[int]
    micro_batch: int
    seed: int
    max_seq_len: int
    packing: bool = False
    group_by_length: bool = False
    _epochs: dict[int, list[MicroBatch]] = field(default_factory=dict, repr=False)

    def epoch(self, e: int) -> list[MicroBatch]:
        if e not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + e)
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            if self.packing:
                rows = _pack(order, self.lengths, self.max_seq_len)
                rng.shuffle(rows)
            else:
                rows = [[i] for i in order]
            batches = [rows[s : s + self.micro_batch] for s in range(0, len(rows), self.micro_batch)]
            if self.group_by_length and not self.packing:
                # sort inside chunks of 50 micro-batches, then shuffle the batches: similar lengths, random order
                chunk = self.micro_batch * 50
                rows = []
                for s in range(0, len(order), chunk):
                    rows += [[i] for i in sorted(order[s : s + chunk], key=lambda i: -self.lengths[i])]
                batches = [rows[s : s + self.micro_batch] for s in range(0, len(rows), self.micro_batch)]
                rng.shuffle(batches)
            self._epochs[e] = batches
        return self._epochs[e]

    def per_epoch(self) -> int:
        return len(self.epoch(0))

    def get(self, k: int) -> MicroBatch:
        """The k-th micro-batch of the whole run (epochs follow each other, each reshuffled)."""
        e = 0
        while k >= len(self.epoch(e)):
            k -= len(self.epoch(e))
            e += 1
        if len(self._epochs) > 4:  # keep memory bounded on long runs
            for old in [x for x in self._epochs if x < e - 1]:
                del self._epochs[old]
        return self.epoch(e)[k]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest; padded positions are masked out of attention and loss."""
    return pad_batch(examples, pad_id)


def collate_packed(rows: list[list[Example]], pad_id: int, varlen: bool = False) -> dict[str, torch.Tensor]:
    """Several examples per row: positions restart at 0 for each example, attention is block-diagonal causal, and
    the first token of each example carries no label (it would be predicted from the previous example).
    `varlen`: instead of the (batch, 1, seq, seq) mask, the segments of the rows flattened one after the other
    (each example, and each row's padding, one segment) for variable-length attention on CUDA."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segments = torch.full((b, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = s
            at += n
    if varlen:
        lengths = []
        for row in rows:
            lengths += [len(e.input_ids) for e in row]
            used = sum(len(e.input_ids) for e in row)
            lengths += [width - used] if used < width else []
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        longest = torch.tensor(max(lengths))
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "n_tokens": torch.tensor(int((segments >= 0).sum())),
        }
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0) & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no all-masked rows, no NaN
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": mask[:, None],  # (batch, 1, query, key), used as is by the model
        "n_tokens": torch.tensor(int((segments >= 0).sum())),
    }


def make_batch(
    plan: BatchPlan, examples: list[Example], micro: MicroBatch, pad_id: int, varlen: bool = False
) -> dict[str, torch.Tensor]:
    """One micro-batch as tensors; `varlen`: packed rows carry segments instead of a mask (a model switched
    to variable-length attention, on CUDA)."""
    if plan.packing:
        return collate_packed([[examples[i] for i in row] for row in micro], pad_id, varlen)
    batch = collate([examples[row[0]] for row in micro], pad_id)
    batch["n_tokens"] = batch["attention_mask"].sum()
    return batch
