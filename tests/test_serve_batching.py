"""Batched decoding equals one-at-a-time decoding: engine steps (prefill, decode, rows joining and leaving) and the
scheduler behind the server, on the tiny model in fp32."""

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from daytune.engine import decode
from daytune.serve.scheduler import QueueFull, Scheduler, Sequence, ShuttingDown, seeded

PROMPTS = [
    "Natalia sold clips to 48 of her friends",
    "Weng earns $12 an hour",
    "Betty is saving money for a new wallet which costs $100. Betty has only half",
    "How",
    "James writes a 3-page letter to 2 different friends twice a week.",
]


@pytest.fixture(scope="module")
def tm(tiny_model):
    model, tok = tiny_model
    return model, tok, [tok(p)["input_ids"] for p in PROMPTS]


def alone(model, ids, n, top_k=3):
    """Greedy tokens, logprobs and prompt logprobs of one sequence decoded by itself."""
    pf = decode.prefill(model, [ids], score_prompt=[top_k])
    logits, toks, lps = pf.logits, [], []
    for _ in range(n):
        ((tok, lp, _),) = decode.choose_tokens(logits, [decode.Sampling()], [0])
        toks.append(tok)
        lps.append(lp)
        logits = decode.decode_step(model, pf.batch, [tok])
    return toks, lps, pf.prompt_logprobs[0]


def test_prefill_prompt_logprobs_match_a_plain_forward(tm):
    model, _, ids = tm
    pf = decode.prefill(model, ids, score_prompt=[2] * len(ids))
    for i, p in enumerate(ids):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
        assert len(pf.prompt_logprobs[i]) == len(p) - 1
        for j, (got, tops) in enumerate(pf.prompt_logprobs[i]):
            assert got == pytest.approx(lp[j, p[j + 1]].item(), abs=1e-4)
            assert max(tops.values()) == pytest.approx(lp[j].max().item(), abs=1e-4)
        assert torch.allclose(pf.logits[i], lp[-1].exp().log(), atol=1e-4) or torch.allclose(
            torch.log_softmax(pf.logits[i], -1), lp[-1], atol=1e-4
        )


def test_rows_joining_and_leaving_decode_exactly_as_alone(tm):
    """Rows of different lengths; two start together, others join mid-flight; each stops at its own length."""
    model, _, ids = tm
    lengths = [9, 4, 12, 7, 10]
    ref = [alone(model, ids[i], lengths[i]) for i in range(len(ids))]
    joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> rows that join before it
    batch, logits, rows = None, None, []
    out = {i: ([], []) for i in range(len(ids))}
    step = 0
    while step in joins or rows:
        if step in joins:
            pf = decode.prefill(model, [ids[i] for i in joins[step]])
            batch = pf.batch if batch is None else decode.merge_batches(batch, pf.batch)
            logits = pf.logits if logits is None else torch.cat([logits, pf.logits])
            rows += joins[step]
        chosen = decode.choose_tokens(logits, [decode.Sampling()] * len(rows), [0] * len(rows))
        feed, keep = [], []
        for j, (r, (tok, lp, _)) in enumerate(zip(rows, chosen)):
            out[r][0].append(tok)
            out[r][1].append(lp)
            if len(out[r][0]) < lengths[r]:
                keep.append(j)
                feed.append(tok)
        if len(keep) < len(rows):
            batch = decode.select_rows(batch, keep) if keep else None
            rows = [rows[j] for j in keep]
        if rows:
            logits = decode.decode_step(model, batch, feed)
        step += 1
    for i in range(len(ids)):
        assert out[i][0] == ref[i][0], f"row {i}: greedy tokens differ"
        assert out[i][1] == pytest.approx(ref[i][1], abs=1e-4)


def run_scheduler(model, seqs, max_batch, waves=None, prefix_cache=None):
    """Serve `seqs` (or each of `waves` after the previous one finished) and return the closed scheduler."""
    sched = Scheduler(model, max_batch=max_batch, max_queue=1000, prefix_cache=prefix_cache)
    try:
        for wave in waves or [seqs]:
            sched.submit(wave)
            for s in wave:
                s.future.result(timeout=120)
    finally:
        sched.close()
    return sched


