"""The training objective: next-token cross-entropy on label positions only, the output layer applied in chunks
(see `forward`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from daytune.engine import IGNORE_INDEX
from daytune.engine.forward import CHUNK, final_hidden, output_layer


def _chunk_ce(head_weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, head_weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions != -100, and their count.

    Chunks of the output layer are recomputed in backward (activation checkpointing) when there is more than one,
    so peak memory holds one chunk of logits, not all of them."""
    h = final_hidden(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    labels = batch["labels"][:, 1:]
    selected = labels != IGNORE_INDEX
    hs = h[:, :-1][selected]
    targets = labels[selected]
    n = int(targets.numel())
    head = output_layer(model)
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
