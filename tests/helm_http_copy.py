"""A faithful copy of how HELM talks to an HTTP model server, for tests that must not depend on crfm-helm.

Copied request construction and response handling (HELM's dataclasses reduced to dicts), from
stanford-crfm/helm:
  src/helm/clients/http_model_client.py      commit 5a8ed6f41c12130bd192443ecd300cfc88b7a099  (HTTPModelClient)
  src/helm/tokenizers/http_model_tokenizer.py commit d63be8e774b9664536292948a5c81d6dca02b79a  (HTTPModelTokenizer)
  src/helm/benchmark/window_services/http_model_window_service.py commit 1d7e97b0a82ea518cea0074670f7b4d7a0662159
      (prefix_token "<|endoftext|>", max_sequence_length 2048)
  src/helm/benchmark/metrics/basic_metrics.py commit 00abf6a630fd057f35539b906fd40ca9a951edb1
      (compute_language_modeling_metrics: drops the first num_conditioning_tokens tokens)
tests/test_serve_helm.py also drives the server with HELM's real classes when a separate HELM venv exists.
"""

from __future__ import annotations

import os

import requests

PREFIX_TOKEN = "<|endoftext|>"  # HTTPModelWindowServce.prefix_token


def base_url(default: str = "http://localhost:8080") -> str:
    return (
        default if not os.environ.get("HELM_HTTP_MODEL_BASE_URL") else os.environ["HELM_HTTP_MODEL_BASE_URL"]
    )


def make_request(
    prompt: str,
    temperature: float = 1.0,
    num_completions: int = 1,
    max_tokens: int = 100,
    top_p: float = 1,
    echo_prompt: bool = False,
    top_k_per_token: int = 1,
    stop_sequences: list[str] = (),
    timeout: int = 3000,
) -> dict:
    """HTTPModelClient.make_request: the raw request it posts, and the RequestResult fields it builds."""
    raw_request = {
        "prompt": prompt,
        "temperature": 1e-7 if temperature == 0 else temperature,
        "num_return_sequences": num_completions,
        "max_new_tokens": max_tokens,
        "top_p": top_p,
        "echo_prompt": echo_prompt,
        "top_k_per_token": top_k_per_token,
        "stop_sequences": list(stop_sequences),
    }
    try:
        response = requests.post(f"{base_url()}/process", json=raw_request, timeout=timeout)
        response.raise_for_status()
        response = response.json()
        tokens = [{"text": token["text"], "logprob": token["logprob"]} for token in response["tokens"]]
        completions = [{"text": response["text"], "logprob": response["logprob"], "tokens": tokens}]
        return {"success": True, "completions": completions, "request_time": response["request_time"]}
    except requests.exceptions.RequestException as e:
        return {"success": False, "error": f"Request error: {e}", "completions": []}


def tokenize(text: str, truncation: bool = False, max_length: int = 2048) -> dict:
    """HTTPModelTokenizer.tokenize (TokenizationRequest's defaults: truncation False, max_length 2048)."""
    raw_request = {"text": text, "truncation": truncation, "max_length": max_length}
    try:
        response = requests.post(f"{base_url()}/tokenize", json=raw_request)
        response.raise_for_status()
        result = response.json()
    except Exception as e:
        return {"success": False, "error": f"Local Model error: {e}", "tokens": []}
    return {
        "success": True,
        "text": text,
        "tokens": list(result["tokens"]),
        "request_time": result["request_time"],
    }


def decode(tokens: list[int]) -> dict:
    """HTTPModelTokenizer.decode."""
    try:
        response = requests.post(f"{base_url()}/decode", json={"tokens": tokens})
        response.raise_for_status()
        result = response.json()
    except Exception as e:
        return {"success": False, "error": f"Local Model error: {e}", "text": ""}
    return {"success": True, "text": result["text"], "request_time": result["request_time"]}


def language_modeling_logprob(completion: dict, num_conditioning_tokens: int) -> tuple[float, int]:
    """compute_language_modeling_metrics: logprob and token count over the predicted (non-conditioning) tokens."""
    tokens = completion["tokens"]
    if num_conditioning_tokens > 0 and tokens[0]["text"] == "":
        tokens = tokens[1:]
    pred_tokens = tokens[num_conditioning_tokens:]
    return sum(t["logprob"] for t in pred_tokens), len(pred_tokens)
