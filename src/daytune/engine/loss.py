"""The training objective and the held-out loss: next-token cross-entropy on label positions only, the output
layer applied in chunks (see `forward`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from daytune.engine import IGNORE_INDEX
from daytune.engine.forward import CHUNK, SEGMENTS, final_hidden, output_layer


def _chunk_ce(head_weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, head_weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def response_loss(model, batch: dict[str, torch.Tensor], fused_ce=None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions != -100, and their count.

    Chunks of the output layer are recomputed in backward (activation checkpointing) when there is more than one,
    so peak memory holds one chunk of logits, not all of them. `fused_ce(hidden, weight, targets)`: a fused
    linear cross-entropy kernel to use instead (train.kernels: liger)."""
    segments = {k: batch[k] for k in SEGMENTS if k in batch}
    h = final_hidden(
        model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), segments
    )
    labels = batch["labels"][:, 1:]
    selected = labels != IGNORE_INDEX
    hs = h[:, :-1][selected]
    targets = labels[selected]
    n = int(targets.numel())
    head = output_layer(model)
    if fused_ce is not None and getattr(head, "bias", None) is None:
        return fused_ce(hs, head.weight, targets), n
    if getattr(head, "bias", None) is not None:
        logits = head(hs).float()
        return F.cross_entropy(logits, targets, reduction="sum"), n
    if n <= CHUNK:
        return _chunk_ce(head.weight, hs, targets), n
    total = hs.new_zeros((), dtype=torch.float32)
    for i in range(0, n, CHUNK):
        total = total + checkpoint(
            _chunk_ce, head.weight, hs[i : i + CHUNK], targets[i : i + CHUNK], use_reentrant=False
        )
    return total, n


def pad_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """One example (anything with `input_ids` and `labels` lists) per row, right-padded to the longest; padded
    positions are masked out of attention and loss."""
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


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    """Mean response loss per label token over `examples`, in eval mode (the model's mode is restored).
    Examples are batched shortest first, so rows of a batch have similar lengths and padding stays small."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(ordered[i : i + batch_size], pad_id).items()}
        loss, n = response_loss(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def row_losses(model, examples, pad_id: int, batch_size: int, device) -> list[tuple[float, int]]:
    """Per example, in order: (summed response loss, label tokens), in eval mode. What a paired bootstrap over
    examples needs to put a confidence interval on a held-out loss and on its change between two models."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    head = output_layer(model)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in rows], pad_id).items()}
        h = final_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
        labels = batch["labels"][:, 1:]
        for j, i in enumerate(rows):
            selected = labels[j] != IGNORE_INDEX
            hs, targets = h[j][selected], labels[j][selected]
            total = sum(
                float(
                    F.cross_entropy(head(hs[c : c + CHUNK]).float(), targets[c : c + CHUNK], reduction="sum")
                )
                for c in range(0, int(targets.numel()), CHUNK)
            )
            out[i] = (total, int(targets.numel()))
    model.train(was_training)
    return out
