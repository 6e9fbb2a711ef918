"""GGUF export (`daytune export --format gguf`) checked by loading the file with llama.cpp: llama-cpp-python in the
llama.cpp venv (`make llama-venv`; .ci/run builds it) reads the metadata, tokenizes, renders the chat template and
computes logits and greedy text, which must agree with transformers on the merged model. Also: the Ollama
Modelfile's template renders the model's prompt, what cannot be converted is refused with exit 2 and nothing
written, and the GGUF loads back into daytune and serves."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHATML, ROOT, save_tiny_llama, write_tiny_recipe
from gotemplate import ollama_chat

from daytune.cli import main
from daytune.config import load_run_config
from daytune.models import load_tokenizer, resolve_model
from daytune.train.llama_cpp import VENV_ENV
from daytune.train.ollama import FAMILIES, match_chat_family, modelfile

LLAMA_VENV = Path(os.environ.get(VENV_ENV, ROOT / ".venv-llama")).absolute()
TEXTS = [
    "The capital of France is",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]


@pytest.fixture(scope="session")
def llama_venv():
    """The llama.cpp venv, or a skip; in CI (CI=true) a missing venv fails: .ci/run must have built it."""
    if not ((LLAMA_VENV / "bin" / "python").is_file() and (LLAMA_VENV / "llama.cpp").is_dir()):
        message = f"no llama.cpp venv at {LLAMA_VENV} (make llama-venv, or set ${VENV_ENV})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": .ci/run builds it, so CI must have it")
        pytest.skip(message)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VENV_ENV, str(LLAMA_VENV))
        yield LLAMA_VENV


def build_smol_tiny(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's real tokenizer and chat template (a tokenizer llama.cpp's converter
    knows, unlike conftest's 512-token BPE) and a model card naming its licence."""
    tok = load_tokenizer(resolve_model("smollm2-135m", log=lambda *a: None))
    save_tiny_llama(folder, tok, seed, initializer_range=0.1)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny test model\n", encoding="utf-8")
    return folder


def train_tiny_run(folder: Path, model_dir: Path, **train):
    """A few LoRA steps on `model_dir`: a run folder with an adapter, as a user's would be."""
    from test_train import new_run

    from daytune.pipeline import train_run

    recipe = write_tiny_recipe(folder, model_dir, train={"max_steps": 2, "lr": 1e-2, **train})
    cfg = load_run_config(recipe)
    run = new_run(cfg)
    train_run(cfg, run)
    return run


@pytest.fixture(scope="module")
def smol_tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol-tiny")
    return train_tiny_run(folder, build_smol_tiny(folder / "model"))


