"""The model behind the server: load (merging any adapter), then answer /process, /tokenize and /decode.

Log-probabilities: every token's `logprob` is log P(token | all tokens before it) under the model's own
distribution (temperature 1, before top-k/top-p). With `echo_prompt`, the first prompt token has no context and
gets logprob 0.0 unless the tokenizer itself prepends a BOS token, which then serves as its context (and is not
returned as a token); HELM's language-modeling metrics skip that first token anyway.
"""

from __future__ import annotations

import threading
from pathlib import Path

from daytune.engine import generate, token_logprobs
from daytune.errors import DaytuneError
from daytune.models import load_model, load_tokenizer, resolve_model
from daytune.serve.schemas import Completion, ProcessRequest, Token
from daytune.train.methods import load_trained


class RequestError(DaytuneError):
    """A request the server refuses (HTTP 422), naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Per-token text such that the pieces join to the decoded string (multi-byte characters split over several
    tokens land on the token that completes them)."""
    texts, prev = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if cur.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(cur[len(prev) :] if cur.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = cur
    return texts


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


class ServeModel:
    def __init__(
        self,
        model_ref: str,
        adapter: str | Path | None = None,
        device: str | None = None,
        run_id: str | None = None,
        log=print,
    ):
        from daytune.train.precision import pick_device

        self.model_ref = model_ref
        self.adapter = str(adapter) if adapter else None
        self.run_id = run_id
        path = resolve_model(model_ref, log=log)
        self.device = pick_device(device or "auto")
        self.tokenizer = load_tokenizer(path)
        # an adapter is merged into the weights where its method allows: no adapter cost per token
        model = load_trained(path, Path(self.adapter), merge=True) if self.adapter else load_model(path)
        self.model = model.to(self.device).eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {
            "model": self.model_ref,
            "adapter": self.adapter,
            "run_id": self.run_id,
            "device": str(self.device),
            "max_context": self.max_context,
        }

    # -- /tokenize, /decode ---------------------------------------------------------------------------------
    def tokenize(self, text: str, truncation: bool, max_length: int) -> list[int]:
        return self.tokenizer(text, truncation=truncation, max_length=max_length)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        vocab = len(self.tokenizer)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError("tokens", f"ids must be within 0..{vocab - 1}; got {bad[:5]}")
        return self.tokenizer.decode(tokens)

    # -- /process -------------------------------------------------------------------------------------------
    def _tops(self, top: dict[int, float]) -> dict[str, float]:
        """{token text: logprob}. Byte pieces of one character all decode to U+FFFD and different ids can decode
        alike; those keep their vocabulary spelling, so the map has one entry per alternative."""
        out: dict[str, float] = {}
        for tid, lp in top.items():
            key = self.tokenizer.decode([tid])
            if key in out or "\ufffd" in key:
                key = self.tokenizer.convert_ids_to_tokens(tid)
            out[key] = lp
        return out

    def process(self, req: ProcessRequest) -> list[Completion]:
        ids = self.tokenizer(req.prompt)["input_ids"]
        if not ids and req.max_new_tokens > 0:
            raise RequestError("prompt", "is empty; generation needs at least one prompt token")
        if len(ids) + req.max_new_tokens > self.max_context:
            raise RequestError(
                "max_new_tokens",
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's context "
                f"of {self.max_context} tokens",
            )
        bos = self.tokenizer.bos_token_id
        n_special = (
            1
            if ids
            and bos is not None
            and ids[0] == bos
            and not req.prompt.startswith(self.tokenizer.bos_token or "\0")
            else 0
        )
        with self.lock:
            echo_tokens: list[Token] = []
            if req.echo_prompt and ids:
                scored = token_logprobs(self.model, ids, req.top_k_per_token)  # positions 1..n-1
                texts = token_texts(self.tokenizer, ids[n_special:])
                if n_special:
                    pairs = scored
                else:
                    pairs = [(0.0, {})] + scored
                for text, (lp, top) in zip(texts, pairs):
                    echo_tokens.append(Token(text=text, logprob=lp, top_logprob=self._tops(top)))
            completions = []
            for i in range(req.num_return_sequences):
                completions.append(self._one(req, ids, echo_tokens, i))
        return completions

    def _one(self, req: ProcessRequest, ids: list[int], echo_tokens: list[Token], index: int) -> Completion:
        stops = [s for s in req.stop_sequences if s]

        def stop_check(gen_ids: list[int]) -> bool:
            return (
                bool(stops)
                and cut_at_stop(self.tokenizer.decode(gen_ids, skip_special_tokens=True), stops) is not None
            )

        seed = None if req.seed is None else req.seed + index
        if req.max_new_tokens > 0:
            gen = generate(
                self.model,
                ids,
                max_new_tokens=req.max_new_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                seed=seed,
                eos_ids=self.eos_ids,
                top_k_per_token=req.top_k_per_token,
                stop_check=stop_check,
            )
            gen_ids, gen_lps, gen_tops, finish = (
                gen.token_ids,
                gen.logprobs,
                gen.top_logprobs,
                gen.finish_reason,
            )
        else:
            gen_ids, gen_lps, gen_tops, finish = [], [], [], "length"
        texts = token_texts(self.tokenizer, gen_ids)
        text = "".join(texts)
        cut = cut_at_stop(text, stops)
        tokens = []
        if cut is not None:
            text = text[:cut]
            finish = "stop"
        used = 0
        for j, t in enumerate(texts):
            if used + len(t) > len(text):
                break  # HELM's rule: a token that crosses the cut is dropped with the stop sequence
            used += len(t)
            tokens.append(
                Token(text=t, logprob=gen_lps[j], top_logprob=self._tops(gen_tops[j]) if gen_tops else {})
            )
        text = "".join(t.text for t in tokens) if cut is not None else text
        all_tokens = echo_tokens + tokens
        prefix = "".join(t.text for t in echo_tokens)
        return Completion(
            text=prefix + text,
            tokens=all_tokens,
            logprob=float(sum(t.logprob for t in all_tokens)),
            finish_reason=finish,
        )
