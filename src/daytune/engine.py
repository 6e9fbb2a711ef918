"""The forward-pass helpers that training, evaluation and the server share.

All of them run the model once up to its final hidden states and apply the output layer only where a
log-probability is needed, in chunks: a full (sequence x vocabulary) fp32 logits tensor (256 x 49k x 4 B = 50 MB
per row for SmolLM2) is never built, and prompt tokens that are masked from the loss cost no output-layer work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from daytune.data.tokenize import IGNORE_INDEX

CHUNK = 1024  # positions per output-layer chunk

_checked: dict[type, bool] = {}


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final (normalized) hidden states, shape (batch, seq, hidden), through the model's own forward (so PEFT
    wrappers apply) with only the last position's logits computed."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    h = out.hidden_states[-1][:, -input_ids.shape[1] :]  # prompt-tuning methods prepend virtual tokens
    key = type(model)
    if key not in _checked:  # one-time check that hidden_states[-1] really feeds the output layer
        with torch.no_grad():
            ref = out.logits[:, -1].float()
            got = model.get_output_embeddings()(h[:, -1]).float()
            _checked[key] = torch.allclose(ref, got, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        if not _checked[key]:
            raise RuntimeError(
                f"{type(model).__name__}: final hidden states do not feed the output layer directly"
            )
    return h


def _chunk_ce(head_weight: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, head_weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions != -100, and their count.

    Chunks of the output layer are recomputed in backward (activation checkpointing) when there is more than one,
    so peak memory holds one chunk of logits, not all of them."""
    h = final_hidden(model, batch["input_ids"], batch.get("attention_mask"))
    labels = batch["labels"][:, 1:]
    selected = labels != IGNORE_INDEX
    hs = h[:, :-1][selected]
    targets = labels[selected]
    n = int(targets.numel())
    head = model.get_output_embeddings()
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


@torch.no_grad()
def token_logprobs(model, ids: list[int], top_k: int = 0) -> list[tuple[float, dict[int, float]]]:
    """For positions 1..n-1: log P(ids[i] | ids[:i]) and the top_k alternatives {token id: logprob}."""
    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    h = final_hidden(model, x)[0, :-1]
    head = model.get_output_embeddings()
    targets = x[0, 1:]
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


def loglikelihood(
    model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
) -> list[float]:
    """Sum of log P(continuation | context) for each (context ids, continuation ids) request.

    Requests are sorted by length (less padding) and batched; requests that share a context and have one-token
    continuations (multiple-choice letters) share a single forward pass, and a long shared prefix (few-shot
    examples) runs once, reused through the KV cache (see `loglikelihood_detailed`)."""
    return [ll for ll, _ in loglikelihood_detailed(model, requests, batch_size, pad_id)]


@dataclass
class Generated:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str = "length"  # length | eos | stop


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator) -> int:
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


GREEDY_BELOW = 1e-4  # HELM asks for greedy decoding with temperature 1e-7


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_ids: set[int] = frozenset(),
    top_k_per_token: int = 0,
    stop_check=None,
) -> Generated:
    """Decode one sequence with a KV cache. Reported log-probabilities are the model's own (temperature 1,
    before top-k/top-p), so they mean the same thing whatever the sampling settings. `stop_check(ids)` returning
    True ends decoding early (stop sequences are cut by the caller)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
    out = Generated([], [], [])
    past = None
    x = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        res = model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = res.past_key_values
        logits = res.logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        if temperature < GREEDY_BELOW:
            tok = int(torch.argmax(logits))
        else:
            tok = _sample(logits, temperature, top_p, top_k, gen)
        if tok in eos_ids:
            out.finish_reason = "eos"
            break
        out.token_ids.append(tok)
        out.logprobs.append(float(lp[tok]))
        if top_k_per_token > 0:
            vals, idx = lp.topk(min(top_k_per_token, lp.shape[-1]))
            out.top_logprobs.append(dict(zip(idx.tolist(), vals.tolist())))
        if stop_check is not None and stop_check(out.token_ids):
            out.finish_reason = "stop"
            break
        x = torch.tensor([[tok]], device=device)
    return out


# -- evaluation: shared-prefix reuse through the KV cache ---------------------------------------------------------
# Few-shot evaluation sends many requests that start with the same long prefix (instructions + 5 worked examples).
# The prefix is run once per group with the KV cache kept; each batch of requests then runs only its own suffix.

MIN_SHARED = 16  # tokens: a shorter common prefix is not worth its own cached pass


def _lcp(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(
    seqs: list[list[int]] | list[tuple[int, ...]],
    max_prefix: list[int] | None = None,
    min_shared: int = MIN_SHARED,
) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Split sequence indices into groups that share a token prefix: ([(prefix length, [indices])], [the rest]).

    Sequences are sorted lexicographically so that those sharing a prefix are neighbours (the group's common prefix
    is then the one of its first and last member). A sequence joins the current group while the tokens it saves
    outweigh what shrinking the shared prefix costs the members already in. `max_prefix[i]` caps the prefix for
    sequence i (the positions that must be recomputed, e.g. where its continuation starts)."""
    caps = max_prefix or [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    groups: list[tuple[int, list[int]]] = []
    cur: list[int] = []
    shared = 0
    for i in order:
        if cur:
            new = min(shared, _lcp(seqs[cur[0]], seqs[i]), caps[i])
            if new >= min_shared and len(cur) * (shared - new) <= new:
                cur.append(i)
                shared = new
                continue
            groups.append((shared, cur))
        cur, shared = [i], caps[i]
    if cur:
        groups.append((shared, cur))
    shared_groups = [(p, g) for p, g in groups if len(g) > 1 and p >= min_shared]
    rest = [i for p, g in groups if not (len(g) > 1 and p >= min_shared) for i in g]
    return shared_groups, rest


def _prefix_cache(model, prefix: list[int] | tuple[int, ...]):
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1)
    return out.past_key_values


