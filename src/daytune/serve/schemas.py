"""Request and response bodies. Field names are HELM's (HTTPModelClient, HTTPModelTokenizer); the organisers'
sample names (num_samples, top_k, seed) are accepted too. Bounds here are the OpenAPI schema's; limits that
depend on the model (context, vocabulary) or the server's settings are checked by the server, naming the field."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 1_000_000  # far beyond any context; refused before tokenizing
MAX_STOP_SEQUENCES = 16
MAX_DECODE_TOKENS = 1_000_000


def _valid_unicode(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return v


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    temperature: float = Field(
        1e-7, ge=0.0, le=100.0, description="below 1e-4 means greedy (HELM sends 1e-7)"
    )
    num_return_sequences: int = Field(
        1, ge=1, le=16, validation_alias=AliasChoices("num_return_sequences", "num_samples")
    )
    max_new_tokens: int = Field(100, ge=0, le=8192, description="the server may cap it lower (see /health)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        0, ge=0, le=1_000_000, description="sample only among the k most likely tokens; 0 = no limit"
    )
    echo_prompt: bool = False
    top_k_per_token: int = Field(
        1, ge=0, le=20, description="alternatives reported in each token's top_logprob"
    )
    stop_sequences: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="reproduces a sample; sequence i uses seed + i"
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
            if len(s) > 1000:
                raise ValueError("each stop sequence must be at most 1000 characters")
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
    model_config = ConfigDict(allow_inf_nan=False)

    text: str = Field(max_length=MAX_PROMPT_CHARS)
    truncation: bool = True
    max_length: int = Field(2048, ge=1, le=1_000_000)

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _valid_unicode(v)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(BaseModel):
    tokens: list[int] = Field(max_length=MAX_DECODE_TOKENS)


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class HealthResponse(BaseModel):
    status: str = Field(description="ok, or stopping during a graceful shutdown")
    model: str
    adapter: str | None
    adapter_merged: bool
    run_id: str | None
    device: str
    max_context: int
    max_new_tokens: int
    queue: dict[str, int]