def make(ids, n, **kw):
    return Sequence(prompt_ids=ids, max_new_tokens=n, sampling=decode.Sampling(), top_k_per_token=2, **kw)


def test_scheduler_batches_and_matches_one_at_a_time(tm):
    model, _, ids = tm
    lengths = [11, 3, 8, 1, 6, 9]
    prompts = ids + [ids[0]]
    one = [make(p, n, score_prompt=2) for p, n in zip(prompts, lengths)]
    run_scheduler(model, one, max_batch=1)
    many = [make(p, n, score_prompt=2) for p, n in zip(prompts, lengths)]
    sched = run_scheduler(model, many, max_batch=4)
    assert sched.steps["max_rows"] > 1  # it really batched
    for a, b in zip(one, many):
        assert a.token_ids == b.token_ids and len(b.token_ids) == b.max_new_tokens
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert [lp for lp, _ in b.prompt_logprobs] == pytest.approx(
            [lp for lp, _ in a.prompt_logprobs], abs=1e-4
        )
        for ta, tb in zip(a.top_logprobs, b.top_logprobs):
            assert list(ta) == list(tb)


def test_seeded_samples_reproduce_whatever_the_batch(tm):
    model, _, ids = tm

    def sampled(seed, companions):
        s = Sequence(ids[0], 12, decode.Sampling(1.0, 0.9, 50, seeded(seed)))
        others = [
            Sequence(ids[i % len(ids)], 5 + i, decode.Sampling(1.0, 1.0, 0, seeded(i)))
            for i in range(companions)
        ]
        run_scheduler(model, [s] + others, max_batch=8)
        return s.token_ids

    a = sampled(7, 0)
    assert sampled(7, 3) == a
    assert sampled(8, 0) != a


def test_each_sequence_stops_on_its_own(tm):
    model, _, ids = tm
    greedy = make(ids[0], 10)
    run_scheduler(model, [greedy], 1)
    eos = greedy.token_ids[3]
    stopped_by_eos = make(ids[0], 10, eos_ids=frozenset({eos}))
    calls = []
    stopped_by_check = make(ids[0], 10, on_token=lambda t: calls.append(t) or len(calls) == 2)
    full = make(ids[1], 10)
    run_scheduler(model, [stopped_by_eos, stopped_by_check, full], 4)
    assert stopped_by_eos.token_ids == greedy.token_ids[: greedy.token_ids.index(eos)]
    assert stopped_by_eos.finish_reason == "endoftext"
    assert stopped_by_check.token_ids == greedy.token_ids[:2] and stopped_by_check.finish_reason == "stop"
    assert len(full.token_ids) == 10 and full.finish_reason == "length"


def test_full_queue_refuses_with_retry_after(tm):
    model, _, ids = tm
    gate = threading.Event()
    sched = Scheduler(model, max_batch=1, max_queue=2)
    try:
        blocker = make(ids[0], 200, on_token=lambda t: not gate.wait(0.2) and False)
        sched.submit([blocker])
        for _ in range(1000):  # until the worker has taken it from the queue
            if sched.running:
                break
            threading.Event().wait(0.01)
        sched.submit([make(ids[1], 1), make(ids[1], 1)])
        with pytest.raises(QueueFull) as e:
            sched.submit([make(ids[1], 1)])
        assert e.value.retry_after >= 1
    finally:
        gate.set()
        blocker.cancelled = True
        sched.close()


