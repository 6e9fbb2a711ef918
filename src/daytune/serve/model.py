"""The model behind the server: load (merging any adapter), turn a /process request into sequences for the
scheduler, and turn finished sequences into HELM's response fields.

Log-probabilities: every token's `logprob` is log P(token | all tokens before it) under the model's own
distribution (temperature 1, before top-k/top-p), whatever the sampling settings.

The first echoed prompt token: it has no context, so nothing predicts it; it reports logprob 0.0 and an empty
`top_logprob`, exactly what HELM's clients record when a provider returns no log-probability for it
(`Token(text=text, logprob=logprob or 0, top_logprobs=dict(top_logprobs or {}))` in HELM's openai_client.py).
HELM never scores it: its language-modeling adapter prepends a conditioning token (`prefix_token`, which is
"<|endoftext|>" for the HTTP model window service) and its metrics drop the first `num_conditioning_tokens`
tokens (`compute_language_modeling_metrics` in benchmark/metrics/basic_metrics.py). Every later prompt token gets
its real log-probability, so the token after HELM's prefix is scored given the prefix. When the tokenizer itself
prepends a BOS token that is not in the prompt text, that token is the first token's context (and is not echoed).

An empty prompt (or one the tokenizer turns into no tokens) is conditioned on the tokenizer's BOS token, or its EOS
token when it has no BOS, as an unconditional sample starts a document; that token is not echoed.

Stop sequences are cut on the server: `text` ends right before the earliest stop sequence; `tokens` are the
tokens that start before the cut, the last one's text trimmed at the cut (its logprob is the whole token's), so
"".join(token texts) == text always holds.
"""

from __future__ import annotations

import copy
import functools
import queue
from pathlib import Path

from daytune.engine.decode import Sampling
from daytune.engine.fast import enable_fast_path, fast_forward
from daytune.engine.packed import can_pack, pack_linears
from daytune.engine.prefix_cache import PrefixCache
from daytune.engine.text import StopWatcher, TextStream, cut_pieces, token_texts
from daytune.errors import DaytuneError, ModelError
from daytune.models import ModelSource, load_for_inference
from daytune.serve.scheduler import Scheduler, Sequence, limits, seeded
from daytune.serve.schemas import MAX_PROMPT_CHARS, Completion, ProcessRequest, Token

# prompt tokens decoded before the first generated one (SentencePiece drops a leading space)
STREAM_CONTEXT = 4


