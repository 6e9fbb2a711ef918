"""One language-model interface for every scenario, with two backends.

- `LocalLM`: a model (and optional adapter) in this process, through the shared forward passes in `daytune.engine`
  (length-sorted batches, few-shot prefixes reused through the KV cache).
- `HttpLM`: a running submission server, spoken to exactly as HELM's `HTTPModelClient` does (`POST /process`,
  `/tokenize`, `/decode`), so the same suite scores what the competition would score.

Both give the same numbers for the same model: a continuation's log-likelihood is the sum of its tokens' logprobs
where the context and continuation are tokenized together and split where the context's own tokens end (as
lm-evaluation-harness does), and greedy generation stops where the server stops (the text ends right before the
first stop sequence).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from daytune.engine.text import StopWatcher, TextStream, cut_pieces, token_texts
from daytune.errors import DaytuneError

DEFAULT_BASE_URL = "http://localhost:8080"


class BackendError(DaytuneError):
    """The model backend (a server, a model folder) cannot answer."""


@dataclass
class LoglikelihoodResult:
    logprob: float  # sum of log P(continuation tokens | context)
    is_greedy: bool  # every continuation token was the most likely one
    n_tokens: int  # continuation tokens
    truncated: int = 0  # context tokens cut from the left to fit the model's context (local backend)


@dataclass
class GenerateRequest:
    prompt: str
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    n_tokens: int
    logprob: float
    truncated: int = (
        0  # prompt tokens cut from the left to fit the context with max_new_tokens (local backend)
    )


@dataclass
class Usage:
    """Efficiency counters: what was asked, how many tokens went in and out, and the time it took."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    # per request (HTTP) or per request amortized (local)
    latencies: list[float] = field(default_factory=list)
    truncated: int = 0  # requests whose prompt (or context) was cut from the left to fit the model's context

    def add(
        self, requests: int, prompt_tokens: int, output_tokens: int, seconds: float, latencies=None
    ) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        self.seconds += seconds
        self.latencies.extend(latencies if latencies is not None else [seconds / max(1, requests)] * requests)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        tokens = self.prompt_tokens + self.output_tokens
        return {
            "requests": self.requests,
            "truncated_requests": self.truncated,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "latency_mean_s": round(sum(lat) / len(lat), 4) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)], 4)
            if lat
            else None,
            "tokens_per_s": round(tokens / self.seconds, 1) if self.seconds > 0 else None,
            "output_tokens_per_s": round(self.output_tokens / self.seconds, 1) if self.seconds > 0 else None,
        }


