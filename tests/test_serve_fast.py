"""The server's fast path: the fused Llama-family decode forward computes what the model's own forward computes
(prefill with padding, decode steps, rows joining and leaving, prompt scoring), and is refused where it would not;
`serve --dtype bfloat16`: weights packed once for oneDNN give what the unpacked bf16 model gives."""

import pytest
import torch
from fastapi.testclient import TestClient

from daytune.cli import main
from daytune.engine.decode import decode_step, merge_batches, prefill, select_rows
from daytune.engine.fast import FastForward, enable_fast_path, fast_forward
from daytune.engine.packed import PackedLinear, can_pack, pack_linears
from daytune.models import load_model
from daytune.serve.app import create_app
from daytune.serve.model import ServeModel

needs_packing = pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")), reason="this PyTorch build has no oneDNN packing"
)


def _tiny(kind: str, **extra):
    """A random 2-layer model of a transformers class, built from its config."""
    import transformers

    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    fields |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256) | extra
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**fields)
    return getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()


def _run(model):
    """Logits of a serving session: three prompts prefilled together (padded), decode steps, a fourth prompt
    joining the batch, a row leaving, more steps; and the first prompt's own log-probabilities."""
    prompts = [[5, 9, 13, 2, 7, 1, 3], [4, 4, 8], [11, 12, 13, 14, 15]]
    pre = prefill(model, prompts, score_prompt=[2, None, None])
    out, batch, tokens = [pre.logits], pre.batch, [1, 2, 3]
    for step in range(3):
        out.append(decode_step(model, batch, tokens))
        tokens = [(t * 7 + step) % 97 for t in tokens]
    late = prefill(model, [[20, 21, 22, 23]])
    out.append(late.logits)
    batch = merge_batches(batch, late.batch)
    tokens += [30]
    batch = select_rows(batch, [0, 2, 3])
    tokens = [tokens[i] for i in (0, 2, 3)]
    for _ in range(3):
        out.append(decode_step(model, batch, tokens))
    return out, pre.prompt_logprobs[0]


@pytest.mark.parametrize(
    "kind, extra",
    [("Llama", {}), ("Llama", {"attention_bias": True, "tie_word_embeddings": True}), ("Qwen2", {})],
)
def test_fast_path_computes_what_the_model_does(kind, extra):
    plain, fast = _tiny(kind, **extra), _tiny(kind, **extra)
    assert enable_fast_path(fast) and fast_forward(fast) is not None
    want, want_scored = _run(plain)
    got, got_scored = _run(fast)
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()) + 1e-6)
    assert [k for _, k in want_scored] == [k for _, k in got_scored]
    for (a, _), (b, _) in zip(want_scored, got_scored):
        assert a == pytest.approx(b, abs=1e-5)


def test_fused_weights_are_the_models_own_memory():
    model = _tiny("Llama")
    before = sum(p.numel() for p in model.parameters())
    assert enable_fast_path(model)
    attn = model.model.layers[0].self_attn
    fused = fast_forward(model).layers[0][1].inner.weight
    assert attn.k_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(fused[: attn.q_proj.weight.shape[0]], attn.q_proj.weight)
    assert sum(p.numel() for p in model.parameters()) == before


def test_fast_path_is_refused_where_it_would_not_compute_the_same():
    said = []
    mistral = _tiny("Mistral", sliding_window=4)
    assert not enable_fast_path(mistral, log=said.append) and fast_forward(mistral) is None
    assert "sliding-window" in said[-1]
    gpt2 = __import__("transformers").GPT2LMHeadModel(
        __import__("transformers").GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    assert not enable_fast_path(gpt2, log=said.append) and "GPT2LMHeadModel" in said[-1]


def test_a_fast_path_that_disagrees_is_not_used(monkeypatch):
    model = _tiny("Llama")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        before = model(ids).logits
    real = FastForward.__call__

    def wrong(self, *args):
        out = real(self, *args)
        out.logits = out.logits + 1.0
        return out

    monkeypatch.setattr(FastForward, "__call__", wrong)
    said = []
    assert not enable_fast_path(model, log=said.append) and "differ" in said[-1]
    assert fast_forward(model) is None
    with torch.no_grad():  # the model's own forward, on its (now fused) weights, computes what it did
        assert torch.equal(model(ids).logits, before)


@needs_packing
def test_packed_model_computes_what_the_unpacked_one_does(tiny_model_dir):
    plain = load_model(tiny_model_dir, dtype=torch.bfloat16).eval()
    packed = load_model(tiny_model_dir, dtype=torch.bfloat16).eval()
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert isinstance(packed.get_output_embeddings(), PackedLinear)
    ids = torch.randint(0, plain.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(tiny_model_dir).eval()(ids).logits
        a, b = plain(ids).logits.float(), packed(ids).logits.float()
    scale = float(ref.abs().max())
    # the same bf16 arithmetic, laid out differently: as close to each other as each is to fp32
    assert (a - b).abs().max() <= 0.02 * scale
    assert (b - ref).abs().max() <= 0.05 * scale


def test_fp32_models_are_left_as_they_are(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    assert pack_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())


@needs_packing
def test_a_packed_layer_that_disagrees_is_put_back(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir, dtype=torch.bfloat16).eval()
    monkeypatch.setattr(
        PackedLinear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features)
    )
    with pytest.raises(RuntimeError, match="disagrees with F.linear"):
        pack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.fixture(scope="module")
def bf16_server(tiny_model_dir):
    return ServeModel(str(tiny_model_dir), device="cpu", dtype="bfloat16", log=lambda *a: None)


@needs_packing
def test_bf16_server_reports_and_scores_with_the_served_model(bf16_server):
    client = TestClient(create_app(bf16_server))
    health = client.get("/health").json()
    assert health["dtype"] == "bfloat16" and health["fast_path"] and health["packed_linears"] > 0
    req = {"prompt": "Natalia sold clips to 48 of her friends", "temperature": 1e-7, "max_new_tokens": 6}
    req |= {"echo_prompt": True, "top_k_per_token": 2}
    body = client.post("/process", json=req).json()
    ids = bf16_server.tokenizer(req["prompt"])["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(bf16_server.model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):  # the prompt's echoed logprobs: the served (bf16, packed) model's own
        assert body["tokens"][i]["logprob"] == pytest.approx(lp[i - 1, ids[i]].item(), abs=2e-2)
    generated = body["tokens"][len(ids) :]
    assert len(generated) == 6 and all(t["logprob"] <= 0 for t in generated)
    assert "".join(t["text"] for t in body["tokens"]) == body["text"]


def test_bad_dtype_is_one_clear_error(capsys, tiny_model_dir):
    code = main(["serve", "--model", str(tiny_model_dir), "--dtype", "float8", "--port", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype" in err and "bfloat16" in err and "Traceback" not in err
