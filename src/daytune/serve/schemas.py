"""Request and response bodies. Field names are HELM's (HTTPModelClient, HTTPModelTokenizer); the organisers'
sample names (num_samples, top_k, seed) are accepted too. Types are strict (no "4" for 4, no 0 for false), so the
OpenAPI schema says exactly what is accepted; `server_requests` puts the limits that depend on the model (context,
vocabulary) and on the server's settings into the schema too. What no schema can say (a prompt's token count) is
checked by the server, naming the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    field_validator,
)

MAX_PROMPT_CHARS = 1_000_000  # far beyond any context; refused before tokenizing
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1000
MAX_DECODE_TOKENS = 1_000_000
DEFAULT_MAX_NEW_TOKENS = 100
SAMPLES_ALIAS = AliasChoices("num_return_sequences", "num_samples")


def _integral(v):
    """JSON Schema's integer is any number without a fractional part: 5 and 5.0, never "5" or true."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Integer = Annotated[int, BeforeValidator(_integral)]  # strict int otherwise


def bounded(**bounds):
    """An Integer with bounds, where a Field on the field itself cannot put them (in a list, or beside None):
    the bounds come first, so the schema says minimum/maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


def _valid_unicode(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return v


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False, strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    temperature: float = Field(
        1e-7, ge=0.0, le=100.0, description="below 1e-4 means greedy (HELM sends 1e-7)"
    )
    num_return_sequences: Integer = Field(1, ge=1, le=16, validation_alias=SAMPLES_ALIAS)
    max_new_tokens: Integer = Field(DEFAULT_MAX_NEW_TOKENS, ge=0, le=8192)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Integer = Field(
        0, ge=0, le=1_000_000, description="sample only among the k most likely tokens; 0 = no limit"
    )
    echo_prompt: bool = False
    top_k_per_token: Integer = Field(
        1, ge=0, le=20, description="alternatives reported in each token's top_logprob"
    )
    stop_sequences: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES
    )
    seed: bounded(ge=0, le=2**32 - 1) | None = Field(
        None, description="reproduces a sample; sequence i uses seed + i"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _valid_unicode(v)

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        for s in v:
            _valid_unicode(s)
        return v


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class Completion(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    finish_reason: str = Field(description="length | stop | endoftext (HELM's names)")


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float
    completions: list[Completion] = Field(
        description="all num_return_sequences samples; the first is also on top"
    )


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, strict=True)

    text: str = Field(max_length=MAX_PROMPT_CHARS)
    truncation: bool = True
    max_length: Integer = Field(2048, ge=1, le=1_000_000)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _valid_unicode(v)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    tokens: list[Integer] = Field(max_length=MAX_DECODE_TOKENS)


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class HealthResponse(BaseModel):
    status: str = Field(description="ok, or stopping during a graceful shutdown")
    model: str
    adapter: str | None
    adapter_merged: bool
    run_id: str | None
    engine: str = Field("daytune", description="daytune (its own batched engine) or vllm (--engine vllm)")
    device: str
    dtype: str | None = Field(None, description="the weights' dtype (--dtype), e.g. float32 or bfloat16")
    fast_path: bool = Field(False, description="daytune's fused decode forward runs the model (Llama family)")
    packed_linears: int = Field(
        0, description="linear layers on weights packed once for oneDNN (bf16 on a CPU)"
    )
    max_context: int
    max_new_tokens: int
    queue: dict[str, int]
    prefix_cache: dict[str, int] | None = Field(
        None,
        description="the prefix cache (--prefix-cache-mb): entries, bytes, max_bytes, lookups, hits, "
        "tokens_reused, tokens_prefilled, evicted; null when off",
    )


class ErrorResponse(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class InvalidResponse(BaseModel):
    """A 422: each problem with where it is (["body", field, ...])."""

    detail: list[FieldError]


def server_requests(
    *, max_prompt_chars: int, max_new_tokens: int, vocab: int, max_sequences: int
) -> tuple[type[ProcessRequest], type[DecodeRequest]]:
    """The /process and /decode bodies with this server's limits in their schema: a prompt no longer than the
    context could hold, `max_new_tokens` up to the cap, `top_k` and token ids within the vocabulary, and no more
    return sequences than the queue holds."""
    process = create_model(
        "ProcessRequest",
        __base__=ProcessRequest,
        prompt=(str, Field(max_length=max_prompt_chars, description="longer prompts cannot fit the context")),
        num_return_sequences=(
            Integer,
            Field(
                1,
                ge=1,
                le=max_sequences,
                validation_alias=SAMPLES_ALIAS,
                description="at most 16, and no more than this server's queue holds (--max-queue)",
            ),
        ),
        max_new_tokens=(
            Integer,
            Field(
                min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens),
                ge=0,
                le=max_new_tokens,
                description="prompt tokens + max_new_tokens must fit the model's context (else 422)",
            ),
        ),
        top_k=(
            Integer,
            Field(0, ge=0, le=vocab, description="sample only among the k most likely tokens; 0 = no limit"),
        ),
    )
    decode = create_model(
        "DecodeRequest",
        __base__=DecodeRequest,
        tokens=(list[bounded(ge=0, lt=vocab)], Field(max_length=MAX_DECODE_TOKENS)),
    )
    return process, decode