class RequestError(DaytuneError):
    """A request the server refuses (HTTP 422), naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class TokenizerPool:
    """The tokenizer, shared by the server's threads through a pool of copies: each call borrows one for its
    duration. A HF fast tokenizer raises "Already borrowed" when a call with other truncation settings meets an
    encode running in another thread, and one shared lock would make every request, and the worker's per-token stop
    check, wait for the longest tokenization. A copy per thread was the earlier answer, but the HTTP layer runs
    requests on dozens of short-lived threads, and each new one deep-copied the tokenizer (tens of ms holding the
    GIL, stalling the decode loop: a fifth of a busy server's time at 32 clients, profiled). The pool holds as many
    copies as calls ever ran at once (a few), made when first needed. Attributes (token ids, names) are read from
    the original, which is never called."""

    def __init__(self, tokenizer):
        self._template = tokenizer  # only ever copied and read, never called
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self.copies = 0

    def _borrow(self):
        try:
            return self._free.get_nowait()
        except queue.Empty:
            self.copies += 1
            return copy.deepcopy(self._template)

    def _run(self, name: str | None, *args, **kwargs):
        tok = self._borrow()
        try:
            return (tok if name is None else getattr(tok, name))(*args, **kwargs)
        finally:
            self._free.put(tok)

    def __getattr__(self, name):
        value = getattr(self._template, name)
        if callable(value):
            return functools.partial(self._run, name)
        return value

    def __call__(self, *args, **kwargs):
        return self._run(None, *args, **kwargs)

    def __len__(self) -> int:
        return len(self._template)


def _shown(ref: str | None) -> str | None:
    """A local path as its folder name (/health tells no one where files live); other references as they are."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    return path.name if path.is_absolute() or path.exists() else ref


def _max_prompt_chars(tokenizer, max_context: int) -> int:
    """Characters beyond which a prompt cannot fit the context: no token covers more characters than its longest
    vocabulary entry (byte-level entries spell bytes), or 4x that where a normalizer may merge characters (NFC
    composes a base and its marks). Longer prompts are refused before tokenizing."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return min(MAX_PROMPT_CHARS, max_context * longest * (1 if normalizer is None else 4))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def serve_dtype(name: str):
    """`--dtype`: None for auto (the device's inference dtype: bf16 on GPUs that have it, fp16 on older ones, fp32
    on CPUs), else that torch dtype."""
    import torch

    if name not in DTYPES:
        raise DaytuneError(f"--dtype: must be one of {', '.join(DTYPES)}; got {name!r}")
    return None if name == "auto" else getattr(torch, name)


class ServeModel:
    """daytune's own engine: the model loaded here (any adapter merged), decoded by the batching `Scheduler`."""

    engine = "daytune"

    def __init__(
        self,
        model_ref: str,
        adapter: str | Path | None = None,
        device: str | None = None,
        run_id: str | None = None,
        log=print,
        dtype: str = "auto",
    ):
        from daytune.hardware import inference_dtype, pick_device

        self.device = pick_device(device or "auto", "--device")
        # an adapter is merged into the weights where its method allows: no adapter cost per token
        source = ModelSource(model_ref, Path(adapter) if adapter else None)
        torch_dtype = serve_dtype(dtype)
        self.model, tokenizer, eos = load_for_inference(
            source, self.device, merge=True, dtype=torch_dtype, log=log
        )
        loaded = torch_dtype or inference_dtype(self.device)  # what load_for_inference loaded it in
        self.dtype = str(loaded).removeprefix("torch.")
        # Llama-family models: fewer, fused ops per decode step (engine/fast.py); others: bf16 weights on a CPU
        # packed once for oneDNN (the fast path packs its own)
        self.fast_path = enable_fast_path(self.model, log=log)
        if self.fast_path:
            self.packed = fast_forward(self.model).packed
        else:
            self.packed = pack_linears(self.model) if can_pack(loaded, self.device) else 0
        # still a PeftModel: the method adds virtual tokens or attention paths
        if hasattr(self.model, "peft_config"):
            raise ModelError(
                f"{adapter}: this adapter's method (prefix, prompt, ptuning or adapter) cannot be merged into "
                "the weights, and the batched server decodes plain models only; serve a lora, dora, qlora, ia3, "
                "full or freeze run"
            )
        max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self._describe(model_ref, adapter, run_id, tokenizer, eos, max_context)

    def _describe(
        self, model_ref, adapter, run_id, tokenizer, eos_ids: frozenset[int], max_context: int
    ) -> None:
        """What every engine sets up the same way: names, the tokenizer and the limits requests are checked by."""
        self.model_ref = model_ref
        self.adapter = str(adapter) if adapter else None
        self.run_id = run_id
        self.eos_ids = eos_ids
        self.max_context = max_context
        self.vocab = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id or 0
        self.max_prompt_chars = _max_prompt_chars(tokenizer, self.max_context)
        self.tokenizer = TokenizerPool(tokenizer)

    def scheduler(self, options) -> Scheduler:
        """The worker that runs this model's sequences, with the server's limits (`ServeOptions`)."""
        cache = PrefixCache(options.prefix_cache_mb * 2**20) if options.prefix_cache_mb > 0 else None
        return Scheduler(self.model, **limits(options), pad_id=self.pad_id, prefix_cache=cache)

    def info(self) -> dict:
        return {
            "model": _shown(self.model_ref),
            "adapter": _shown(self.adapter),
            "adapter_merged": bool(self.adapter),
            "run_id": self.run_id,
            "engine": self.engine,
            "device": str(self.device),
            "dtype": getattr(self, "dtype", None),
            "fast_path": getattr(self, "fast_path", False),
            "packed_linears": getattr(self, "packed", 0),
            "max_context": self.max_context,
        }

    # -- /tokenize, /decode ---------------------------------------------------------------------------------
    def tokenize(self, text: str, truncation: bool, max_length: int) -> list[int]:
        return self.tokenizer(text, truncation=truncation, max_length=max_length)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        bad = [t for t in tokens if not 0 <= t < self.vocab]
        if bad:
            raise RequestError("tokens", f"ids must be within 0..{self.vocab - 1}; got {bad[:5]}")
        return self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    # -- /process -------------------------------------------------------------------------------------------
    def sequences(
        self, req: ProcessRequest, max_new_tokens_cap: int, deadline: float
    ) -> tuple[list[Sequence], dict]:
        """The request's sequences for the scheduler (one per return sequence) and what `complete` needs."""
        if "max_new_tokens" not in req.model_fields_set:  # the default never exceeds this server's cap
            req.max_new_tokens = min(req.max_new_tokens, max_new_tokens_cap)
        if req.max_new_tokens > max_new_tokens_cap:
            raise RequestError("max_new_tokens", f"must be at most {max_new_tokens_cap} on this server")
        if len(req.prompt) > self.max_prompt_chars:
            raise RequestError(
                "prompt",
                f"{len(req.prompt)} characters cannot fit the model's context of {self.max_context} tokens",
            )
        ids, added_bos = self._prompt_ids(req.prompt)
        if len(ids) + req.max_new_tokens > self.max_context:
            raise RequestError(
                "max_new_tokens",
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's context "
                f"of {self.max_context} tokens",
            )
        if req.top_k and req.top_k > self.vocab:
            raise RequestError("top_k", f"must be at most the vocabulary size ({self.vocab})")
        shown = ids[1:] if added_bos else ids
        seqs = []
        for i in range(req.num_return_sequences):
            seed = None if req.seed is None else req.seed + i
            seqs.append(
                Sequence(
                    prompt_ids=ids,
                    max_new_tokens=req.max_new_tokens,
                    sampling=Sampling(req.temperature, req.top_p, req.top_k, seeded(seed)),
                    seed=seed,
                    top_k_per_token=req.top_k_per_token,
                    score_prompt=req.top_k_per_token
                    if (req.echo_prompt and i == 0 and len(ids) > 1)
                    else None,
                    eos_ids=self.eos_ids,
                    on_token=StopWatcher(
                        TextStream(self.tokenizer, shown[-STREAM_CONTEXT:]), req.stop_sequences
                    ),
                    deadline=deadline,
                )
            )
        return seqs, {"ids": ids, "added_bos": added_bos}

    def _prompt_ids(self, prompt: str) -> tuple[list[int], bool]:
        """The prompt's ids, and whether the first is a conditioning token the prompt text does not contain (a BOS
        the tokenizer adds, or the BOS or EOS an empty prompt is conditioned on)."""
        tok = self.tokenizer
        ids = tok(prompt)["input_ids"]
        if not ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise RequestError(
                    "prompt", "is empty, and this tokenizer has no BOS or EOS token to start from"
                )
            return [start], True
        bos = tok.bos_token_id
        return ids, bool(bos is not None and ids[0] == bos and not prompt.startswith(tok.bos_token or "\0"))

    def _tops(self, top: dict[int, float]) -> dict[str, float]:
        """{token text: logprob}. Byte pieces of one character all decode to U+FFFD and different ids can decode
        alike; those keep their vocabulary spelling, so the map has one entry per alternative."""
        out: dict[str, float] = {}
        for tid, lp in top.items():
            key = self.tokenizer.decode([tid], clean_up_tokenization_spaces=False)
            if key in out or "\ufffd" in key:
                key = self.tokenizer.convert_ids_to_tokens(tid)
            out[key] = lp
        return out

    def _echo(self, req: ProcessRequest, seq: Sequence, ids: list[int], added_bos: bool) -> list[Token]:
        if not req.echo_prompt or not ids:
            return []
        shown = ids[1:] if added_bos else ids
        texts = token_texts(self.tokenizer, shown)
        scored = seq.prompt_logprobs or []  # log P(ids[i] | ids[:i]) for i >= 1
        pairs = scored if added_bos else [(0.0, {})] + scored
        return [Token(text=t, logprob=lp, top_logprob=self._tops(top)) for t, (lp, top) in zip(texts, pairs)]

    def complete(self, req: ProcessRequest, seqs: list[Sequence], ctx: dict) -> list[Completion]:
        echo = self._echo(req, seqs[0], ctx["ids"], ctx["added_bos"])
        prefix = "".join(t.text for t in echo)
        out = []
        for seq in seqs:
            texts, cut = cut_pieces(seq.on_token.finish(), seq.on_token.stops)
            tokens = [
                Token(
                    text=t,
                    logprob=seq.logprobs[j],
                    top_logprob=self._tops(seq.top_logprobs[j]) if seq.top_logprobs else {},
                )
                for j, t in enumerate(texts)
            ]
            text, finish = "".join(texts), "stop" if cut else seq.finish_reason
            all_tokens = echo + tokens
            out.append(
                Completion(
                    text=prefix + text,
                    tokens=all_tokens,
                    logprob=float(sum(t.logprob for t in all_tokens)),
                    finish_reason=finish,
                )
            )
        return out
