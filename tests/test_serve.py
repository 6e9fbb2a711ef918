"""The competition API on a tiny model: HELM's fields, correct echo logprobs, stop sequences, clear 422s."""

import pytest
import torch
from fastapi.testclient import TestClient

from daytune.engine.text import token_texts
from daytune.serve.app import create_app
from daytune.serve.model import ServeModel


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    return ServeModel(str(tiny_model_dir), device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server))


HELM_REQUEST = {  # exactly what HELM's HTTPModelClient sends
    "prompt": "Natalia sold clips to 48 of her friends",
    "temperature": 1e-7,
    "num_return_sequences": 1,
    "max_new_tokens": 8,
    "top_p": 1,
    "echo_prompt": False,
    "top_k_per_token": 1,
    "stop_sequences": [],
}


def test_helm_request_shape(client):
    r = client.post("/process", json=HELM_REQUEST)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"text", "tokens", "logprob", "request_time"}
    assert len(body["tokens"]) == 8
    assert "".join(t["text"] for t in body["tokens"]) == body["text"]
    assert body["logprob"] == pytest.approx(sum(t["logprob"] for t in body["tokens"]))
    for t in body["tokens"]:
        assert t["logprob"] <= 0 and len(t["top_logprob"]) == 1


def test_echo_logprobs_are_next_token_logprobs(client, server):
    req = dict(HELM_REQUEST, echo_prompt=True, max_new_tokens=0, top_k_per_token=3)
    body = client.post("/process", json=req).json()
    ids = server.tokenizer(req["prompt"])["input_ids"]
    assert "".join(t["text"] for t in body["tokens"]) == req["prompt"] == body["text"]
    assert len(body["tokens"]) == len(ids)
    with torch.no_grad():
        lp = torch.log_softmax(server.model(torch.tensor([ids])).logits[0].float(), -1)
    assert body["tokens"][0]["logprob"] == 0.0  # no context for the first token (documented)
    for i in range(1, len(ids)):
        assert body["tokens"][i]["logprob"] == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert len(body["tokens"][i]["top_logprob"]) == 3
        assert max(body["tokens"][i]["top_logprob"].values()) == pytest.approx(
            lp[i - 1].max().item(), abs=1e-4
        )


def test_echo_with_generation_puts_prompt_first(client):
    body = client.post("/process", json=dict(HELM_REQUEST, echo_prompt=True, max_new_tokens=4)).json()
    assert body["text"].startswith(HELM_REQUEST["prompt"])
    assert "".join(t["text"] for t in body["tokens"]) == body["text"]


def test_greedy_is_deterministic_and_seed_reproduces(client):
    a = client.post("/process", json=HELM_REQUEST).json()
    b = client.post("/process", json=HELM_REQUEST).json()
    assert a["text"] == b["text"]
    sample = dict(HELM_REQUEST, temperature=1.0, seed=7, max_new_tokens=12)
    s1, s2 = (client.post("/process", json=sample).json() for _ in range(2))
    assert s1["text"] == s2["text"]


def test_stop_sequences_cut_text_and_tokens(client):
    free = client.post("/process", json=dict(HELM_REQUEST, max_new_tokens=12)).json()
    text = free["text"]
    # pick a stop sequence from inside the free-running text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    body = client.post("/process", json=dict(HELM_REQUEST, max_new_tokens=12, stop_sequences=[stop])).json()
    assert stop not in body["text"] and text.startswith(body["text"])
    assert "".join(t["text"] for t in body["tokens"]) == body["text"]
    assert len(body["tokens"]) < len(free["tokens"])
    assert body["completions"][0]["finish_reason"] == "stop"


def test_num_return_sequences_and_aliases(client):
    req = {k: v for k, v in HELM_REQUEST.items() if k != "num_return_sequences"}
    body = client.post("/process", json=dict(req, temperature=1.0, num_samples=3, seed=1)).json()
    assert len(body["completions"]) == 3 and body["text"] == body["completions"][0]["text"]


