"""Calling the model: final hidden states, the output layer, and the KV-cache plumbing every engine module shares.

The model runs up to its final hidden states and the output layer is applied only where a log-probability is
needed, in chunks: a full (sequence x vocabulary) fp32 logits tensor (256 x 49k x 4 B = 50 MB per row for
SmolLM2) is never built, and prompt tokens that are masked from the loss cost no output-layer work.
"""

from __future__ import annotations

import torch

CHUNK = 1024  # positions per output-layer chunk

_checked: dict[tuple, bool] = {}


def output_layer(model):
    """The output projection, also through a DistributedDataParallel wrapper."""
    return getattr(model, "module", model).get_output_embeddings()


SEGMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # packed rows, varlen path


def final_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    segments: dict | None = None,
) -> torch.Tensor:
    """Final (normalized) hidden states, shape (batch, seq, hidden), through the model's own forward (so PEFT
    wrappers apply) with only the last position's logits computed. `segments`: a packed batch's cumulative
    segment lengths for variable-length attention (engine/attention.py) instead of a mask."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **({"position_ids": position_ids} if position_ids is not None else {}),
        **(segments or {}),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    h = out.hidden_states[-1][:, -input_ids.shape[1] :]  # prompt-tuning methods prepend virtual tokens
    _check_head(model, out, h)
    return h


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


# -- the KV cache ------------------------------------------------------------------------------------------------


def _cache_kwarg(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; use whichever this model's forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model, ids, mask, positions, cache, hidden: bool):
    """One forward pass over new tokens with a KV cache: the model's fast path (engine/fast.py) when it has one,
    else its own forward."""
    fast = getattr(model, "_daytune_fast", None)
    if fast is not None:
        return fast(ids, mask, positions, cache, hidden)
    return _model_forward(model, ids, mask, positions, cache, hidden)


def _model_forward(model, ids, mask, positions, cache, hidden: bool):
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


def _layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError(
            f"{type(cache).__name__}: only plain (full-attention) dynamic caches can be merged across requests"
        )
    return layers


def _prefix_cache(model, prefix: list[int] | tuple[int, ...]):
    """The KV cache of one token prefix (a few-shot prompt's shared instructions and examples)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix)], device=device)
    positions = torch.arange(ids.shape[1], device=device)[None]
    return _cache_of(_forward(model, ids, torch.ones_like(ids), positions, None, False))


def _expand(cache, batch: int):
    """A copy of a one-row cache repeated over `batch` rows (the original stays for the next batch)."""
    import copy

    if cache is None:
        return None
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(batch)
    return c


# -- shared-prefix batching (evaluation) -------------------------------------------------------------------------
# Few-shot evaluation sends many requests that start with the same long prefix (instructions + 5 worked examples).
# The prefix is run once per group with the KV cache kept; each batch of requests then runs only its own suffix,
# on a copy of that cache expanded over the batch. Scoring and generation both batch this way.

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
    computed once and `cache` a copy of it expanded over the batch, then the rest without a cache (cache None;
    longest first: padding stays small, memory peaks early)."""
    for prefix_len, members in groups:
        cache = _prefix_cache(model, seqs[members[0]][:prefix_len])
        members.sort(key=lambda i: len(seqs[i]), reverse=True)
        for b in range(0, len(members), batch_size):
            batch = members[b : b + batch_size]
            work(batch, prefix_len, _expand(cache, len(batch)))
    rest.sort(key=lambda i: len(seqs[i]), reverse=True)
    for b in range(0, len(rest), batch_size):
        work(rest[b : b + batch_size], 0, None)