def _expand(cache, batch: int):
    import copy

    if cache is None:
        return None
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(batch)
    return c


def _suffix_hidden(model, x: torch.Tensor, mask: torch.Tensor, cache, position_ids=None) -> torch.Tensor:
    """Final hidden states of `x` (batch, width) run after a cached prefix (or none), through the model's own
    forward; `mask` covers prefix + x."""
    out = model(
        input_ids=x,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    h = out.hidden_states[-1][:, -x.shape[1] :]
    key = type(model)
    if key not in _checked:
        with torch.no_grad():
            ref = out.logits[:, -1].float()
            got = model.get_output_embeddings()(h[:, -1]).float()
            _checked[key] = torch.allclose(ref, got, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    if not _checked[key]:
        raise RuntimeError(
            f"{type(model).__name__}: final hidden states do not feed the output layer directly"
        )
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
    head = model.get_output_embeddings()
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
        h = _suffix_hidden(model, x, mask, _expand(cache, len(batch)))
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

    for prefix_len, members in groups:
        cache = _prefix_cache(model, keys[members[0]][:prefix_len])
        members.sort(key=lambda i: len(keys[i]), reverse=True)
        for b in range(0, len(members), batch_size):
            score(members[b : b + batch_size], prefix_len, cache)
    rest.sort(key=lambda i: len(keys[i]), reverse=True)
    for b in range(0, len(rest), batch_size):
        score(rest[b : b + batch_size], 0, None)
    return results


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
    """Greedy decoding of many prompts in length-sorted batches with a KV cache; prompts sharing a long prefix
    (few-shot examples) reuse its cache. Each row stops on its own: at an EOS id, or when `stop_check(index,
    token_ids)` says so (stop sequences are cut by the caller). Gives what `generate` gives for each prompt alone
    (up to float rounding from padding). `on_first_step(index, logprobs)` receives each prompt's next-token
    log-probabilities (the whole vocabulary), which score one-token continuations without another pass."""
    device = next(model.parameters()).device
    results: list[Generated | None] = [None] * len(prompts)
    if any(not p for p in prompts):
        raise ValueError("generation needs at least one prompt token")
    if share_prefix:
        groups, rest = prefix_groups(prompts, [len(p) - 1 for p in prompts])
    else:
        groups, rest = [], list(range(len(prompts)))

    def decode(batch: list[int], prefix_len: int, cache) -> None:
        width = max(len(prompts[i]) for i in batch) - prefix_len
        x = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), prefix_len + width), dtype=torch.long, device=device)
        mask[:, :prefix_len] = 1
        for row, i in enumerate(batch):  # left padding: padding sits between the shared prefix and the suffix
            suffix = prompts[i][prefix_len:]
            x[row, width - len(suffix) :] = torch.tensor(suffix, device=device)
            mask[row, prefix_len + width - len(suffix) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = _expand(cache, len(batch))
        outs = [Generated([], []) for _ in batch]
        done = [False] * len(batch)
        pos = positions[:, prefix_len:]
        for step in range(max_new_tokens):
            res = model(
                input_ids=x,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = res.past_key_values
            lp = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
            toks = lp.argmax(-1).tolist()
            if on_first_step is not None and step == 0:
                for row, i in enumerate(batch):
                    on_first_step(i, lp[row])
            for row, tok in enumerate(toks):
                if done[row]:
                    continue
                if tok in eos_ids:
                    outs[row].finish_reason, done[row] = "eos", True
                    continue
                outs[row].token_ids.append(tok)
                outs[row].logprobs.append(float(lp[row, tok]))
                if stop_check is not None and stop_check(batch[row], outs[row].token_ids):
                    outs[row].finish_reason, done[row] = "stop", True
            if all(done):
                break
            x = torch.tensor(toks, device=device)[:, None]
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
        for row, i in enumerate(batch):
            results[i] = outs[row]

    for prefix_len, members in groups:
        cache = _prefix_cache(model, prompts[members[0]][:prefix_len])
        members.sort(key=lambda i: len(prompts[i]), reverse=True)
        for b in range(0, len(members), batch_size):
            decode(members[b : b + batch_size], prefix_len, cache)
    rest.sort(key=lambda i: len(prompts[i]), reverse=True)
    for b in range(0, len(rest), batch_size):
        decode(rest[b : b + batch_size], 0, None)
    return results  # type: ignore[return-value]
