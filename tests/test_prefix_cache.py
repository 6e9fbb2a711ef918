"""The server's cross-request prefix cache: requests that reuse a cached prefix get exactly what they get with the
cache off (greedy tokens equal, logprobs to 1e-4), under its byte bound, on the tiny model in fp32."""

import pytest
import torch
from test_serve_batching import run_scheduler

from daytune.engine import decode
from daytune.engine.prefix_cache import PrefixCache
from daytune.serve.scheduler import Sequence

SHOTS = "".join(
    f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n"
    for a, b in [(3, 4), (10, 7), (21, 5), (8, 8), (2, 9)]
)
QUESTIONS = [
    f"Question: What is {a} plus {b}?\nAnswer:" for a, b in [(1, 1), (6, 3), (12, 30), (5, 0), (7, 7)]
]


@pytest.fixture(scope="module")
def fewshot(tiny_model):
    model, tok = tiny_model
    return model, [tok(SHOTS + q)["input_ids"] for q in QUESTIONS]


def lcp(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def make(ids, n=6, **kw):
    return Sequence(prompt_ids=ids, max_new_tokens=n, sampling=decode.Sampling(), top_k_per_token=3, **kw)


def serve(model, waves, cache=None, max_batch=4):
    """Submit each wave of sequences after the previous one finished."""
    return run_scheduler(model, None, max_batch, waves=waves, prefix_cache=cache)


def assert_same(a: Sequence, b: Sequence) -> None:
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    for ta, tb in zip(a.top_logprobs, b.top_logprobs):
        assert list(ta) == list(tb)
        assert list(tb.values()) == pytest.approx(list(ta.values()), abs=1e-4)


def test_cached_prefixes_give_the_uncached_tokens_and_logprobs(fewshot):
    model, ids = fewshot
    off = [make(p) for p in ids]
    serve(model, [off[:1], off[1:]])
    cache = PrefixCache(64 * 2**20)
    on = [make(p) for p in ids]
    serve(model, [on[:1], on[1:3], on[3:]], cache)
    info = cache.info()
    assert info["hits"] == len(ids) - 1  # every prompt after the first reused the few-shot prefix
    shared = min(lcp(ids[0], p) for p in ids[1:])  # the shots: most of each prompt
    assert shared > len(ids[0]) / 2 and info["tokens_reused"] >= (len(ids) - 1) * shared
    assert 0 < info["bytes"] <= info["max_bytes"]
    for a, b in zip(off, on):
        assert_same(a, b)


def test_prompts_arriving_together_compute_their_shared_prefix_once(fewshot):
    model, ids = fewshot
    off = [make(p) for p in ids]
    serve(model, [off], max_batch=8)
    cache = PrefixCache(64 * 2**20)
    on = [make(p) for p in ids]
    serve(model, [on], cache, max_batch=8)
    shared = min(lcp(ids[0], p) for p in ids[1:])
    assert cache.stats["hits"] == len(ids)
    assert cache.stats["tokens_prefilled"] == shared + sum(len(p) - shared for p in ids)
    assert tuple(ids[0][:shared]) in cache.entries
    for a, b in zip(off, on):
        assert_same(a, b)


def test_the_shared_prefix_becomes_an_entry_and_prompts_that_add_little_are_not_kept(fewshot):
    model, ids = fewshot
    cache = PrefixCache(64 * 2**20)
    serve(model, [[make(ids[0])], [make(ids[1])], [make(ids[2])]], cache)
    keys = sorted(cache.entries, key=len)
    common = min(lcp(ids[0], ids[1]), len(ids[1]) - 1)
    assert [len(k) for k in keys] == [common, len(ids[0])]  # the shots + the first prompt; not the third
    assert cache.bytes == sum(e.nbytes for e in cache.entries.values())


def test_a_repeated_prompt_reuses_all_but_its_last_token(fewshot):
    model, ids = fewshot
    cache = PrefixCache(64 * 2**20)
    first, again = make(ids[0]), make(ids[0])
    serve(model, [[first], [again]], cache)
    assert cache.stats["tokens_reused"] == len(ids[0]) - 1
    assert_same(first, again)


def test_echoed_prompts_are_prefilled_whole_beside_cached_ones(fewshot):
    """A request that wants its prompt's log-probabilities cannot reuse a prefix (no hidden states are kept);
    in the same batch as rows that do, every row gets the uncached answer."""
    model, ids = fewshot
    off = [make(p, score_prompt=2 if i % 2 else None) for i, p in enumerate(ids)]
    serve(model, [off[:1], off[1:]])
    cache = PrefixCache(64 * 2**20)
    on = [make(p, score_prompt=2 if i % 2 else None) for i, p in enumerate(ids)]
    serve(model, [on[:1], on[1:]], cache)
    assert cache.stats["hits"] == 2  # prompts 2 and 4; 1 and 3 ran whole
    for a, b in zip(off, on):
        assert_same(a, b)
        if a.prompt_logprobs is not None:
            assert [lp for lp, _ in b.prompt_logprobs] == pytest.approx(
                [lp for lp, _ in a.prompt_logprobs], abs=1e-4
            )


def test_the_byte_bound_holds_and_evicts_least_recently_used(fewshot, tiny_model):
    model, tok = tiny_model
    _, ids = fewshot
    per_token = sum(
        2 * layer.keys[0, :, :1].numel() * layer.keys.element_size()
        for layer in decode.prefill(model, [ids[0]]).batch.cache.layers
    )
    others = [
        tok(f"Instructions number {i}: reply with one word only.\n\n" * 3)["input_ids"] for i in range(4)
    ]
    bound = int(per_token * (len(ids[0]) + max(map(len, others)) + 1))  # room for two prompts, not three
    cache = PrefixCache(bound)
    off = [make(p) for p in [ids[0], *others, ids[1]]]
    serve(model, [[s] for s in off])
    on = [make(p) for p in [ids[0], *others, ids[1]]]
    serve(model, [[s] for s in on], cache)
    assert cache.bytes <= bound and cache.stats["evicted"] >= 2
    assert cache.stats["hits"] == 0  # the few-shot prompt was evicted before ids[1] came
    for a, b in zip(off, on):
        assert_same(a, b)


def test_lookup_needs_min_tokens_and_leaves_one_to_compute():
    cache = PrefixCache(2**20, min_tokens=4)
    k = [torch.zeros(1, 2, 10, 4)]
    cache._add(tuple(range(10)), k, [t.clone() for t in k])
    assert cache.lookup(list(range(3)) + [99]) is None  # 3 shared tokens < min_tokens
    assert cache.lookup(list(range(10))).length == 9
    assert cache.lookup(list(range(6)) + [50, 51]).length == 6
    hit = cache.lookup(list(range(10)) + [7, 7])
    assert hit.length == 10
    c = hit.cache_for(3)
    assert c.layers[0].keys.shape == (3, 2, 10, 4)
    assert cache.entries[tuple(range(10))].keys[0].shape == (1, 2, 10, 4)  # the entry is never written to


def test_a_server_with_the_cache_answers_like_one_without(tiny_model_dir):
    """End to end through /process: MMLU-shaped requests (shared shots, one new token) with the cache on
    and off."""
    from fastapi.testclient import TestClient

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel
    from daytune.serve.options import ServeOptions

    server = ServeModel(str(tiny_model_dir), None, device="cpu")
    answers, health = {}, {}
    for mb in (0, 64):
        with TestClient(create_app(server, ServeOptions(prefix_cache_mb=mb))) as client:
            out = []
            for q in QUESTIONS:
                body = {"prompt": SHOTS + q, "temperature": 1e-7, "max_new_tokens": 3, "top_k_per_token": 2}
                r = client.post("/process", json=body)
                assert r.status_code == 200, r.text
                out.append(r.json()["completions"][0]["tokens"])
            answers[mb] = out
            health[mb] = client.get("/health").json()["prefix_cache"]
    for a, b in zip(answers[0], answers[64]):
        assert [t["text"] for t in a] == [t["text"] for t in b]
        assert [t["logprob"] for t in b] == pytest.approx([t["logprob"] for t in a], abs=1e-4)
    assert health[0] is None
    assert health[64]["hits"] == len(QUESTIONS) - 1 and health[64]["max_bytes"] == 64 * 2**20
