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
    key = (type(model), str(getattr(getattr(model, "active_peft_config", None), "peft_type", "")))
    if key not in _checked:  # one-time check that hidden_states[-1] really feeds the output layer
        with torch.no_grad():
            ref = out.logits[:, -1].float()
            got = output_layer(model)(h[:, -1]).float()
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
    head = output_layer(model)
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


@torch.no_grad()
def loglikelihood(
    model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
) -> list[float]:
    """Sum of log P(continuation | context) for each (context ids, continuation ids) request.

    Requests are sorted by length (less padding) and batched; requests that share a context and have one-token
    continuations (multiple-choice letters) share a single forward pass."""
    device = next(model.parameters()).device
    head = output_layer(model)
    results = [0.0] * len(requests)
    # group: one sequence per distinct (context + continuation), except shared single-token continuations
    sequences: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for r, (ctx, cont) in enumerate(requests):
        if not cont:
            continue
        if not ctx:
            raise ValueError("loglikelihood needs a non-empty context (prepend a BOS/EOS token)")
        if len(cont) == 1:
            key = tuple(ctx)
            sequences.setdefault(key, []).append((r, len(ctx), cont))
        else:
            key = tuple(ctx + cont[:-1])
            sequences.setdefault(key, []).append((r, len(ctx), cont))
    keys = sorted(sequences, key=len, reverse=True)
    for b in range(0, len(keys), batch_size):
        batch_keys = keys[b : b + batch_size]
        width = len(batch_keys[0])
        x = torch.full((len(batch_keys), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(x)
        for i, k in enumerate(batch_keys):
            x[i, : len(k)] = torch.tensor(k, device=device)
            mask[i, : len(k)] = 1
        h = final_hidden(model, x, mask)
        for i, k in enumerate(batch_keys):
            for r, n_ctx, cont in sequences[k]:
                pos = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont), device=device)
                lp = torch.log_softmax(head(h[i, pos]).float(), dim=-1)
                results[r] = float(lp.gather(1, torch.tensor(cont, device=device)[:, None]).sum())
    return results


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
