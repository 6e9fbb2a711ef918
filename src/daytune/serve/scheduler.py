"""The request queue and the batching loop: one worker thread owns the model and interleaves batched prefills
of newly arrived sequences with batched decode steps of the running ones. Each sequence stops on its own (end of
text, a stop sequence, its token limit, or its deadline) and leaves the batch; waiting ones take its place.
A cancelled sequence (its client hung up or timed out) leaves at the next step. Each request's future is resolved
on its own: a cancelled future or one sequence's error never touches the others."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from daytune.engine.decode import (
    DecodeBatch,
    Sampling,
    can_merge,
    choose_tokens,
    decode_step,
    merge_batches,
    prefill,
    select_rows,
)
from daytune.engine.prefix_cache import PrefixCache


class QueueFull(Exception):
    """Too many sequences are waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new work, or stopped before this request finished."""


class Cancelled(Exception):
    """The sequence was cancelled (its client hung up or stopped waiting) and left the batch."""


RATE_WINDOW = 64  # completions behind the service rate that Retry-After is computed from


@dataclass
class Sequence:
    """One sequence to generate. `on_token(id) -> bool` is called with every accepted token and returns True when
    a stop sequence has appeared (the owner keeps the text)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int | None = None  # the request's seed for this sequence (engines that seed by number)
    top_k_per_token: int = 0
    score_prompt: int | None = None  # top alternatives per prompt token, or None: no prompt log-probabilities
    eos_ids: frozenset[int] = frozenset()
    on_token: object = None
    deadline: float = math.inf
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, dict[int, float]]] | None = None
    finish_reason: str = "length"  # HELM's names: length | stop | endoftext
    future: Future = field(default_factory=Future)
    cancelled: bool = False

    def accept(self, tok: int, lp: float, tops: dict[int, float]) -> bool:
        """Take the chosen token; return True when the sequence is finished."""
        if tok in self.eos_ids:
            self.finish_reason = "endoftext"
            return True
        self.token_ids.append(tok)
        self.logprobs.append(lp)
        if self.top_k_per_token > 0:
            self.top_logprobs.append(tops)
        if self.on_token is not None and self.on_token(tok):
            self.finish_reason = "stop"
            return True
        return len(self.token_ids) >= self.max_new_tokens


