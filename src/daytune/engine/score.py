"""Scoring: log-likelihoods of continuations (evaluation) and log-probabilities of given tokens (echoed prompts),
the output layer applied only at the scored positions."""

from __future__ import annotations

import torch

from daytune.engine.forward import (
    CHUNK,
    _cache_kwarg,
    _check_head,
    _in_batches,
    output_layer,
    prefix_groups,
)


def loglikelihood(
    model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
) -> list[float]:
    """Sum of log P(continuation | context) for each (context ids, continuation ids) request.

    Requests are sorted by length (less padding) and batched; requests that share a context and have one-token
    continuations (multiple-choice letters) share a single forward pass, and a long shared prefix (few-shot
    examples) runs once, reused through the KV cache (see `loglikelihood_detailed`)."""
    return [ll for ll, _ in loglikelihood_detailed(model, requests, batch_size, pad_id)]


def _score_positions(head, h: torch.Tensor, targets: torch.Tensor, top_k: int):
    """[(log P(target), {top_k alternatives: logprob})] for each position of `h`, the output layer in chunks."""
    out: list[tuple[float, dict[int, float]]] = []
    for i in range(0, h.shape[0], CHUNK):
        lp = torch.log_softmax(head(h[i : i + CHUNK]).float(), dim=-1)
        chosen = lp.gather(1, targets[i : i + CHUNK, None])[:, 0].tolist()
        if top_k > 0:
            vals, idx = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            tops = [dict(zip(r_i, r_v)) for r_i, r_v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [{} for _ in chosen]
        out.extend(zip(chosen, tops))
    return out


def _suffix_hidden(model, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Final hidden states of `x` (batch, width) run after a cached prefix (or none), through the model's own
    forward; `mask` covers prefix + x."""
    out = model(
        input_ids=x,
        attention_mask=mask,
        use_cache=cache is not None,
        output_hidden_states=True,
        logits_to_keep=1,
        **({_cache_kwarg(model): cache} if cache is not None else {}),
    )
    h = out.hidden_states[-1][:, -x.shape[1] :]
    _check_head(model, out, h)
    return h


@torch.no_grad()
def loglikelihood_detailed(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    pad_id: int = 0,
    share_prefix: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), whether the continuation is the greedy one) for each request.

    One sequence per distinct context + continuation (requests that share a context and have one-token
    continuations, like multiple-choice letters, share one). Sequences that share a long token prefix (few-shot
    examples) reuse its KV cache; every batch is length-sorted so that padding stays small."""
    device = next(model.parameters()).device
    head = output_layer(model)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    sequences: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for r, (ctx, cont) in enumerate(requests):
        if not cont:
            continue
        if not ctx:
            raise ValueError("loglikelihood needs a non-empty context (prepend a BOS/EOS token)")
        key = tuple(ctx) if len(cont) == 1 else tuple(ctx + cont[:-1])
        sequences.setdefault(key, []).append((r, len(ctx), cont))
    keys = list(sequences)
    # the prefix may cover at most the context minus its last token (whose hidden state scores the continuation)
    caps = [min(n_ctx for _, n_ctx, _ in sequences[k]) - 1 for k in keys]
    if share_prefix:
        groups, rest = prefix_groups(keys, caps)
    else:
        groups, rest = [], list(range(len(keys)))

    def score(batch: list[int], prefix_len: int, cache) -> None:
        batch.sort(key=lambda i: len(keys[i]), reverse=True)
        width = len(keys[batch[0]]) - prefix_len
        x = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), prefix_len + width), dtype=torch.long, device=device)
        mask[:, :prefix_len] = 1
        for row, i in enumerate(batch):
            suffix = keys[i][prefix_len:]
            x[row, : len(suffix)] = torch.tensor(suffix, device=device)
            mask[row, : prefix_len + len(suffix)] = 1
        h = _suffix_hidden(model, x, mask, cache)
        for row, i in enumerate(batch):
            for r, n_ctx, cont in sequences[keys[i]]:
                start = n_ctx - 1 - prefix_len
                total, greedy = 0.0, True
                for c in range(0, len(cont), CHUNK):  # the output layer in chunks: no (length x vocab) tensor
                    target = torch.tensor(cont[c : c + CHUNK], device=device)
                    lp = torch.log_softmax(head(h[row, start + c : start + c + len(target)]).float(), dim=-1)
                    total += float(lp.gather(1, target[:, None]).sum())
                    greedy = greedy and bool((lp.argmax(-1) == target).all())
                results[r] = (total, greedy)

    _in_batches(model, keys, groups, rest, batch_size, score)
    return results
