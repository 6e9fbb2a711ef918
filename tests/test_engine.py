"""The shared forward-pass helpers agree with a plain full-logits computation."""

import pytest
import torch
import torch.nn.functional as F

from daytune.data.batching import collate
from daytune.data.tokenize import Example
from daytune.engine import decode, score, text
from daytune.engine import loss as engine_loss


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_response_loss_matches_full_logits(tiny_model, monkeypatch):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(0)
    exs = [Example(torch.randint(3, 500, (n,), generator=g).tolist(), []) for n in (9, 14, 5)]
    for e in exs:
        e.labels = [-100] * 3 + e.input_ids[3:]
    batch = collate(exs, pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        loss, n = engine_loss.response_loss(model, batch)
    assert n == sum(len(e.input_ids) - 3 for e in exs)
    assert torch.allclose(loss, ref, atol=1e-4)
    monkeypatch.setattr(
        engine_loss, "CHUNK", 4
    )  # the chunked, checkpointed path gives the same value and gradient
    with torch.no_grad():
        chunked, _ = engine_loss.response_loss(model, batch)
    assert torch.allclose(chunked, ref, atol=1e-4)


def test_chunked_loss_gradients_match(tiny_model, monkeypatch):
    model, _ = tiny_model
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    w = model.get_output_embeddings().weight
    grads = []
    for chunk in (10_000, 5):
        monkeypatch.setattr(engine_loss, "CHUNK", chunk)
        model.zero_grad()
        loss, _ = engine_loss.response_loss(model, batch)
        loss.backward()
        grads.append(w.grad.clone())
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_heldout_loss_is_the_mean_per_scored_token_in_eval_mode(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(2)
    exs = [Example(torch.randint(3, 500, (n,), generator=g).tolist(), []) for n in (9, 14, 5, 11, 7)]
    for e in exs:
        e.labels = [-100] * 2 + e.input_ids[2:]
    model.train()
    try:
        got = engine_loss.heldout_loss(model, exs, pad_id=2, batch_size=2, device="cpu")
        assert model.training  # the mode is restored
    finally:
        model.eval()
    with torch.no_grad():
        parts = [engine_loss.response_loss(model, engine_loss.pad_batch([e], 2)) for e in exs]
    assert got == pytest.approx(sum(float(x) for x, _ in parts) / sum(n for _, n in parts), abs=1e-5)
    rows = engine_loss.row_losses(model, exs, pad_id=2, batch_size=2, device="cpu")  # per example, in order
    assert [n for _, n in rows] == [n for _, n in parts]
    assert [x for x, _ in rows] == pytest.approx([float(x) for x, _ in parts], abs=1e-4)


def test_heldout_delta_is_a_paired_bootstrap_of_the_pooled_loss():
    from daytune.eval.basic import heldout_delta, pooled_loss

    base = {"row_losses": [[20.0, 10], [9.0, 3], [30.0, 10], [4.0, 2]]}
    tuned = {"row_losses": [[15.0, 10], [6.0, 3], [26.0, 10], [3.0, 2]]}  # better on every example
    d = heldout_delta(base, tuned, iters=200)
    assert pooled_loss([{"loss": 20.0, "n": 10}, {"loss": 9.0, "n": 3}]) == pytest.approx(29 / 13)
    assert d["delta"] == pytest.approx(50 / 25 - 63 / 25) and d["n"] == 4
    assert d["ci_low"] <= d["delta"] <= d["ci_high"] < 0
    assert heldout_delta({"loss": 1.0}, tuned) is None  # results written before per-example losses were kept


def test_prompt_logprobs_match_log_softmax(tiny_model):
    model, _ = tiny_model
    ids = [5, 77, 123, 9, 300, 41, 8]
    ref = full_logprobs(model, ids)
    got = decode.prefill(model, [ids], score_prompt=[3]).prompt_logprobs[0]
    assert len(got) == len(ids) - 1
    for i, (lp, top) in enumerate(got):
        assert abs(lp - ref[i, ids[i + 1]].item()) < 1e-5
        best = ref[i].topk(3)
        assert list(top) == best.indices.tolist()
        assert max(abs(a - b) for a, b in zip(top.values(), best.values.tolist())) < 1e-5


def test_loglikelihood_matches_manual_sum(tiny_model):
    model, _ = tiny_model
    reqs = [([5, 6, 7], [8]), ([5, 6, 7], [9]), ([10, 11], [12, 13, 14]), ([4], [15, 16])]
    got = score.loglikelihood(model, reqs, batch_size=2, pad_id=2)
    for (ctx, cont), value in zip(reqs, got):
        lp = full_logprobs(model, ctx + cont)
        ref = sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        assert abs(value - ref) < 1e-4


def decode_alone(model, prompt, n, sampling=None):
    """One sequence through the server's steps: prefill, then choose a token and feed it, n times."""
    sampling = sampling or decode.Sampling()
    pf = decode.prefill(model, [prompt])
    logits, toks, lps = pf.logits, [], []
    for _ in range(n):
        ((tok, lp, _),) = decode.choose_tokens(logits, [sampling], [0])
        toks.append(tok)
        lps.append(lp)
        logits = decode.decode_step(model, pf.batch, [tok])
    return toks, lps


def test_greedy_generation_matches_transformers(tiny_model):
    model, _ = tiny_model
    prompt = [5, 77, 123, 9]
    toks, lps = decode_alone(model, prompt, 8, decode.Sampling(temperature=1e-7))
    ref = model.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=2
    )
    assert toks == ref[0, len(prompt) :].tolist()
    lp = full_logprobs(model, prompt + toks)
    for j, t in enumerate(toks):
        assert abs(lps[j] - lp[len(prompt) - 1 + j, t].item()) < 1e-4


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    model, _ = tiny_model

    def sample(seed):
        return decode.Sampling(1.0, 0.9, 50, torch.Generator().manual_seed(seed))

    a, _ = decode_alone(model, [5, 6], 10, sample(3))
    b, _ = decode_alone(model, [5, 6], 10, sample(3))
    c, _ = decode_alone(model, [5, 6], 10, sample(4))
    assert a == b and a != c


def test_a_top_p_below_float32s_range_keeps_the_most_likely_token():
    """top_p is compared in float32, where 1e-300 is 0: the most likely token must still be kept."""
    logits = torch.tensor([0.1, 2.0, -1.0, 0.5])
    for top_p in (1e-300, 1e-30, 0.01):
        sampling = decode.Sampling(1.0, top_p, 3, torch.Generator().manual_seed(0))
        ((tok, _, _),) = decode.choose_tokens(logits[None], [sampling], [0])
        assert tok == 1


def test_generation_stops_on_eos(tiny_model):
    model, _ = tiny_model
    first = decode.greedy_generate_batch(model, [[5, 6]], max_new_tokens=5)[0].token_ids[0]
    (out,) = decode.greedy_generate_batch(model, [[5, 6]], max_new_tokens=5, eos_ids={first})
    assert out.token_ids == [] and out.finish_reason == "eos"


# -- text: the incremental detokenizer ------------------------------------------------------------------------------


def quadratic_pieces(tokenizer, ids):
    """The per-token texts as evaluation defined them before the incremental detokenizer: decode every prefix."""
    texts, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if cur.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(cur[len(prev) :] if cur.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = cur
    return texts


class CountingTokenizer:
    """Counts decode calls and the token ids they decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.ids = tokenizer, 0, 0

    def decode(self, ids, **kw):
        self.calls, self.ids = self.calls + 1, self.ids + len(ids)
        return self.tokenizer.decode(ids, **kw)


def sample_ids(tok, n, seed):
    """Real text with multi-byte characters, then random ids (byte tokens that split or break characters, and
    special tokens)."""
    text = "naïve café — 東京 😀, Ω≈ç√ and 48 clips.\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    return (ids + torch.randint(0, len(tok), (n,), generator=g).tolist())[:n]


def test_token_texts_equal_decoding_every_prefix(tiny_model):
    _, tok = tiny_model
    for seed in range(5):
        ids = sample_ids(tok, 120, seed)
        assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens hold only part of a character
        assert text.token_texts(tok, ids) == quadratic_pieces(tok, ids)


def test_detokenizer_decodes_a_bounded_window_per_token(tiny_model):
    _, tok = tiny_model
    n = 400
    ids = sample_ids(tok, n, 0)
    counting = CountingTokenizer(tok)
    assert text.token_texts(counting, ids) == quadratic_pieces(tok, ids)
    assert counting.calls <= 2 * n + 2
    assert counting.ids <= 10 * n  # decoding every prefix reads n (n + 1) / 2 = 80,200 ids


def test_eval_stop_watch_sees_the_decode_of_every_token_so_far(tiny_model):
    """Evaluation's rule: stop once the decoded text (no special tokens) contains a stop sequence."""
    _, tok = tiny_model
    for seed in range(20):
        ids = sample_ids(tok, 80, seed)
        full = tok.decode(ids, skip_special_tokens=True)
        stops = [full[40 + seed : 42 + seed], "\ufffd"[: seed % 2]]  # some runs watch for U+FFFD itself
        watch = text.StopWatcher(text.TextStream(tok, skip_special_tokens=True), stops, see_pending=True)
        got = next((t for t in range(1, len(ids) + 1) if watch(ids[t - 1])), None)
        ref = next(
            (
                t
                for t in range(1, len(ids) + 1)
                if text.cut_at_stop(tok.decode(ids[:t], skip_special_tokens=True), stops) is not None
            ),
            None,
        )
        assert got == ref
