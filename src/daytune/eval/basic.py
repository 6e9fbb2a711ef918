"""Two honest numbers for base vs tuned: held-out response loss (the training objective on unseen rows) and
multiple-choice accuracy by comparing the log-likelihood of each option letter (HELM's MMLU prompt format)."""

from __future__ import annotations

import math
import time

import torch

from daytune.config import DataConfig, EvalConfig
from daytune.data import encode_records, read_instructions, read_multiple_choice
from daytune.engine.loss import row_losses
from daytune.engine.score import loglikelihood

LETTERS = "ABCDEFGHIJ"


def heldout_loss(
    model,
    tokenizer,
    records,
    template: str,
    max_seq_len: int,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> dict:
    examples, stats = encode_records(records, tokenizer, template, max_seq_len, system_prompt)
    device = next(model.parameters()).device
    rows = row_losses(model, examples, tokenizer.pad_token_id, batch_size, device)
    # tokens scored: every label but each example's first, which no token predicts
    count = sum(n for _, n in rows)
    mean = sum(total for total, _ in rows) / max(1, count)
    return {
        "loss": round(mean, 5),
        "perplexity": round(math.exp(mean), 4),
        "tokens": count,
        "rows": len(examples),
        "truncated": stats.truncated,
        "dropped": stats.dropped_no_response,
        "row_losses": [[round(total, 5), n] for total, n in rows],  # for paired CIs (pooled_loss)
    }


def pooled_loss(rows: list[dict]) -> float:
    """Loss per token over a sample of examples ({"loss": summed loss, "n": tokens}), as heldout_loss pools it."""
    return sum(r["loss"] for r in rows) / max(1, sum(r["n"] for r in rows))


def heldout_delta(base: dict, tuned: dict, iters: int = 1000) -> dict | None:
    """The tuned minus base held-out loss with its 95% CI from a paired bootstrap over the examples both scored,
    or None when either lacks per-example losses (results written before they were kept)."""
    from daytune.eval.metrics import paired_bootstrap

    a, b = base.get("row_losses"), tuned.get("row_losses")
    if not a or not b or len(a) != len(b):
        return None
    ra = [{"loss": x, "n": n} for x, n in a]
    rb = [{"loss": x, "n": n} for x, n in b]
    lo, hi, p = paired_bootstrap(ra, rb, pooled_loss, iters=iters)
    return {"delta": pooled_loss(rb) - pooled_loss(ra), "ci_low": lo, "ci_high": hi, "p": p, "n": len(a)}


def mc_prompt(row: dict) -> str:
    subject = row.get("subject") or ""
    header = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if subject
        else ""
    )
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(row["choices"]))
    return f"{header}{row['question']}\n{options}Answer:"


def _split_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize context+continuation together and split, as lm-eval does, so merges at the seam are natural."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, rows, batch_size: int = 8) -> dict:
    requests, owners = [], []
    for r, row in enumerate(rows):
        prompt = mc_prompt(row)
        for i in range(len(row["choices"])):
            requests.append(_split_encode(tokenizer, prompt, f" {LETTERS[i]}"))
            owners.append((r, i))
    scores = loglikelihood(model, requests, batch_size, tokenizer.pad_token_id)
    best: dict[int, tuple[float, int]] = {}
    for (r, i), s in zip(owners, scores):
        if r not in best or s > best[r][0]:
            best[r] = (s, i)
    correct = sum(1 for r, row in enumerate(rows) if best[r][1] == row["answer"])
    n = len(rows)
    acc = correct / n
    return {
        "accuracy": round(acc, 4),
        "stderr": round(math.sqrt(acc * (1 - acc) / n), 4),
        "correct": correct,
        "n": n,
    }


def evaluate(model, tokenizer, ecfg: EvalConfig, dcfg: DataConfig) -> dict:
    """Everything `eval` in a recipe asks for, as one JSON-ready dict."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    out: dict = {}
    try:
        if ecfg.heldout:
            records = read_instructions(ecfg.heldout, ecfg.heldout_rows)
            out["heldout"] = heldout_loss(
                model,
                tokenizer,
                records,
                dcfg.template,
                dcfg.max_seq_len,
                ecfg.batch_size,
                dcfg.system_prompt,
            )
        if ecfg.multiple_choice:
            rows = read_multiple_choice(ecfg.multiple_choice, ecfg.multiple_choice_rows)
            out["multiple_choice"] = multiple_choice_accuracy(model, tokenizer, rows, ecfg.batch_size)
    finally:
        model.train(was_training)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
