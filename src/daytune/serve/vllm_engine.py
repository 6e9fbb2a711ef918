"""`daytune serve --engine vllm`: vLLM runs the model, behind the same HELM API layer.

Everything a request meets before and after the model is daytune's, shared with its own engine: the schema and
limits, tokenization (vLLM gets token ids and never detokenizes), HELM's echo and first-token rules, stop sequences
cut on the text, `top_logprob` keys, the finish reasons. Only the forward passes and the sampler are vLLM's:
`VllmScheduler` is the scheduler's queue, deadlines, cancellation and shutdown with vLLM's `LLMEngine` stepped in
its worker thread instead of daytune's batch. A request maps onto vLLM's own options:

    temperature < 1e-4 (HELM's 1e-7)  -> temperature 0 (vLLM's greedy)
    top_p, top_k, seed + i            -> the same SamplingParams fields, one vLLM request per return sequence
    top_k_per_token                   -> logprobs=k (vLLM adds the chosen token; only ranks <= k are reported)
    echo_prompt                       -> prompt_logprobs=k (log P(token | all before), as daytune scores them)
    stop_sequences                    -> cut by daytune on the text; the vLLM request is aborted at the cut
    end of text                       -> stop_token_ids = the model's EOS ids (generation config + tokenizer)

Log-probabilities are vLLM's `raw_logprobs`: the model's own distribution before temperature and top-k/top-p,
the definition daytune's engine uses. Greedy text equals daytune's engine's and log-probabilities agree to float
rounding (tests/test_serve_vllm.py states the tolerance); sampled text differs, the two samplers draw differently.

vLLM loads a Hugging Face folder: a registered name, a .gguf or a hub id is resolved to one the way daytune loads
models; a run or an adapter is merged into a folder first (`daytune serve` does that, cached). Options for vLLM's
EngineArgs come from `--vllm-option KEY=VALUE` (e.g. enforce_eager=true, max_model_len=4096, dtype=bfloat16)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

from daytune.engine.decode import GREEDY_BELOW
from daytune.errors import ConfigError, ModelError
from daytune.models import load_tokenizer, resolve_model
from daytune.models.trained import eos_ids
from daytune.serve.model import ServeModel
from daytune.serve.scheduler import Scheduler, Sequence, limits


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def parse_vllm_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings -> EngineArgs keywords; values are read as YAML scalars (true, 4096, 0.5, bfloat16)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--vllm-option {pair!r}: expected KEY=VALUE, e.g. enforce_eager=true")
        out[key] = yaml.safe_load(value) if value.strip() else None
    return out


def engine_args(folder: Path, options, extra: dict) -> dict:
    """vLLM's EngineArgs for serving `folder` with the server's limits. On a CPU the weights stay fp32 (what
    daytune's engine serves there; vLLM would otherwise pick bf16); `extra` (--vllm-option) overrides anything."""
    from vllm.platforms import current_platform

    args = {
        "model": str(folder),
        "skip_tokenizer_init": True,  # token ids in, token ids out: daytune tokenizes and detokenizes
        "max_num_seqs": options.max_batch,
        "enable_prefix_caching": options.prefix_cache_mb > 0,
        "max_logprobs": 20,  # the schema's top_k_per_token limit
        "seed": 0,
    }
    if current_platform.device_type == "cpu":
        args["dtype"] = "float32"
    return args | extra


class VllmServeModel(ServeModel):
    """A model folder served by vLLM: the tokenizer and limits are daytune's, the engine is vLLM's LLMEngine."""

    engine = "vllm"

    def __init__(self, model_ref: str, options, *, run_id: str | None = None, vllm_options=None, log=print):
        if not vllm_installed():
            raise ModelError(
                "--engine vllm: vLLM is not installed in this environment (make vllm-venv builds one beside "
                "daytune's; run daytune from it)"
            )
        import os

        from transformers import GenerationConfig
        from vllm import EngineArgs, LLMEngine
        from vllm.platforms import current_platform

        if current_platform.device_type == "cpu":
            # vLLM's engine in this process, unless the environment says otherwise: its default engine-core
            # process made this server 1.8x slower at 8 clients on 2 cores (benchmarks/serve_vllm.py, eager:
            # 1.10 vs 1.96 requests/s), the two processes fighting over the cores. On a GPU vLLM's default stays.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

        folder = resolve_model(model_ref, log=log)
        tokenizer = load_tokenizer(folder)
        generation = None
        if (folder / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(folder)
        eos = eos_ids(SimpleNamespace(generation_config=generation), tokenizer)
        args = engine_args(folder, options, dict(vllm_options or {}))
        log(
            f"Starting vLLM on {folder.name} ({', '.join(f'{k}={v}' for k, v in args.items() if k != 'model')})"
        )
        try:
            self.llm = LLMEngine.from_engine_args(EngineArgs(**args))
        except TypeError as e:  # an --vllm-option EngineArgs does not have
            raise ConfigError(f"--vllm-option: {e}") from None
        self.device = current_platform.device_type
        self.prefix_caching = bool(args["enable_prefix_caching"])
        max_len = self.llm.model_config.max_model_len
        self._describe(model_ref, None, run_id, tokenizer, eos, int(max_len))

    def scheduler(self, options) -> Scheduler:
        return VllmScheduler(self.llm, **limits(options), prefix_caching=self.prefix_caching)


def sampling_params(seq: Sequence):
    """One sequence's request as vLLM's SamplingParams (see the module docstring for the mapping)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = seq.sampling
    return SamplingParams(
        n=1,
        temperature=0.0 if s.temperature < GREEDY_BELOW else s.temperature,
        top_p=s.top_p,
        top_k=s.top_k or 0,
        seed=seq.seed,
        max_tokens=max(1, seq.max_new_tokens),  # 0 (echo only): one token is computed and not kept
        logprobs=seq.top_k_per_token,
        prompt_logprobs=seq.score_prompt,
        stop_token_ids=sorted(seq.eos_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,  # each step returns only the new tokens
    )


def _scored(token: int, logprobs: dict, k: int) -> tuple[float, dict[int, float]]:
    """vLLM's {id: Logprob} at one position -> (the token's log-probability, the k most likely {id: logprob})."""
    tops = {tid: lp.logprob for tid, lp in logprobs.items() if lp.rank is not None and lp.rank <= k}
    return float(logprobs[token].logprob), dict(sorted(tops.items(), key=lambda kv: -kv[1]))


class VllmScheduler(Scheduler):
    """The scheduler with vLLM's LLMEngine in its worker: admitted sequences are added as vLLM requests, every
    step's new tokens go through `Sequence.accept` (EOS, stop sequences, limits, as in daytune's engine), and a
    sequence that leaves early (a stop sequence, a hang-up, a deadline, shutdown) is aborted in vLLM."""

    def __init__(self, llm, *, prefix_caching: bool, **limits):
        self.llm = llm
        self.prefix_caching = prefix_caching
        self.request_of: dict[int, str] = {}  # id(sequence) -> its vLLM request id
        self.sequence_of: dict[str, Sequence] = {}
        self.live: set[str] = set()  # requests vLLM has not finished
        self.ids = itertools.count()
        super().__init__(None, **limits)

    def prefix_cache_info(self) -> dict | None:
        return {"vllm_prefix_caching": 1} if self.prefix_caching else None

    def _prefill(self, new: list[Sequence]) -> None:
        self.steps["prefill"] += 1
        for seq in new:
            rid = f"daytune-{next(self.ids)}"
            try:
                self.llm.add_request(rid, {"prompt_token_ids": seq.prompt_ids}, sampling_params(seq))
            except Exception as e:  # vLLM refused this one request: that request's error alone
                self._finish(seq, e)
                continue
            self.request_of[id(seq)], self.sequence_of[rid] = rid, seq
            self.live.add(rid)
            self.running.append(seq)

    def _decode(self) -> None:
        self.steps["decode"] += 1
        self.steps["max_rows"] = max(self.steps["max_rows"], len(self.running))
        left = set()
        for out in self.llm.step():
            seq = self.sequence_of.get(out.request_id)
            if out.finished:
                self.live.discard(out.request_id)
            if seq is not None and self._take(seq, out):
                left.add(id(seq))
        self._keep_rows([i for i, s in enumerate(self.running) if id(s) not in left])

    def _take(self, seq: Sequence, out) -> bool:
        """One step's output for one sequence; True when the sequence is finished (and resolved)."""
        if out.prompt_logprobs and seq.score_prompt is not None:
            scored = [
                _scored(seq.prompt_ids[i], lps, seq.score_prompt)
                for i, lps in enumerate(out.prompt_logprobs)
                if lps is not None
            ]
            seq.prompt_logprobs = (seq.prompt_logprobs or []) + scored
        if seq.max_new_tokens <= 0:  # only the prompt's log-probabilities were asked for
            if out.finished or (seq.prompt_logprobs and len(seq.prompt_logprobs) >= len(seq.prompt_ids) - 1):
                self._finish(seq)
                return True
            return False
        o = out.outputs[0]
        for j, tok in enumerate(o.token_ids):
            lp, tops = _scored(tok, o.logprobs[j], seq.top_k_per_token)
            done = self._accept(seq, (tok, lp, tops))
            if done is None:  # the stop check failed: that sequence was failed alone
                return True
            if done:
                self._finish(seq)
                return True
        if out.finished:  # vLLM stopped it: its length limit, or an EOS id it left out of the tokens
            if o.finish_reason == "stop":
                seq.finish_reason = "endoftext"
            self._finish(seq)
            return True
        return False

    def _keep_rows(self, keep: list[int]) -> None:
        kept = {id(self.running[i]) for i in keep}
        abort = []
        for seq in self.running:
            if id(seq) not in kept:
                rid = self.request_of.pop(id(seq), None)
                self.sequence_of.pop(rid, None)
                if rid in self.live:
                    abort.append(rid)
                    self.live.discard(rid)
        if abort:
            self.llm.abort_request(abort)
        self.running = [self.running[i] for i in keep]