class Scheduler:
    def __init__(
        self,
        model,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        max_prefill_tokens: int = 8192,
        pad_id=0,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model = model
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole
        self.max_batch = max(1, max_batch)
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = pad_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.batch: DecodeBatch | None = None
        self.merging = True  # cleared if the model's cache cannot take rows mid-flight
        self.cond = threading.Condition()
        self.stopping = False
        self.stop_at = math.inf  # when stopping: the worker gives up unfinished sequences after this time
        self.grace = 0.0
        self.finished = 0
        self.busy = 0.0  # seconds the worker has spent in model steps
        self.recent: deque[float] = deque(maxlen=RATE_WINDOW)  # self.busy at each recent completion
        self.steps = {"prefill": 0, "decode": 0, "max_rows": 0}
        self.thread = threading.Thread(target=self._loop, name="daytune-scheduler", daemon=True)
        self.thread.start()

    # -- called from request handlers -------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        if len(seqs) > self.max_queue:
            raise ValueError(f"{len(seqs)} sequences can never fit a queue of {self.max_queue}")
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.extend(seqs)
            self.cond.notify()

    def retry_after(self) -> int:
        """Seconds until the waiting sequences have likely been served (1 to 60): the service rate of the last
        completions over the worker's busy time, so an idle spell does not make the server look slow."""
        if not self.recent:
            return 5
        rate = len(self.recent) / max(self.busy - self.recent[0], 1e-3)
        return max(1, min(60, math.ceil(len(self.waiting) / rate)))

    def stats(self) -> dict:
        with self.cond:
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "finished": self.finished,
                "prefill_steps": self.steps["prefill"],
                "decode_steps": self.steps["decode"],
                "max_rows_seen": self.steps["max_rows"],
            }

    def prefix_cache_info(self) -> dict | None:
        """The prefix cache's counters for /health; None when it is off."""
        return self.prefix_cache.info() if self.prefix_cache is not None else None

    def drain(self, grace: float) -> None:
        """Take no new work; the running and waiting sequences get `grace` seconds, then the worker fails those
        left with ShuttingDown between two steps and ends."""
        with self.cond:
            self.stopping = True
            if time.monotonic() + grace < self.stop_at:
                self.stop_at, self.grace = time.monotonic() + grace, grace
            self.cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """drain(timeout), then wait for the worker to end (it stops between steps, never inside one)."""
        self.drain(timeout)
        self.thread.join()

    # -- the worker -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running and not self.stopping:
                    self.cond.wait()
                if self.stopping and (time.monotonic() >= self.stop_at or not (self.waiting or self.running)):
                    self._give_up()
                    return
                self._drop_gone()
                new = self._admit()
            start = time.monotonic()
            try:
                if new:
                    self._prefill(new)
                if self.running:
                    self._decode()
            except Exception as e:  # a bug or an out-of-memory: fail the affected requests, keep serving
                merged = {id(s) for s in new}
                for seq in new + [s for s in self.running if id(s) not in merged]:
                    self._finish(seq, e)
                self._keep_rows([])
            self.busy += time.monotonic() - start

    def _give_up(self) -> None:
        error = ShuttingDown(
            f"the server shut down before this request finished (it gives in-flight requests "
            f"{self.grace:g} s after a stop signal); retry it"
        )
        for seq in list(self.waiting) + self.running:
            self._finish(seq, error)
        self.waiting.clear()
        self._keep_rows([])

    def _drop_gone(self) -> None:
        """Rows whose client hung up or whose deadline passed leave before the next step computes them."""
        now = time.monotonic()
        keep = [i for i, s in enumerate(self.running) if not (s.cancelled or s.deadline < now)]
        if len(keep) == len(self.running):
            return
        for i, seq in enumerate(self.running):
            if i not in keep:
                self._finish(seq, Cancelled() if seq.cancelled else TimeoutError())
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only these running rows (by index); the others leave the batch."""
        if not keep:
            self.batch, self.running = None, []
        elif len(keep) < len(self.running):
            self.batch = select_rows(self.batch, keep)
            self.running = [self.running[i] for i in keep]

    def _admit(self) -> list[Sequence]:
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.cancelled or s.deadline < now or s.future.cancelled()]:
            self.waiting.remove(seq)
            self._finish(seq, TimeoutError())
        if self.running and not self.merging:
            return []
        new, width = [], 0
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            seq = self.waiting[0]
            w = max(width, len(seq.prompt_ids))
            if new and w * (len(new) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            # from here on the future cannot be cancelled; one cancelled while waiting is dropped
            if seq.future.set_running_or_notify_cancel():
                new.append(seq)
                width = w
            else:
                self.finished += 1
        return new

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Resolve one sequence's future. It may have been cancelled or resolved meanwhile (a client that gave
        up): that is that request's business alone."""
        self.finished += 1
        if error is None:
            self.recent.append(self.busy)
        try:
            if error is not None:
                seq.future.set_exception(error)
            else:
                seq.future.set_result(seq)
        except InvalidStateError:
            pass

    def _accept(self, seq: Sequence, chosen: tuple) -> bool | None:
        """seq.accept, with an error (a stop check that fails) failing that sequence alone: None."""
        try:
            return seq.accept(*chosen)
        except Exception as e:
            self._finish(seq, e)
            return None

    def _prefill(self, new: list[Sequence]) -> None:
        """Prefill the admitted sequences: with a prefix cache, in groups that reuse a cached prefix (each group
        computes only what follows it), then the rest whole; every prefilled prompt is offered to the cache."""
        cache = self.prefix_cache
        if cache is None:
            self._prefill_group(new, None)
            return
        eligible = [s.score_prompt is None for s in new]
        for hit, members in cache.plan(self.model, [s.prompt_ids for s in new], eligible, self.pad_id):
            self._prefill_group([new[i] for i in members], hit)

    def _prefill_group(self, new: list[Sequence], hit) -> None:
        prefix = hit.length if hit is not None else 0
        pf = prefill(
            self.model,
            [s.prompt_ids[prefix:] for s in new],
            score_prompt=[s.score_prompt for s in new],
            pad_id=self.pad_id,
            prefix_len=prefix,
            cache=hit.cache_for(len(new)) if hit is not None else None,
        )
        self.steps["prefill"] += 1
        if self.batch is None and not can_merge(pf.batch):
            self.merging, self.prefix_cache = False, None  # a cache rows cannot share (sliding windows)
        if self.prefix_cache is not None:
            for i, seq in enumerate(new):
                columns = pf.batch.mask[i].nonzero()[:, 0]
                self.prefix_cache.insert(seq.prompt_ids, pf.batch.cache, i, columns, hit)
        for seq, scored in zip(new, pf.prompt_logprobs):
            seq.prompt_logprobs = scored
        chosen = choose_tokens(pf.logits, [s.sampling for s in new], [s.top_k_per_token for s in new])
        keep = []
        for i, (seq, choice) in enumerate(zip(new, chosen)):
            done = True if seq.max_new_tokens <= 0 else self._accept(seq, choice)
            if done:
                self._finish(seq)
            elif done is False:
                keep.append(i)
        if not keep:
            return
        batch = pf.batch if len(keep) == len(new) else select_rows(pf.batch, keep)
        rows = [new[i] for i in keep]
        if self.batch is None:
            self.batch, self.running = batch, rows
            self.merging = can_merge(batch)
        else:
            self.batch = merge_batches(self.batch, batch)
            self.running = self.running + rows

    def _decode(self) -> None:
        rows = self.running
        self.steps["decode"] += 1
        self.steps["max_rows"] = max(self.steps["max_rows"], len(rows))
        logits = decode_step(self.model, self.batch, [s.token_ids[-1] for s in rows])
        chosen = choose_tokens(logits, [s.sampling for s in rows], [s.top_k_per_token for s in rows])
        keep = []
        for i, (seq, choice) in enumerate(zip(rows, chosen)):
            done = self._accept(seq, choice)
            if done:
                self._finish(seq)
            elif done is False:
                keep.append(i)
        self._keep_rows(keep)


def limits(options) -> dict:
    """The scheduler's keyword arguments from the server's options (`ServeOptions`)."""
    return {
        "max_batch": options.max_batch,
        "max_queue": options.max_queue,
        "max_prefill_tokens": options.max_prefill_tokens,
    }


def seeded(seed: int | None) -> torch.Generator:
    """A generator for one sequence: its own seed, or a fresh random one."""
    import random

    return torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**63))
