"""Request and response bodies. Field names are HELM's (HTTPModelClient, HTTPModelTokenizer); the organisers'
sample names (num_samples, top_k) are accepted as aliases."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str
    temperature: float = Field(
        1e-7, ge=0.0, le=100.0, description="below 1e-4 means greedy (HELM sends 1e-7)"
    )
    num_return_sequences: int = Field(
        1, ge=1, le=16, validation_alias=AliasChoices("num_return_sequences", "num_samples")
    )
    max_new_tokens: int = Field(100, ge=0, le=4096)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="sample only among the k most likely tokens; 0 = no limit")
    echo_prompt: bool = False
    top_k_per_token: int = Field(
        1, ge=0, le=20, description="alternatives reported in each token's top_logprob"
    )
    stop_sequences: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class Completion(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    finish_reason: str


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float
    completions: list[Completion] = Field(
        description="all num_return_sequences samples; the first is also on top"
    )


class TokenizeRequest(BaseModel):
    text: str
    truncation: bool = True
    max_length: int = Field(2048, ge=1)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(BaseModel):
    tokens: list[int]


class DecodeResponse(BaseModel):
    text: str
    request_time: float
