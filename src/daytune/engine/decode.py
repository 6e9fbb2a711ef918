"""Decoding: prompts prefilled as one left-padded batch, then one token per row per step.

A running batch holds several sequences of different lengths in one left-padded KV cache. Each row keeps its own
attention mask (0 over its padding) and its own next position id, so a row computes exactly what it would compute
alone: padding never enters attention and RoPE sees the row's true positions. Rows join (`merge_batches`) and
leave (`select_rows`) between steps, which is what lets a server batch requests that arrive at different times.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from daytune.engine.forward import _cache_of, _check_head, _forward, _in_batches, _layers, prefix_groups
from daytune.engine.score import _score_positions


@dataclass
class DecodeBatch:
    """Shared decoding state of the running sequences."""

    cache: object  # transformers DynamicCache, (rows, heads, columns, head_dim) per layer
    mask: torch.Tensor  # (rows, columns) long: 1 over real tokens, 0 over left padding
    positions: torch.Tensor  # (rows,) long: position id of each row's next token

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class Prefilled:
    """What a batched prefill returns: the batch, next-token logits (rows, vocab) and, for rows that asked for
    them, the prompt's own log-probabilities (positions 1..n-1)."""

    batch: DecodeBatch
    logits: torch.Tensor
    prompt_logprobs: list[list[tuple[float, dict[int, float]]] | None]


