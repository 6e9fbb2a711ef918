"""The server as HELM sees it: through a faithful copy of HELM's HTTP client and tokenizer (always), and through
HELM's own HTTPModelClient and HTTPModelTokenizer in the separate HELM venv (`make helm-venv`; .ci/run builds it,
and with CI=true the test fails rather than skips without it). HELM's language-modeling scenario: prefix
"<|endoftext|>", echo, drop the conditioning token."""

import json
import os
import subprocess
from pathlib import Path

import helm_http_copy as helm
import pytest
import torch
from serve_helpers import HELM_PYTHON, live_server, require_helm_venv

from daytune.serve.model import ServeModel

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return ServeModel(str(tiny_model_dir), device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def url(server):
    with live_server(server) as url:
        old = os.environ.get("HELM_HTTP_MODEL_BASE_URL")
        os.environ["HELM_HTTP_MODEL_BASE_URL"] = url
        yield url
        if old is None:
            del os.environ["HELM_HTTP_MODEL_BASE_URL"]
        else:
            os.environ["HELM_HTTP_MODEL_BASE_URL"] = old


def direct_logprobs(server, ids):
    with torch.no_grad():
        lp = torch.log_softmax(server.model(torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def greedy(server, ids, n):
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(server.model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


def test_helm_language_modeling_window(url, server):
    """HELM's first LM window: tokenize, prepend the prefix token, decode to a prompt, echo with max_tokens 0;
    its metric drops one conditioning token and sums the rest, which must equal a direct forward pass."""
    tokens = helm.tokenize(TEXT)["tokens"]
    prefix = helm.tokenize(helm.PREFIX_TOKEN)["tokens"]
    assert len(prefix) == 1  # a special token: one conditioning token, as HELM assumes
    prompt = helm.decode(prefix + tokens)["text"]
    assert prompt == helm.PREFIX_TOKEN + TEXT
    result = helm.make_request(prompt, temperature=0, max_tokens=0, echo_prompt=True)
    assert result["success"], result
    (completion,) = result["completions"]
    assert completion["text"] == prompt == "".join(t["text"] for t in completion["tokens"])
    assert len(completion["tokens"]) == 1 + len(tokens)
    assert completion["tokens"][0] == {"text": helm.PREFIX_TOKEN, "logprob": 0.0}
    logprob, n = helm.language_modeling_logprob(completion, num_conditioning_tokens=1)
    expected = direct_logprobs(server, prefix + tokens)
    assert n == len(tokens)
    for got, want in zip([t["logprob"] for t in completion["tokens"][1:]], expected):
        assert got == pytest.approx(want, abs=1e-4)
    assert logprob == pytest.approx(sum(expected), abs=1e-3)
    assert completion["logprob"] == pytest.approx(sum(expected), abs=1e-3)


def test_helm_generation_with_stop_sequences(url, server):
    ids = server.tokenizer(TEXT)["input_ids"]
    free = helm.make_request(TEXT, temperature=0, max_tokens=12)["completions"][0]
    assert free["text"] == server.tokenizer.decode(greedy(server, ids, 12))
    stop = free["text"][5:7]
    cut = helm.make_request(TEXT, temperature=0, max_tokens=12, stop_sequences=[stop])["completions"][0]
    assert cut["text"] == free["text"][: free["text"].index(stop)]
    assert "".join(t["text"] for t in cut["tokens"]) == cut["text"]
    assert cut["logprob"] == pytest.approx(sum(t["logprob"] for t in cut["tokens"]))


def test_helm_tokenizer_truncation_and_errors(url, server):
    full = helm.tokenize(TEXT)["tokens"]
    assert full == server.tokenizer(TEXT)["input_ids"]
    assert helm.tokenize(TEXT, truncation=True, max_length=5)["tokens"] == full[:5]
    assert helm.decode(full)["text"] == TEXT
    assert not helm.decode([10**9])["success"]  # a 422, which HELM reports as a failed request
    assert not helm.make_request(TEXT, max_tokens=10**6)["success"]  # over the server's cap: a 422


def test_helm_real_client_classes(url, server):
    """HELM's own HTTPModelClient and HTTPModelTokenizer, in their own venv, against this server."""
    require_helm_venv()
    script = f"""
import json
from helm.clients.http_model_client import HTTPModelClient
from helm.common.cache import BlackHoleCacheConfig
from helm.common.request import Request
from helm.common.tokenization_request import DecodeRequest, TokenizationRequest
from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

tok = HTTPModelTokenizer(cache_config=BlackHoleCacheConfig())
client = HTTPModelClient(cache_config=BlackHoleCacheConfig())
text = {TEXT!r}
tokens = [t.value for t in tok.tokenize(TokenizationRequest(text=text, tokenizer="neurips/local")).tokens]
prefix = [t.value for t in tok.tokenize(TokenizationRequest(text="<|endoftext|>", tokenizer="neurips/local")).tokens]
prompt = tok.decode(DecodeRequest(tokens=prefix + tokens, tokenizer="neurips/local")).text
echo = client.make_request(Request(model="neurips/local", model_deployment="neurips/local", prompt=prompt,
                                   temperature=0, max_tokens=0, echo_prompt=True))
gen = client.make_request(Request(model="neurips/local", model_deployment="neurips/local", prompt=text,
                                  temperature=0, max_tokens=12, stop_sequences=["."]))
def out(r):
    return {{"success": r.success, "error": r.error, "completions": [
        {{"text": c.text, "logprob": c.logprob, "tokens": [[t.text, t.logprob] for t in c.tokens]}}
        for c in r.completions]}}
print(json.dumps({{"tokens": tokens, "prefix": prefix, "prompt": prompt, "echo": out(echo), "gen": out(gen)}}))
"""
    env = {**os.environ, "HELM_HTTP_MODEL_BASE_URL": url}
    proc = subprocess.run(
        [str(HELM_PYTHON), "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tokens"] == server.tokenizer(TEXT)["input_ids"] and len(got["prefix"]) == 1
    assert got["prompt"] == helm.PREFIX_TOKEN + TEXT
    echo = got["echo"]["completions"][0]
    assert got["echo"]["success"] and echo["text"] == got["prompt"]
    expected = direct_logprobs(server, got["prefix"] + got["tokens"])
    assert echo["tokens"][0] == [helm.PREFIX_TOKEN, 0.0]
    assert [lp for _, lp in echo["tokens"][1:]] == pytest.approx(expected, abs=1e-4)
    gen = got["gen"]["completions"][0]
    ids = server.tokenizer(TEXT)["input_ids"]
    free = server.tokenizer.decode(greedy(server, ids, 12))
    assert gen["text"] == (free[: free.index(".")] if "." in free else free)
    assert "".join(t for t, _ in gen["tokens"]) == gen["text"]
