"""The request queue and the batching loop: one worker thread owns the model and interleaves batched prefills
of newly arrived sequences with batched decode steps of the running ones. Each sequence stops on its own (end of
text, a stop sequence, its token limit, or its deadline) and leaves the batch; waiting ones take its place."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
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


class QueueFull(Exception):
    """Too many sequences are waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class Sequence:
    """One sequence to generate. `on_token(id) -> bool` is called with every accepted token and returns True when
    a stop sequence has appeared (the owner keeps the text)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
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
        self, model, *, max_batch: int = 16, max_queue: int = 256, max_prefill_tokens: int = 8192, pad_id=0
    ):
        self.model = model
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
        self.finished = 0
        self.started = time.monotonic()
        self.steps = {"prefill": 0, "decode": 0, "max_rows": 0}
        self.thread = threading.Thread(target=self._loop, name="daytune-scheduler", daemon=True)
        self.thread.start()

    # -- called from request handlers -------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(self.retry_after())
            self.waiting.extend(seqs)
            self.cond.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the recent completion rate (at least 1)."""
        rate = self.finished / max(time.monotonic() - self.started, 1e-3)
        return max(1, min(60, math.ceil(len(self.waiting) / rate))) if rate > 0 else 5

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

    def close(self, timeout: float = 30.0) -> None:
        """Finish the running and waiting sequences (up to `timeout`), then stop the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        with self.cond:
            for seq in list(self.waiting) + self.running:
                if not seq.future.done():
                    seq.future.set_exception(
                        ShuttingDown("the server shut down before this request finished")
                    )
            self.waiting.clear()

    # -- the worker -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.waiting and not self.running:
                    return
                new = self._admit()
            try:
                if new:
                    self._prefill(new)
                if self.running:
                    self._decode()
            except Exception as e:  # a bug or an out-of-memory: fail the affected requests, keep serving
                for seq in new + self.running:
                    if not seq.future.done():
                        seq.future.set_exception(e)
                self.running, self.batch = [], None

    def _admit(self) -> list[Sequence]:
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.cancelled or s.deadline < now]:
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
            new.append(self.waiting.popleft())
            width = w
        return new

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        self.finished += 1
        if seq.future.done():
            return
        if error is not None:
            seq.future.set_exception(error)
        else:
            seq.future.set_result(seq)

    def _prefill(self, new: list[Sequence]) -> None:
        pf = prefill(
            self.model,
            [s.prompt_ids for s in new],
            score_prompt=[s.score_prompt for s in new],
            pad_id=self.pad_id,
        )
        self.steps["prefill"] += 1
        for seq, scored in zip(new, pf.prompt_logprobs):
            seq.prompt_logprobs = scored
        chosen = choose_tokens(pf.logits, [s.sampling for s in new], [s.top_k_per_token for s in new])
        keep = []
        for i, (seq, (tok, lp, tops)) in enumerate(zip(new, chosen)):
            if seq.max_new_tokens <= 0 or seq.accept(tok, lp, tops):
                self._finish(seq)
            else:
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
        now = time.monotonic()
        keep = []
        for i, (seq, (tok, lp, tops)) in enumerate(zip(rows, chosen)):
            if seq.cancelled or seq.deadline < now:
                self._finish(seq, TimeoutError())
            elif seq.accept(tok, lp, tops):
                self._finish(seq)
            else:
                keep.append(i)
        if not keep:
            self.batch, self.running = None, []
        elif len(keep) < len(rows):
            self.batch = select_rows(self.batch, keep)
            self.running = [rows[i] for i in keep]


def seeded(seed: int | None) -> torch.Generator:
    """A generator for one sequence: its own seed, or a fresh random one."""
    import random

    return torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**63))