def test_tokenize_and_decode_roundtrip(client, server):
    text = "Weng earns $12 an hour for babysitting."
    r = client.post("/tokenize", json={"text": text, "truncation": True, "max_length": 2048}).json()
    assert r["tokens"] == server.tokenizer(text)["input_ids"] and r["request_time"] >= 0
    assert client.post("/decode", json={"tokens": r["tokens"]}).json()["text"] == text
    short = client.post("/tokenize", json={"text": text, "truncation": True, "max_length": 3}).json()
    assert len(short["tokens"]) == 3


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"num_return_sequences": 1000}, "num_return_sequences"),
        ({"max_new_tokens": 4000}, "max_new_tokens"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_invalid_requests_name_the_field(client, patch, field):
    r = client.post("/process", json={**HELM_REQUEST, **patch})
    assert r.status_code == 422
    assert field in r.text


def test_empty_prompt_starts_from_bos_and_bad_tokens(client, server):
    """The schema allows an empty prompt, so the server answers it: generation conditioned on the BOS token alone
    (not echoed), as greedy decoding from [BOS] gives."""
    r = client.post("/process", json=dict(HELM_REQUEST, prompt="", echo_prompt=True, max_new_tokens=5))
    assert r.status_code == 200, r.text
    ids = [server.tokenizer.bos_token_id]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(server.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert r.json()["text"] == server.tokenizer.decode(ids[1:])
    r = client.post("/decode", json={"tokens": [1, 10**9]})
    assert r.status_code == 422 and "tokens" in r.text
    r = client.post("/process", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_health_reports_what_is_served(client, tiny_model_dir):
    """By name: /health is open even with a token, so it shows no path of this machine."""
    r = client.get("/health")
    body = r.json()
    assert body["status"] == "ok" and body["model"] == tiny_model_dir.name and body["adapter"] is None
    assert str(tiny_model_dir.parent) not in r.text


def test_token_texts_join_to_the_decoded_string(server):
    text = "naïve café — 東京"
    ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(server.tokenizer, ids)) == text


def test_first_echoed_token_is_helms_no_context_token(client):
    body = client.post(
        "/process", json=dict(HELM_REQUEST, echo_prompt=True, max_new_tokens=0, top_k_per_token=2)
    ).json()
    first = body["tokens"][0]
    assert first["logprob"] == 0.0 and first["top_logprob"] == {}
    assert body["completions"][0]["finish_reason"] == "length"


def test_default_max_new_tokens_respects_the_server_cap(tiny_model_dir, server):
    from daytune.serve.options import ServeOptions

    app = create_app(server, ServeOptions(max_new_tokens=5))
    try:
        body = (
            TestClient(app).post("/process", json={"prompt": "Weng earns"}).json()
        )  # default 100, capped to 5
        assert len(body["tokens"]) <= 5
    finally:
        app.state.scheduler.close(5)


def test_stop_sequences_property(client, server):
    """For any stop sequence: text is the free text cut before its first occurrence, and tokens join to text."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    free = client.post("/process", json=dict(HELM_REQUEST, max_new_tokens=16)).json()
    text = free["text"]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.integers(0, len(text) - 1), st.integers(1, 4), st.text(max_size=2))
    def check(start, length, junk):
        stop = text[start : start + length] if junk == "" else junk + text[start : start + length]
        body = client.post(
            "/process", json=dict(HELM_REQUEST, max_new_tokens=16, stop_sequences=[stop])
        ).json()
        expected = text[: text.index(stop)] if stop in text else None
        if expected is not None:
            assert body["text"] == expected
            assert body["completions"][0]["finish_reason"] == "stop"
        else:  # the stop sequence may appear only across what the free text had; then nothing is cut
            assert text.startswith(body["text"])
        assert "".join(t["text"] for t in body["tokens"]) == body["text"]
        assert body["logprob"] == pytest.approx(sum(t["logprob"] for t in body["tokens"]))

    check()


def test_generated_text_keeps_a_leading_space_in_context(server):
    """Token texts come from an incremental detokenizer seeded with prompt context."""
    ids = server.tokenizer(" sold clips to her friends", add_special_tokens=False)["input_ids"]
    texts = token_texts(server.tokenizer, ids[2:], context=ids[:2])
    assert "".join(texts) == server.tokenizer.decode(ids)[len(server.tokenizer.decode(ids[:2])) :]


def test_unmergeable_adapters_are_refused_clearly(tiny_recipe):
    from test_train import new_run

    from daytune.config import load_run_config
    from daytune.errors import ModelError
    from daytune.pipeline import train_run

    cfg = load_run_config(tiny_recipe(train={"method": "prompt", "max_steps": 1}))
    run = new_run(cfg)
    train_run(cfg, run)
    with pytest.raises(ModelError, match="cannot be merged"):
        ServeModel(cfg.model, run.trained, device="cpu", log=lambda *a: None)