@torch.no_grad()
def prefill(
    model,
    prompts: list[list[int]],
    *,
    score_prompt: list[int | None] | None = None,
    pad_id: int = 0,
    prefix_len: int = 0,
    cache=None,
) -> Prefilled:
    """Run the prompts as one left-padded batch and return the cache for decoding.

    `score_prompt[i]` is None (no prompt scoring) or the number of top alternatives wanted per prompt token: the
    prompt's log-probabilities come from the same forward pass, at the cost of keeping its hidden states.
    With `cache` (a shared prefix of `prefix_len` tokens, expanded over the rows), the prompts are what follows
    that prefix: the padding then sits between the prefix and each row's own tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prefill needs at least one non-empty prompt per row")
    device = next(model.parameters()).device
    score_prompt = score_prompt or [None] * len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), prefix_len + width), dtype=torch.long, device=device)
    mask[:, :prefix_len] = 1
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, prefix_len + width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
    want_hidden = any(k is not None for k in score_prompt)
    out = _forward(model, ids, mask, positions, cache, want_hidden)
    logits = out.logits[:, -1].float()
    scored: list[list[tuple[float, dict[int, float]]] | None] = [None] * len(prompts)
    if want_hidden:
        h = out.hidden_states[-1]
        _check_head(model, out, h)
        head = model.get_output_embeddings()
        for i, p in enumerate(prompts):
            if score_prompt[i] is None:
                continue
            start = width - len(p)
            scored[i] = _score_positions(head, h[i, start : width - 1], ids[i, start + 1 :], score_prompt[i])
    batch = DecodeBatch(_cache_of(out), mask, mask.sum(-1))
    return Prefilled(batch, logits, scored)


@torch.no_grad()
def decode_step(model, batch: DecodeBatch, tokens: list[int]) -> torch.Tensor:
    """Feed one token per row; return next-token logits (rows, vocab) in fp32. Updates `batch` in place."""
    device = batch.mask.device
    x = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
    batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
    out = _forward(model, x, batch.mask, batch.positions[:, None], batch.cache, False)
    batch.cache = _cache_of(out)
    batch.positions = batch.positions + 1
    return out.logits[:, -1].float()


def can_merge(batch: DecodeBatch) -> bool:
    """Whether rows can join this batch's cache (sliding-window and other special caches cannot)."""
    try:
        _layers(batch.cache)
    except NotImplementedError:
        return False
    return True


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_batches(a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
    """Rows of `a` then rows of `b` in one batch, the shorter cache left-padded (and masked) to the longer."""
    la, lb = _layers(a.cache), _layers(b.cache)
    width = max(a.mask.shape[1], b.mask.shape[1])
    for x, y in zip(la, lb):
        x.keys = torch.cat([_left_pad(x.keys, width, -2), _left_pad(y.keys, width, -2)], dim=0)
        x.values = torch.cat([_left_pad(x.values, width, -2), _left_pad(y.values, width, -2)], dim=0)
    mask = torch.cat([_left_pad(a.mask, width, 1), _left_pad(b.mask, width, 1)], dim=0)
    return DecodeBatch(a.cache, mask, torch.cat([a.positions, b.positions]))


def select_rows(batch: DecodeBatch, keep: list[int]) -> DecodeBatch:
    """Keep only the rows `keep` (in that order), and drop leading columns that are padding in every kept row."""
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask[idx]
    real = mask.any(0).nonzero()
    first = int(real[0]) if len(real) else 0
    for layer in getattr(batch.cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
    return DecodeBatch(batch.cache, mask[:, first:], batch.positions[idx])


# -- choosing the next token -------------------------------------------------------------------------------------

GREEDY_BELOW = 1e-4  # HELM asks for greedy decoding with temperature 1e-7


@dataclass
class Sampling:
    """How one row picks its next token. Greedy below GREEDY_BELOW; `generator` makes a seeded row reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator) -> int:
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        keep[0] = True  # the most likely token, even when top_p is below float32's smallest number
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def choose_tokens(
    logits: torch.Tensor, sampling: list[Sampling], top_k_per_token: list[int]
) -> list[tuple[int, float, dict[int, float]]]:
    """Next token per row, with its log-probability under the model's own distribution (temperature 1, before
    top-k/top-p) and the row's requested number of top alternatives."""
    lp = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(-1).tolist()
    k_max = max(top_k_per_token, default=0)
    if k_max > 0:
        top_vals, top_idx = lp.topk(min(k_max, lp.shape[-1]), dim=-1)
        top_vals, top_idx = top_vals.tolist(), top_idx.tolist()
    out = []
    for i, s in enumerate(sampling):
        if s.temperature < GREEDY_BELOW:
            tok = greedy[i]
        else:
            gen = s.generator or torch.Generator().manual_seed(random.randrange(2**31))
            tok = _sample(logits[i], s.temperature, s.top_p, s.top_k, gen)
        k = top_k_per_token[i]
        tops = dict(zip(top_idx[i][:k], top_vals[i][:k])) if k > 0 else {}
        out.append((tok, float(lp[i, tok]), tops))
    return out


# -- evaluation: greedy generation of many prompts ---------------------------------------------------------------


@dataclass
class Generated:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "length"  # length | eos | stop


@torch.no_grad()
def greedy_generate_batch(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_ids: set[int] = frozenset(),
    stop_check=None,
    batch_size: int = 8,
    pad_id: int = 0,
    share_prefix: bool = True,
    on_first_step=None,
) -> list[Generated]:
    """Greedy decoding of many prompts in length-sorted batches, with the server's steps (`prefill`,
    `decode_step`); prompts sharing a long prefix (few-shot examples) reuse its cache. Each row stops on its own:
    at an EOS id, or when `stop_check(index, token_ids)`, called after each of its tokens, says so (stop sequences
    are cut by the caller); finished rows stay in the batch until all are done. `on_first_step(index, logprobs)`
    receives each prompt's next-token log-probabilities (the whole vocabulary), which score one-token
    continuations without another pass."""
    if any(not p for p in prompts):
        raise ValueError("generation needs at least one prompt token")
    results = [Generated([], []) for _ in prompts]
    if max_new_tokens <= 0:
        return results
    if share_prefix:
        groups, rest = prefix_groups(prompts, [len(p) - 1 for p in prompts])
    else:
        groups, rest = [], list(range(len(prompts)))

    def run(batch: list[int], prefix_len: int, cache) -> None:
        suffixes = [prompts[i][prefix_len:] for i in batch]
        pre = prefill(model, suffixes, pad_id=pad_id, prefix_len=prefix_len, cache=cache)
        logits, done = pre.logits, [False] * len(batch)
        for step in range(max_new_tokens):
            lp = torch.log_softmax(logits, dim=-1)
            toks = lp.argmax(-1).tolist()  # greedy over log-probabilities, as evaluation always chose
            if on_first_step is not None and step == 0:
                for row, i in enumerate(batch):
                    on_first_step(i, lp[row])
            for row, (i, tok) in enumerate(zip(batch, toks)):
                if done[row]:
                    continue
                out = results[i]
                if tok in eos_ids:
                    out.finish_reason, done[row] = "eos", True
                    continue
                out.token_ids.append(tok)
                out.logprobs.append(float(lp[row, tok]))
                if stop_check is not None and stop_check(i, out.token_ids):
                    out.finish_reason, done[row] = "stop", True
            if all(done) or step == max_new_tokens - 1:
                break
            logits = decode_step(model, pre.batch, toks)

    _in_batches(model, prompts, groups, rest, batch_size, run)
    return results