def wait_for(condition, what: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


class CancelledAfterCheck(Future):
    """A future whose client cancels it right after the worker's done() said no: the ordering a hang-up or a
    timeout can produce between two lines of the worker."""

    def done(self):
        was = super().done()
        if not was:
            self.cancel()
        return was


def test_a_future_cancelled_mid_finish_touches_no_other_request(tm):
    model, _, ids = tm
    sched = Scheduler(model, max_batch=8)
    try:
        victim = make(ids[0], 4, future=CancelledAfterCheck())
        others = [make(ids[i], 4) for i in (1, 2, 3)]
        sched.submit([victim] + others)
        for s in others:
            assert s.future.result(timeout=60) is s and len(s.token_ids) == 4
    finally:
        sched.close()


def test_a_request_cancelled_while_waiting_is_never_run(tm):
    model, _, ids = tm
    gate, entered = threading.Event(), threading.Event()
    sched = Scheduler(model, max_batch=1)
    try:
        blocker = make(ids[0], 3, on_token=lambda t: entered.set() or not gate.wait(30))
        sched.submit([blocker])
        entered.wait(30)  # the worker is inside the blocker's step
        victim, other = make(ids[1], 4), make(ids[2], 4)
        sched.submit([victim, other])
        assert victim.future.cancel()  # the client gave up while it waited
        gate.set()
        assert other.future.result(timeout=60) is other and len(other.token_ids) == 4
        assert victim.future.cancelled() and victim.token_ids == []
    finally:
        gate.set()
        sched.close()


def test_one_sequences_error_fails_that_sequence_alone(tm):
    model, _, ids = tm
    sched = Scheduler(model, max_batch=4)

    def broken(tok):
        raise RuntimeError("a stop check that fails")

    try:
        bad, good = make(ids[0], 5, on_token=broken), make(ids[1], 5)
        sched.submit([bad, good])
        with pytest.raises(RuntimeError, match="stop check"):
            bad.future.result(timeout=60)
        assert good.future.result(timeout=60) is good and len(good.token_ids) == 5
    finally:
        sched.close()


def test_close_stops_the_worker_between_steps_and_joins_it(tm):
    """Past the grace time the worker fails what is left with ShuttingDown and ends; close() returns only once it
    has, so no thread is inside the model when the process exits."""
    model, _, ids = tm
    sched = Scheduler(model, max_batch=1)
    long = make(ids[0], 400, on_token=lambda t: time.sleep(0.02) and False)  # ~8 s of steps
    waiting = make(ids[1], 4)
    sched.submit([long, waiting])
    wait_for(lambda: sched.running, "the long sequence to start")
    sched.close(0.2)
    assert not sched.thread.is_alive()
    for s in (long, waiting):
        with pytest.raises(ShuttingDown, match="shut down before this request finished"):
            s.future.result(timeout=0)
    assert 0 < len(long.token_ids) < 400


def test_retry_after_ignores_idle_time(tm, monkeypatch):
    """Retry-After comes from how fast the worker serves while busy: an idle hour does not change it."""
    from daytune.serve import scheduler as module

    model, _, ids = tm
    idle = [0.0]

    class Clock:  # the scheduler's clock, where an hour of idleness passes at once
        @staticmethod
        def monotonic():
            return time.monotonic() + idle[0]

    monkeypatch.setattr(module, "time", Clock)
    gate, entered = threading.Event(), threading.Event()
    sched = Scheduler(model, max_batch=1, max_queue=100)
    try:
        done = [make(ids[i % len(ids)], 3) for i in range(6)]
        sched.submit(done)
        for s in done:
            s.future.result(timeout=60)
        blocker = make(ids[0], 3, on_token=lambda t: entered.set() or not gate.wait(30))
        sched.submit([blocker])
        entered.wait(30)  # the worker is inside a step: nothing it counts changes now
        sched.submit([make(ids[1], 3) for _ in range(5)])
        before = sched.retry_after()
        idle[0] += 3600
        assert sched.retry_after() == before < 60
    finally:
        gate.set()
        sched.close()


def test_more_sequences_than_the_queue_holds_are_refused_outright(tm):
    model, _, ids = tm
    sched = Scheduler(model, max_queue=2)
    try:
        with pytest.raises(ValueError, match="can never fit"):
            sched.submit([make(ids[0], 1) for _ in range(3)])
    finally:
        sched.close()
