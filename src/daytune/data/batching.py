"""Batch order and collation. The order is a pure function of (seed, epoch), so a resumed run sees exactly the
micro-batches the interrupted run would have seen next."""

from __future__ import annotations

import torch

from daytune.data.tokenize import IGNORE_INDEX, Example


def micro_batches_per_epoch(n_examples: int, micro_batch: int) -> int:
    return -(-n_examples // micro_batch)


def micro_batch_indices(n_examples: int, micro_batch: int, seed: int, k: int) -> list[int]:
    """Example indices of the k-th micro-batch of the whole run (epochs follow each other, reshuffled)."""
    per_epoch = micro_batches_per_epoch(n_examples, micro_batch)
    epoch, pos = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=g).tolist()
    return order[pos * micro_batch : (pos + 1) * micro_batch]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