def export(source: list[str], out: Path, quant: str) -> Path:
    assert main(["--quiet", "export", *source, "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0
    record = json.loads((out / "export.json").read_text())
    return out / record["file"]


def llama(gguf: Path, tmp: Path, texts=TEXTS, n: int = 24, score=()) -> dict:
    """What llama.cpp makes of the file (tests/llama_check.py in the llama.cpp venv)."""
    job = {
        "gguf": str(gguf),
        "texts": list(texts),
        "n": n,
        "messages": CONVERSATIONS,
        "score": [list(s) for s in score],
        "logits_dir": str(tmp),
    }
    (tmp / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [str(LLAMA_VENV / "bin" / "python"), str(ROOT / "tests" / "llama_check.py"), str(tmp / "job.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    result["logits"] = [np.load(tmp / f"{i}.npy") for i in range(len(job["score"]))]
    return result


def merged(run_dir: Path):
    from daytune.models import load_for_inference
    from daytune.track.runs import model_source

    model, tok, _ = load_for_inference(model_source(run_dir), merge=True, log=lambda *a: None)
    return model, tok


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens (end of text not special-cased, as llama_check does), with the KV cache."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < n:
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parse_modelfile(text: str) -> dict:
    """TEMPLATE, SYSTEM (triple-quoted) and the stop parameters of a Modelfile."""
    stops = [
        line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop")
    ]
    found = {"stops": stops}
    for key in ("TEMPLATE", "SYSTEM"):
        if f'{key} """' in text:
            found[key] = text.split(f'{key} """', 1)[1].split('"""', 1)[0]
    return found


def check_metadata(meta: dict, run, tok) -> None:
    assert meta["daytune.run_id"] == run.path.name
    assert meta["general.license"] == "apache-2.0"
    assert meta["general.base_model.0.name"] and meta["daytune.base_model"]
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"


def check_chat(result: dict, tok, folder: Path) -> None:
    """The file's chat template renders what transformers renders (llama-cpp-python's Jinja formatter; llama.cpp's
    built-in ChatML renderer too, which adds no default system prompt), and so does the Modelfile's template."""
    spec = parse_modelfile((folder / "Modelfile").read_text())
    assert spec["stops"][:2] == ["<|im_start|>", "<|im_end|>"] and "TEMPLATE" in spec
    for conv, jinja, native in zip(CONVERSATIONS, result["chat_jinja"], result["chat_native"]):
        expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert jinja == expected
        assert ollama_chat(spec["TEMPLATE"], spec.get("SYSTEM"), conv) == expected
        if conv[0]["role"] == "system":
            assert native == expected


# ---- the Modelfile's template against real chat templates (no llama.cpp needed, except for its template files)


def real_templates() -> dict[str, str]:
    """Chat templates of real models: conftest's ChatML, and those llama.cpp ships in models/templates/."""
    templates = {"conftest-chatml": CHATML}
    folder = LLAMA_VENV / "llama.cpp" / "models" / "templates"
    for name in ("Qwen-Qwen2.5-7B-Instruct", "microsoft-Phi-3.5-mini-instruct", "google-gemma-2-2b-it"):
        if (folder / f"{name}.jinja").is_file():
            templates[name] = (folder / f"{name}.jinja").read_text(encoding="utf-8")
    return templates


@pytest.mark.parametrize(
    "name,family",
    [
        ("conftest-chatml", "chatml"),
        ("Qwen-Qwen2.5-7B-Instruct", "chatml"),
        ("microsoft-Phi-3.5-mini-instruct", "phi-3"),
        ("google-gemma-2-2b-it", "gemma"),
    ],
)
def test_modelfile_template_renders_the_models_prompt(name, family, tiny_model_dir):
    templates = real_templates()
    if name not in templates:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name}.jinja not found in the llama.cpp venv's models/templates")
        pytest.skip(f"{name}.jinja comes with the llama.cpp venv (make llama-venv)")
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = templates[name]
    if family == "gemma":
        tok.bos_token = "<|endoftext|>"  # gemma's template writes the BOS token the tokenizer adds by itself
        tok.add_bos_token = True
    match = match_chat_family(tok)
    assert match is not None and match.family.name == family
    spec = parse_modelfile(modelfile("m.gguf", match, [tok.eos_token]))
    assert spec["stops"][: len(match.family.stops)] == list(match.family.stops)
    if name.startswith("Qwen"):
        assert spec["SYSTEM"].startswith("You are Qwen")  # the template's default system prompt
    for conv in CONVERSATIONS:
        if conv[0]["role"] == "system" and not match.family.system:
            continue
        expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert match.bos + ollama_chat(spec["TEMPLATE"], spec.get("SYSTEM"), conv) == expected


def test_unknown_chat_format_gets_no_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert match_chat_family(tok) is None
    text = modelfile("m.gguf", None, ["</s>"])
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and 'PARAMETER stop "</s>"' in text
    assert {f.name for f in FAMILIES} == {"chatml", "phi-3", "gemma"}


# ---- refusals: exit 2, one clear line, nothing written


def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_prompt_learning_adapters_are_refused(tiny_recipe, tmp_path, capsys):
    from test_train import new_run

    from daytune.pipeline import train_run

    cfg = load_run_config(tiny_recipe(train={"method": "prompt", "max_steps": 1}))
    run = new_run(cfg)
    train_run(cfg, run)
    out = tmp_path / "gguf"
    capsys.readouterr()
    assert main(["export", str(run.path), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prompt_tuning" in err and "cannot be folded" in err and "Traceback" not in err
    assert nothing_written(out)


def test_bad_options_and_missing_llama_cpp_are_clear(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gguf"
    args = ["export", "--model", str(tiny_model_dir), "--format", "gguf", "--out", str(out)]
    assert main([*args, "--quant", "q3"]) == 2
    assert "--quant 'q3'" in capsys.readouterr().err
    assert main(["export", "--out", str(out)]) == 2 and "give a run folder" in capsys.readouterr().err
    monkeypatch.setenv(VENV_ENV, str(tmp_path / "no-venv"))
    assert main(args) == 2
    assert "make llama-venv" in capsys.readouterr().err
    assert nothing_written(out)


def test_unknown_tokenizer_and_architecture_are_refused(llama_venv, tiny_model_dir, tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    out = tmp_path / "gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not recognize this model's tokenizer" in err and "Traceback" not in err
    assert nothing_written(out)
    opt = tmp_path / "opt"
    config = OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16,
    )  # fmt: skip
    OPTForCausalLM(config).save_pretrained(opt)
    load_tokenizer(tiny_model_dir).save_pretrained(opt)
    assert main(["export", "--model", str(opt), "--format", "gguf", "--out", str(out)]) == 2
    assert "does not know the architecture OPTForCausalLM" in capsys.readouterr().err
    assert nothing_written(out)


# ---- the export, loaded by llama.cpp

# Logit error tolerated (root mean square over positions and vocabulary, relative to the logits' std): f16 weights
# change logits by a tiny fraction of their spread, q8_0 (which also rounds activations to 8 bits) by more, q4_k_m
# by most. Greedy tokens must then agree wherever the top two logits are further apart than the error at that
# position (on a random tiny model, near-ties are frequent and may go either way).
LOGIT_TOLERANCE = {"f16": 0.005, "q8_0": 0.05, "q4_k_m": 0.25}
SMOLLM2_LOGIT_TOLERANCE = {"f16": 0.005}


def agreement(model, seqs: list[list[int]], theirs: list[np.ndarray]) -> tuple[float, float, int, int]:
    """(RMS and max |logit difference| / logit std, positions whose argmax differs, of those the ones where the
    top-two margin is wider than twice that position's largest difference)."""
    sq, count, worst, differ, decided = 0.0, 0, 0.0, 0, 0
    for seq, their in zip(seqs, theirs):
        with torch.no_grad():
            ours = model(torch.tensor([seq])).logits[0].numpy()
        diff = np.abs(ours - their)
        sq += float(((diff / ours.std()) ** 2).sum())
        count += diff.size
        worst = max(worst, float(diff.max() / ours.std()))
        top2 = np.sort(ours, axis=-1)[:, -2:]
        flips = ours.argmax(-1) != their.argmax(-1)
        differ += int(flips.sum())
        decided += int((flips & (top2[:, 1] - top2[:, 0] > 2 * diff.max(axis=-1))).sum())
    return (sq / count) ** 0.5, worst, differ, decided


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_tiny_run_export_loads_in_llama_cpp_and_agrees(llama_venv, smol_tiny_run, tmp_path, quant):
    run = smol_tiny_run
    gguf = export([str(run.path)], tmp_path / "out", quant)
    model, tok = merged(run.path)
    ids = [tok(t).input_ids for t in TEXTS]
    seqs = [i + hf_greedy(model, i, 8) for i in ids]
    result = llama(gguf, tmp_path, n=8, score=seqs)
    check_metadata(result["metadata"], run, tok)
    assert result["metadata"]["daytune.quant"] == quant
    assert result["tokens"] == ids  # llama.cpp tokenizes as transformers does, special tokens included
    check_chat(result, tok, gguf.parent)
    rms, worst, differ, decided = agreement(model, seqs, result["logits"])
    print(f"{quant}: {gguf.stat().st_size} bytes, load {result['load_seconds']:.2f}s, logit error rms {rms:.4f} "
          f"max {worst:.4f}, argmax differs at {differ}/{sum(map(len, seqs))} positions ({decided} with a clear "
          "margin)")  # fmt: skip
    assert rms < LOGIT_TOLERANCE[quant] and decided == 0
    readme = (gguf.parent / "README.md").read_text()
    assert f"ollama create {gguf.stem.lower()} -f Modelfile" in readme and run.path.name in readme


def serve_gguf(gguf: Path, home: Path, monkeypatch):
    """`daytune serve --model file.gguf`, in process: the file goes through daytune's GGUF loading."""
    from fastapi.testclient import TestClient

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel

    monkeypatch.setenv("DAYTUNE_HOME", str(home))  # a fresh conversion cache: the file is really read
    server = ServeModel(str(gguf), device="cpu", log=lambda *a: None)
    return TestClient(create_app(server))


def check_round_trip(client, model, tok, mean: float, worst: float) -> list[float]:
    """The served model tokenizes as the merged model does and gives the same log-probabilities, within what
    the file's rounding of the weights changes (mean and largest absolute difference, in nats)."""
    diffs = []
    for text in TEXTS:
        ids = tok(text).input_ids
        assert client.post("/tokenize", json={"text": text}).json()["tokens"] == ids
        body = {"prompt": text, "max_new_tokens": 0, "echo_prompt": True, "temperature": 0}
        served = [t["logprob"] for t in client.post("/process", json=body).json()["tokens"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        ours = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert len(served) == len(ids)
        diffs += np.abs(np.array(served[1:]) - ours.numpy()).tolist()
    print(f"round trip: log-probability differences mean {np.mean(diffs):.4f} max {max(diffs):.4f}")
    assert np.mean(diffs) < mean and max(diffs) < worst
    greedy = client.post("/process", json={"prompt": TEXTS[0], "max_new_tokens": 4, "temperature": 0}).json()
    assert greedy["completions"][0]["finish_reason"] in ("length", "endoftext") and greedy["tokens"]
    return diffs


def test_tiny_gguf_loads_back_into_daytune_and_serves(llama_venv, smol_tiny_run, tmp_path, monkeypatch):
    gguf = export(["--model", str(smol_tiny_run.path.parent.parent / "model"), "--adapter",
                   str(smol_tiny_run.trained)], tmp_path / "out", "f16")  # fmt: skip
    assert gguf.name == "model-adapter-f16.gguf"  # no run: named after the base and the adapter folder
    model, tok = merged(smol_tiny_run.path)
    check_round_trip(serve_gguf(gguf, tmp_path / "home", monkeypatch), model, tok, mean=5e-4, worst=2e-3)


@pytest.mark.slow
def test_smollm2_run_exports_to_gguf_with_the_same_greedy_text(llama_venv, tmp_path):
    """SmolLM2-135M with a LoRA adapter, exported in f16: llama.cpp's greedy text equals transformers' on the
    merged model (all 24 tokens of each prompt; the argmax differs only at near-ties). Serving an export back in
    daytune is the tiny model's test; a SmolLM2 GGUF loading back is what every SmolLM2 test does with the
    embedded Q4_1 file."""
    run = train_tiny_run(tmp_path, "smollm2-135m", micro_batch=2, lr=1e-3)
    model, tok = merged(run.path)
    ids = [tok(t).input_ids for t in TEXTS]
    expected = [hf_greedy(model, i, 24) for i in ids]
    for quant, agree in (("f16", 24),):  # q8_0/q4_k_m: the tiny model's tests, and benchmarks/gguf_export.py
        gguf = export([str(run.path)], tmp_path / quant, quant)
        seqs = [i + e for i, e in zip(ids, expected)]
        result = llama(gguf, tmp_path, n=24, score=seqs)
        check_metadata(result["metadata"], run, tok)
        repo = result["metadata"]["general.base_model.0.repo_url"]
        assert repo == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
        assert result["tokens"] == ids
        check_chat(result, tok, gguf.parent)
        spec = parse_modelfile((gguf.parent / "Modelfile").read_text())
        assert spec["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")
        runs = [first_divergence(ours, theirs) for ours, theirs in zip(expected, result["greedy"])]
        size, load = gguf.stat().st_size, result["load_seconds"]
        rms, worst, differ, decided = agreement(model, seqs, result["logits"])
        print(
            f"{quant}: {size} bytes, load {load:.2f}s, greedy tokens agreeing {runs}, logit error rms {rms:.4f}"
        )
        assert min(runs) >= agree and rms < SMOLLM2_LOGIT_TOLERANCE[quant] and decided == 0
