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

_checked: dict[tuple, bool] = {}


def output_layer(model):
    """The output projection, also through a DistributedDataParallel wrapper."""
    return getattr(model, "module", model).get_output_embeddings()


def final_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (normalized) hidden states, shape (batch, seq, hidden), through the model's own forward (so PEFT
    wrappers apply) with only the last position's logits computed."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **({"position_ids": position_ids} if position_ids is not None else {}),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    h = out.hidden_states[-1][:, -input_ids.shape[1] :]  # prompt-tuning methods prepend virtual tokens
    _check_head(model, out, h)
    return h


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


@torch.no_grad()
def token_logprobs(model, ids: list[int], top_k: int = 0) -> list[tuple[float, dict[int, float]]]:
    """For positions 1..n-1: log P(ids[i] | ids[:i]) and the top_k alternatives {token id: logprob}."""
    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    h = final_hidden(model, x)[0, :-1]
    return _score_positions(output_layer(model), h, x[0, 1:], top_k)


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
    """Decode one sequence: the server's batched machinery (prefill, decode_step, choose_tokens) with one row.
    Reported log-probabilities are the model's own (temperature 1, before top-k/top-p), so they mean the same
    thing whatever the sampling settings. `stop_check(ids)` returning True ends decoding early (stop sequences are
    cut by the caller)."""
    sampling = Sampling(
        temperature, top_p, top_k, torch.Generator().manual_seed(seed) if seed is not None else None
    )
    pre = prefill(model, [prompt_ids])
    batch, logits = pre.batch, pre.logits
    out = Generated([], [], [])
    for _ in range(max_new_tokens):
        ((tok, logprob, tops),) = choose_tokens(logits, [sampling], [top_k_per_token])
        if tok in eos_ids:
            out.finish_reason = "eos"
            break
        out.token_ids.append(tok)
        out.logprobs.append(logprob)
        if top_k_per_token > 0:
            out.top_logprobs.append(tops)
        if stop_check is not None and stop_check(out.token_ids):
            out.finish_reason = "stop"
            break
        logits = decode_step(model, batch, [tok])
    return out


# -- Batched decoding for the server ---------------------------------------------------------------------------
#
# A running batch holds several sequences of different lengths in one left-padded KV cache. Each row keeps its own
# attention mask (0 over its padding) and its own next position id, so a row computes exactly what it would compute
# alone: padding never enters attention and RoPE sees the row's true positions. Rows join (`merge_batches`) and
# leave (`select_rows`) between steps, which is what lets a server batch requests that arrive at different times.


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


def _cache_kwarg(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; use whichever this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model, ids, mask, positions, cache, hidden: bool):
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=hidden,
        **{_cache_kwarg(model): cache},
    )


def _cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def prefill(
    model, prompts: list[list[int]], *, score_prompt: list[int | None] | None = None, pad_id: int = 0
) -> Prefilled:
    """Run the prompts as one left-padded batch and return the cache for decoding.

    `score_prompt[i]` is None (no prompt scoring) or the number of top alternatives wanted per prompt token: the
    prompt's log-probabilities come from the same forward pass, at the cost of keeping its hidden states."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prefill needs at least one non-empty prompt per row")
    device = next(model.parameters()).device
    score_prompt = score_prompt or [None] * len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want_hidden = any(k is not None for k in score_prompt)
    out = _forward(model, ids, mask, positions, None, want_hidden)
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


def _check_head(model, out, h) -> None:
    """One-time check (per model class and PEFT method) that the last hidden states feed the output layer
    directly, which every helper here relies on to apply the output layer only where it is needed."""
    key = (type(model), str(getattr(getattr(model, "active_peft_config", None), "peft_type", "")))
    if key not in _checked:
        with torch.no_grad():
            ref = out.logits[:, -1].float()
            got = output_layer(model)(h[:, -1]).float()
            _checked[key] = torch.allclose(ref, got, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    if not _checked[key]:
        raise RuntimeError(
            f"{type(model).__name__}: final hidden states do not feed the output layer directly"
        )


def _score_positions(head, h: torch.Tensor, targets: torch.Tensor, top_k: int):
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


def _layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError(
            f"{type(cache).__name__}: only plain (full-attention) dynamic caches can be merged across requests"
        )
    return layers


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


@dataclass
class Sampling:
    """How one row picks its next token. Greedy below GREEDY_BELOW; `generator` makes a seeded row reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None


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


def _in_batches(model, seqs, groups, rest, batch_size: int, work) -> None:
    """Call work(batch, prefix_len, cache) on batches of similar length: each shared-prefix group with its prefix
    computed once, then the rest without a cache (longest first: padding stays small, memory peaks early)."""
    for prefix_len, members in groups:
        cache = _prefix_cache(model, seqs[members[0]][:prefix_len])
        members.sort(key=lambda i: len(seqs[i]), reverse=True)
        for b in range(0, len(members), batch_size):
            work(members[b : b + batch_size], prefix_len, cache)
    rest.sort(key=lambda i: len(seqs[i]), reverse=True)
    for b in range(0, len(rest), batch_size):
        work(rest[b : b + batch_size], 0, None)


def _prefix_cache(model, prefix: list[int] | tuple[int, ...]):
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], device=device)
    return _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))


def _expand(cache, batch: int):
    import copy

    if cache is None:
        return None
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(batch)
    return c


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

    _in_batches(model, keys, groups, rest, batch_size, score)
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
            res = _forward(model, x, mask, pos, past, hidden=False)
            past = _cache_of(res)
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

    _in_batches(model, prompts, groups, rest, batch_size, decode)
    return results  # type: ignore[return-value]