def normalize_request(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (lm-evaluation-harness's rule): tokenizers
    glue a space to the word after it."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return context, continuation


def rolling_windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Disjoint windows over `ids`: the first scores tokens 1..L-1, each later one scores up to L tokens given
    the single token before them (lm-evaluation-harness's rolling windows with a one-token context)."""
    windows = [ids[: max_length + 1]]
    for i in range(max_length + 1, len(ids), max_length):
        windows.append(ids[i - 1 : i + max_length])
    return windows if len(ids) > 1 else []


class LM:
    """What scenarios need from a model. Subclasses implement the three calls for lists of requests."""

    name: str = "lm"
    usage: Usage

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LoglikelihoodResult]:
        raise NotImplementedError

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        raise NotImplementedError

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """(sum of log P(token | the tokens before it), tokens scored) over every token of each text but the
        first, which has no context (HELM's language-modeling convention); long texts go in disjoint windows of at
        most `max_length` scored tokens, each conditioned on the token before it."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` as the competition server's /tokenize counts them (HELM fits prompts with it)."""
        raise NotImplementedError

    def truncate_right(self, text: str, max_tokens: int) -> str:
        """`text` cut to its first `max_tokens` tokens (HELM's last resort for a prompt too long)."""
        raise NotImplementedError

    def info(self) -> dict:
        return {"name": self.name}


class LocalLM(LM):
    """A model in this process (a PEFT model too)."""

    def __init__(
        self, model, tokenizer, name: str = "local", batch_size: int = 8, max_length: int | None = None
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or min(cfg_len, 2048))
        from daytune.models.trained import eos_ids

        self.eos_ids = set(eos_ids(model, tokenizer))
        self.usage = Usage()
        # next-token log-probabilities at the end of the prompts of the last `generate` call: a one-token
        # continuation of such a prompt (a multiple-choice letter) is scored from them without another pass
        self._first_step: dict[tuple[int, ...], object] = {}

    @classmethod
    def load(
        cls,
        model_ref: str,
        trained: str | os.PathLike | None = None,
        batch_size: int = 8,
        device: str = "auto",
        log=print,
    ) -> LocalLM:
        """A model reference, optionally with a run's trained artifact (a PEFT adapter or a full model folder), on
        `device` (auto: the GPU when there is one) in its inference dtype (bf16 on GPUs, fp32 on CPUs)."""
        from pathlib import Path

        from daytune.hardware import pick_device
        from daytune.models import ModelSource, load_for_inference

        source = ModelSource(model_ref, Path(trained) if trained else None)
        model, tokenizer, _ = load_for_inference(source, pick_device(device, "--device"), log=log)
        name = str(model_ref) + (f" + {trained}" if trained else "")
        return cls(model, tokenizer, name=name, batch_size=batch_size)

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])  # the server's /tokenize: the tokenizer's defaults

    def truncate_right(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context, continuation = normalize_request(context, continuation)
        whole = self._encode(context + continuation)
        ctx = self._encode(context) if context else []
        return whole[: len(ctx)], whole[len(ctx) :]

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if not ctx:
            ctx = [self.prefix_token_id]
        keep = self.max_length + 1  # inputs are context + continuation minus the last token
        if len(ctx) + len(cont) > keep:
            ctx = ctx[-max(1, keep - len(cont)) :]
        return ctx, cont

    def loglikelihood_ids(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from daytune.engine.score import loglikelihood_detailed

        t0 = time.perf_counter()
        was = self.model.training
        self.model.eval()
        try:
            out = loglikelihood_detailed(
                self.model, requests, self.batch_size, self.tokenizer.pad_token_id or 0
            )
        finally:
            self.model.train(was)
        n_prompt = sum(len(c) + len(x) for c, x in requests)
        self.usage.add(len(requests), n_prompt, 0, time.perf_counter() - t0)
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LoglikelihoodResult]:
        encoded = [self.encode_pair(c, x) for c, x in requests]
        pairs = [self._truncate(ctx, cont) for ctx, cont in encoded]
        cut = [max(0, len(e[0]) - len(p[0])) for e, p in zip(encoded, pairs)]
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, (ctx, cont) in enumerate(pairs):
            lp = self._first_step.get(tuple(ctx)) if len(cont) == 1 else None
            if lp is not None:
                out[i] = (float(lp[cont[0]]), int(lp.argmax()) == cont[0])
        todo = [i for i, o in enumerate(out) if o is None]
        if len(todo) < len(pairs):
            self.usage.add(len(pairs) - len(todo), 0, 0, 0.0)
        for i, r in zip(todo, self.loglikelihood_ids([pairs[i] for i in todo]) if todo else []):
            out[i] = r
        self.usage.truncated += sum(1 for n in cut if n)
        return [
            LoglikelihoodResult(lp, g, len(cont), n_cut) for (lp, g), (_, cont), n_cut in zip(out, pairs, cut)
        ]

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        windows, owner = [], []
        for t, text in enumerate(texts):
            for w in rolling_windows(self._encode(text), self.max_length - 1):
                windows.append(w)
                owner.append(t)
        out = self.loglikelihood_ids([(w[:1], w[1:]) for w in windows])
        totals = [[0.0, 0] for _ in texts]
        for t, (lp, _), w in zip(owner, out, windows):
            totals[t][0] += lp
            totals[t][1] += len(w) - 1
        return [(lp, n) for lp, n in totals]

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        from daytune.engine.decode import greedy_generate_batch

        t0 = time.perf_counter()
        prompts, cut = [], []
        for r in requests:
            ids = self._encode(r.prompt) or [self.prefix_token_id]
            keep = max(1, self.max_length - r.max_new_tokens)
            prompts.append(ids[-keep:])
            cut.append(max(0, len(ids) - keep))
        stops = [[s for s in r.stop if s] for r in requests]
        # the generated text so far, without special tokens, is watched for the stop sequences
        watchers = {
            i: StopWatcher(TextStream(self.tokenizer, skip_special_tokens=True), stops[i], see_pending=True)
            for i in range(len(requests))
            if stops[i]
        }

        def stop_check(i: int, ids: list[int]) -> bool:
            return i in watchers and watchers[i](ids[-1])

        out: list[Generation] = [None] * len(requests)  # type: ignore[list-item]
        self._first_step = {}
        was = self.model.training
        self.model.eval()
        try:
            # one call per max_new_tokens value: a batch decodes until its longest budget
            budgets = sorted({r.max_new_tokens for r in requests})
            for budget in budgets:
                idx = [i for i, r in enumerate(requests) if r.max_new_tokens == budget]
                gens = greedy_generate_batch(
                    self.model,
                    [prompts[i] for i in idx],
                    max_new_tokens=budget,
                    eos_ids=self.eos_ids,
                    stop_check=lambda j, ids, idx=idx: stop_check(idx[j], ids),
                    batch_size=self.batch_size,
                    pad_id=self.tokenizer.pad_token_id or 0,
                    on_first_step=lambda j, lp, idx=idx: self._first_step.__setitem__(
                        tuple(prompts[idx[j]]), lp
                    ),
                )
                for i, g in zip(idx, gens):
                    pieces, _ = cut_pieces(token_texts(self.tokenizer, g.token_ids), stops[i])
                    lp = float(sum(g.logprobs[: len(pieces)]))
                    out[i] = Generation("".join(pieces), len(pieces), lp, cut[i])
        finally:
            self.model.train(was)
        self.usage.truncated += sum(1 for n in cut if n)
        self.usage.add(
            len(requests),
            sum(len(p) for p in prompts),
            sum(g.n_tokens for g in out),
            time.perf_counter() - t0,
        )
        return out

    def info(self) -> dict:
        return {"name": self.name, "backend": "local", "device": str(next(self.model.parameters()).device)}


class HttpLM(LM):
    """A server speaking the competition API. Requests carry exactly HELM's `HTTPModelClient` fields; several are
    in flight at once (`concurrency`) so a batching server can batch them."""

    def __init__(
        self, base_url: str | None = None, concurrency: int = 4, timeout: float = 600.0, client=None
    ):
        import httpx

        self.base_url = (base_url or os.environ.get("HELM_HTTP_MODEL_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.name = self.base_url
        self.concurrency = concurrency
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout)
        self.usage = Usage()
        self._max_context: int | None = None

    def _post(self, path: str, body: dict) -> dict:
        try:
            r = self.client.post(path, json=body)
        except Exception as e:
            raise BackendError(
                f"{self.base_url}{path}: no answer ({type(e).__name__}: {e}); is the server running "
                "(daytune serve ...) and is HELM_HTTP_MODEL_BASE_URL / --http right?"
            ) from None
        if r.status_code != 200:
            raise BackendError(f"{self.base_url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"text": text, "truncation": False, "max_length": 2048})["tokens"]

    def decode(self, tokens: list[int]) -> str:
        return self._post("/decode", {"tokens": tokens})["text"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def truncate_right(self, text: str, max_tokens: int) -> str:
        body = {"text": text, "truncation": True, "max_length": max_tokens}
        return self.decode(self._post("/tokenize", body)["tokens"])

    def process(
        self, prompt: str, max_new_tokens: int, echo: bool, stop: list[str] = (), top_k: int = 1
    ) -> dict:
        return self._post(
            "/process",
            {
                "prompt": prompt,
                "temperature": 1e-7,  # HELM sends 1e-7 for temperature 0
                "num_return_sequences": 1,
                "max_new_tokens": max_new_tokens,
                "top_p": 1,
                "echo_prompt": echo,
                "top_k_per_token": top_k,
                "stop_sequences": list(stop),
            },
        )

    def _map(self, fn, items: list):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def _echo_score(self, prompt: str, n_skip_text_tokens: int) -> tuple[float, bool, int, float, int]:
        """(sum of the echoed logprobs after the first `n_skip_text_tokens` tokens, all of them greedy, how many,
        seconds, prompt tokens)."""
        t0 = time.perf_counter()
        whole = self.tokenize(prompt)
        body = self.process(prompt, 0, echo=True)
        tokens = body["tokens"]
        special = len(whole) - len(tokens)  # a BOS the tokenizer adds is not echoed
        scored = tokens[n_skip_text_tokens - special :] if n_skip_text_tokens - special > 0 else tokens
        lp = sum(t["logprob"] for t in scored)
        greedy = all(
            t["logprob"] >= max(t["top_logprob"].values(), default=t["logprob"]) - 1e-6 for t in scored
        )
        return lp, greedy, len(scored), time.perf_counter() - t0, len(whole)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LoglikelihoodResult]:
        t0 = time.perf_counter()

        def one(req):
            context, continuation = normalize_request(*req)
            if not context:
                raise BackendError("loglikelihood through the API needs a non-empty context")
            n_ctx = len(self.tokenize(context))
            lp, greedy, n, dt, n_all = self._echo_score(context + continuation, n_ctx)
            return LoglikelihoodResult(lp, greedy, n), dt, n_all

        out = self._map(one, requests)
        self.usage.add(
            len(requests), sum(o[2] for o in out), 0, time.perf_counter() - t0, latencies=[o[1] for o in out]
        )
        return [o[0] for o in out]

    @property
    def max_context(self) -> int:
        if self._max_context is None:
            try:
                self._max_context = int(self.client.get("/health").json().get("max_context") or 2048)
            except Exception:
                self._max_context = 2048
        return self._max_context

    def loglikelihood_rolling(self, texts: list[str]) -> list[tuple[float, int]]:
        """Windows are cut on the served tokenizer's ids and sent as their decoded text (as HELM does); a text
        that fits in one window is sent as it is."""
        t0 = time.perf_counter()
        jobs = []
        for t, text in enumerate(texts):
            ids = self.tokenize(text)
            windows = rolling_windows(ids, self.max_context - 1)
            for w in windows:
                jobs.append((t, text if len(windows) == 1 else self.decode(w)))

        def one(job):
            t, prompt = job
            s = time.perf_counter()
            tokens = self.process(prompt, 0, echo=True)["tokens"]
            return t, sum(x["logprob"] for x in tokens[1:]), len(tokens) - 1, time.perf_counter() - s

        out = self._map(one, jobs)
        totals = [[0.0, 0] for _ in texts]
        for t, lp, n, _ in out:
            totals[t][0] += lp
            totals[t][1] += n
        self.usage.add(
            len(jobs), sum(o[2] + 1 for o in out), 0, time.perf_counter() - t0, latencies=[o[3] for o in out]
        )
        return [(lp, n) for lp, n in totals]

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        t0 = time.perf_counter()

        def one(r: GenerateRequest):
            s = time.perf_counter()
            body = self.process(r.prompt, r.max_new_tokens, echo=False, stop=r.stop)
            # the server cuts already; cutting again changes nothing
            pieces, _ = cut_pieces([t["text"] for t in body["tokens"]], r.stop)
            lp = sum(t["logprob"] for t in body["tokens"][: len(pieces)])
            return Generation("".join(pieces), len(pieces), lp), time.perf_counter() - s

        out = self._map(one, requests)
        self.usage.add(
            len(requests),
            0,
            sum(g.n_tokens for g, _ in out),
            time.perf_counter() - t0,
            latencies=[d for _, d in out],
        )
        return [g for g, _ in out]

    def info(self) -> dict:
        try:
            health = self.client.get("/health").json()
        except Exception:
            health = {}
        return {"name": self.name, "backend": "http", "server": health}
