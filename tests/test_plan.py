"""The planner: registry numbers, the memory model against what autograd really saves, plans for every model x
method x device, `daytune plan`, and `train.micro_batch: auto` (probe, accumulation, summary, plan.json)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from daytune.cli import main
from daytune.config import METHODS, TrainConfig, load_run_config
from daytune.errors import ConfigError
from daytune.hardware import GPUS, cpu_device
from daytune.models.arch import arch_from_config
from daytune.models.registry import MODELS, loadable_model, model_with_hub_id, named_model
from daytune.plan.memory import Setup, activation_bytes, breakdown
from daytune.plan.models import resolve_arch
from daytune.plan.search import make_plan, max_micro_batch
from daytune.plan.throughput import efficiency, flops_per_token
from daytune.train.probe import Try, largest_that_fits, probe_micro_batch, worst_batches
from daytune.units import parse_size

V = 512


# ---- registry -----------------------------------------------------------------------------------------------
def test_registry_reproduces_the_published_parameter_counts():
    for name, model in MODELS.items():
        arch = model.arch
        assert arch.name == name and arch.total_params() == arch.published_params, name
        assert arch.source.startswith("https://huggingface.co/") and arch.source.endswith("/config.json")
    allowed = {m.name.split("-")[0] for m in MODELS.values() if m.arch.challenge}
    assert {"llama", "mistral", "qwen", "falcon", "phi", "open", "pythia"} <= allowed


def test_one_table_names_models_for_loading_and_planning():
    """Every name that loads or plans is a row of the one registry: the loader takes exact loadable names, the
    planner any row's name, alias or hub id."""
    assert loadable_model("smollm2-135m") is MODELS["smollm2-135m"] and loadable_model("llama-2-7b") is None
    assert named_model("Llama2-7B") is MODELS["llama-2-7b"] and named_model("phi2") is MODELS["phi-2"]
    assert model_with_hub_id("mistralai/mistral-7b-v0.1") is MODELS["mistral-7b"]
    assert resolve_arch("smollm2-135m") is MODELS["smollm2-135m"].arch


def test_list_models_gives_one_row_per_registered_model():
    from daytune.models import list_models

    rows = list_models()
    assert [r.name for r in rows] == list(MODELS)
    row = next(r for r in rows if r.name == "smollm2-135m")
    assert row.loadable and row.params == 134_515_008 and row.family == "llama"
    assert "loads by name" in row.line()


def _hf_config(arch):
    common = dict(hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                  vocab_size=arch.vocab)  # fmt: skip
    if arch.family == "llama":
        return transformers.MistralConfig(
            **common, intermediate_size=arch.intermediate, num_key_value_heads=arch.kv_heads,
            tie_word_embeddings=arch.tied,
        )  # fmt: skip
    if arch.family == "falcon":
        return transformers.FalconConfig(**common, multi_query=True, parallel_attn=True, bias=False,
                                         new_decoder_architecture=False)  # fmt: skip
    if arch.family == "phi":
        return transformers.PhiConfig(
            **common, intermediate_size=arch.intermediate, partial_rotary_factor=0.4
        )
    return transformers.GPTNeoXConfig(**common, intermediate_size=arch.intermediate, rotary_pct=0.25,
                                      tie_word_embeddings=False)  # fmt: skip


@pytest.mark.parametrize("name", ["mistral-7b", "falcon-7b", "phi-2", "pythia-410m", "smollm2-135m"])
def test_registry_numbers_build_the_same_model(name):
    """The registry's numbers, given to transformers, build a model of exactly that size (on the meta device),
    and reading that model's config back gives the same architecture."""
    arch = MODELS[name].arch
    config = _hf_config(arch)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == arch.total_params()
    back = arch_from_config(config.to_dict(), name)
    assert (back.family, back.kv_heads, back.intermediate, back.tied) == (
        arch.family, arch.kv_heads, arch.intermediate, arch.tied)  # fmt: skip
    assert back.rotary_fraction == pytest.approx(arch.rotary_fraction)


def test_resolve_arch_reads_a_folder_without_weights(tmp_path, tiny_model_dir):
    # a registered hub id: no fetch
    assert resolve_arch("meta-llama/Llama-2-7b-hf") is MODELS["llama-2-7b"].arch
    arch = resolve_arch(str(tiny_model_dir))
    assert (arch.hidden, arch.layers, arch.kv_heads, arch.tied) == (64, 2, 2, True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(Exception, match="cannot plan model_type 'bert'"):
        resolve_arch(str(tmp_path))


# ---- the memory model against autograd ------------------------------------------------------------------------
def saved_bytes(loss, params) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen, total, stack, visited = set(), 0, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(fn, attr)
                except Exception:
                    continue
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        ptr = t.untyped_storage().data_ptr()
                        if ptr not in skip and ptr not in seen:
                            seen.add(ptr)
                            total += t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return total


FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True)),
    "neox": (transformers.GPTNeoXConfig, dict(intermediate_size=256, rotary_pct=0.25)),
    "falcon": (transformers.FalconConfig, dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                               bias=False)),
    "phi": (transformers.PhiConfig, dict(intermediate_size=256, partial_rotary_factor=0.4)),
}  # fmt: skip
CASES = [  # family, method, dtype, lora dropout, batch (packed | padded | single), lora targets
    ("llama", "lora", torch.float32, 0.05, "packed", "attention"),
    ("llama", "lora", torch.bfloat16, 0.05, "padded", "attention"),
    ("llama", "lora", torch.float32, 0.0, "single", "all-linear"),
    ("llama", "dora", torch.float32, 0.05, "packed", "attention"),
    ("llama", "full", torch.bfloat16, 0.0, "packed", "attention"),
    ("llama", "freeze", torch.float32, 0.0, "packed", "attention"),
    ("llama", "ia3", torch.float32, 0.0, "packed", "attention"),
    ("llama", "prompt", torch.float32, 0.0, "padded", "attention"),
    ("neox", "full", torch.float32, 0.0, "packed", "attention"),
    ("neox", "lora", torch.float32, 0.0, "single", "all-linear"),
    ("falcon", "lora", torch.float32, 0.0, "single", "all-linear"),
    ("falcon", "full", torch.float32, 0.0, "packed", "attention"),
    ("phi", "full", torch.bfloat16, 0.0, "single", "attention"),
    ("phi", "freeze", torch.float32, 0.0, "packed", "attention"),
]


@pytest.mark.parametrize("family,method,dtype,dropout,batching,targets", CASES)
def test_activation_model_matches_what_autograd_saves(family, method, dtype, dropout, batching, targets):
    """The per-operation accounting equals, within 1 %, the bytes autograd keeps after a real forward through
    daytune's loss (HF model code, PEFT wrappers, labels-only output layer) on a 3-block model."""
    from daytune.engine.loss import response_loss
    from daytune.train import methods

    cls, extra = FAMILIES[family]
    config = cls(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=V, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    tc = TrainConfig(method=method)
    tc.lora.dropout, tc.lora.targets = dropout, targets
    model = methods.prepare_for_training(model, tc, None)
    model.train()
    rows, seq = (1, 48) if batching == "single" else (2, 48)
    ids = torch.randint(0, V, (rows, seq))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if batching == "packed":
        batch["attention_mask"] = (
            torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(rows, 1, seq, seq)
        )
        batch["position_ids"] = torch.arange(seq)[None].expand(rows, seq)
    elif batching == "padded":
        batch["attention_mask"] = torch.ones(rows, seq, dtype=torch.long)
        batch["attention_mask"][-1, -3:] = 0
    loss, _ = response_loss(model, batch)
    got = saved_bytes(loss, list(model.parameters()))
    setup = Setup(method=method, precision="32-true" if dtype == torch.float32 else "bf16-true", seq_len=seq,
                  micro_batch=rows, lora_dropout=dropout, lora_targets=targets, packing=batching == "packed",
                  device_type="cpu")  # fmt: skip
    d = activation_bytes(arch_from_config(config.to_dict(), family), setup)
    assert d["blocks"] + d["model"] + d["loss"] == pytest.approx(got, rel=0.01)


# ---- plans ------------------------------------------------------------------------------------------------------
def test_daytune_plan_answers_for_every_registered_model_method_and_device(capsys):
    """`daytune plan ... --json` for all registry x methods x devices: a consistent, complete plan each time."""
    from daytune.cli import _parser
    from daytune.cli.plan import cmd_plan
    from daytune.progress import Reporter

    parser = _parser()  # built once: building it is most of a call's time
    memory = {name: d.memory for name, d in GPUS.items()} | {"cpu": cpu_device().memory}
    for name, model in MODELS.items():
        arch = model.arch
        for method in METHODS:
            for device in memory:
                argv = ["plan", "--model", name, "--method", method, "--seq-len", "1024", "--micro-batch", "auto",
                        "--gpu", device, "--budget", "24h", "--precision", "bf16-true", "--json"]  # fmt: skip
                assert cmd_plan(parser.parse_args(argv), Reporter(quiet=True)) == 0, (name, method, device)
                d = json.loads(capsys.readouterr().out)
                where = (name, method, device)
                m = d["memory"]
                assert d["model"]["params"] == arch.total_params() and d["setup"]["method"] == method, where
                assert m["peak"] > m["weights_total"] > 0 and m["trainable_params"] > 0, where
                assert m["fits"] == (m["peak"] <= memory[device]), where
                limits = d["max_micro_batch"]
                assert limits["with_checkpointing"] >= limits["without_checkpointing"], where
                assert d["speed"]["tokens_per_s"] > 0 and d["budget"]["tokens"] > 0, where
                assert d["tokens_per_s"] > 0, where  # what the utilization doctor compares a run with
                assert d["peak_memory_mb"] == pytest.approx(m["peak"] / 2**20, abs=0.1), where
                if m["fits"]:
                    assert d["fastest"] is not None and d["fastest"]["peak"] <= memory[device], where
                else:
                    assert any("does not fit" in n for n in d["notes"]), where


def test_plan_table_names_every_part(capsys):
    argv = ["plan", "--model", "mistral-7b", "--method", "lora", "--seq-len", "2048", "--micro-batch", "auto",
            "--gpu", "a100-40gb", "--budget", "24h"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in ("weights: bf16", "trainable parameters", "gradients", "optimizer states", "without checkpointing",
                 "with checkpointing", "logits / loss buffers", "framework overhead", "peak", "fits",
                 "largest micro-batch", "predicted tokens/s", "within the budget", "fastest setup"):  # fmt: skip
        assert part in out, part
    assert max(len(line) for line in out.splitlines() if line.startswith("│")) <= 100


@pytest.mark.parametrize(
    "gpu,gib,name,bf16",
    [
        ("NVIDIA GeForce RTX 4090", 23.99, "rtx4090-24gb", 165.2e12),
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb", 312e12),
        ("NVIDIA A100-SXM4-80GB", 79.2, "NVIDIA A100-SXM4-80GB", 312e12),  # not the 40 GB card
        ("NVIDIA H100 PCIe", 79.6, "h100-80gb", 756e12),  # the PCIe card's lower peak
        ("NVIDIA L40S", 44.4, "NVIDIA L40S", 362e12),
        ("Some Future GPU", 96.0, "Some Future GPU", None),  # no datasheet: memory only, no speed
    ],
)
def test_a_training_run_detects_its_gpu(monkeypatch, gpu, gib, name, bf16):
    from types import SimpleNamespace

    from daytune.hardware import detect

    props = SimpleNamespace(name=gpu, total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    d = detect(torch.device("cuda"))
    assert (d.name, d.kind, d.memory, d.peak.get("bf16")) == (name, "cuda", props.total_memory, bf16)
    speed = make_plan(MODELS["llama-2-7b"].arch, Setup(method="qlora", gradient_checkpointing=True), d).speed
    assert (speed.tokens_per_s is None) == (bf16 is None)


def test_memory_responds_to_the_recipe():
    arch = MODELS["llama-2-7b"].arch
    base = Setup(method="lora", seq_len=2048, micro_batch=2, precision="bf16-true")
    b = breakdown(arch, base)
    assert b.activations_checkpointing < b.activations_no_checkpointing / 4
    assert breakdown(arch, replace(base, micro_batch=4)).peak > b.peak
    q = breakdown(arch, replace(base, method="qlora"))
    assert q.weights_total < b.weights_total / 2.5  # 4-bit blocks
    full = breakdown(arch, replace(base, method="full"))
    assert full.optimizer_states == pytest.approx(2 * 2 * arch.total_params())  # AdamW moments, bf16 params
    eight = breakdown(arch, replace(base, method="full", optimizer="adamw_8bit"))
    assert eight.optimizer_states < full.optimizer_states / 1.9
    # the output layer never holds (positions x vocabulary) logits: past one 1024-position chunk, only the
    # selected hidden states grow with the batch
    mid = breakdown(arch, replace(base, micro_batch=4, label_fraction=1.0))
    long = breakdown(arch, replace(base, micro_batch=8, label_fraction=1.0))
    assert long.logits_loss - mid.logits_loss == pytest.approx(4 * 2047 * arch.hidden * 2, rel=0.01)


def test_largest_micro_batch_is_the_edge():
    arch, device = MODELS["mistral-7b"].arch, GPUS["rtx4090-24gb"]
    setup = Setup(method="qlora", seq_len=1024, gradient_checkpointing=True, precision="bf16-true")
    n = max_micro_batch(arch, setup, device)
    assert n >= 1
    assert breakdown(arch, replace(setup, micro_batch=n)).peak <= device.memory
    assert breakdown(arch, replace(setup, micro_batch=n + 1)).peak > device.memory


def test_speed_rests_on_measured_runs():
    arch = MODELS["llama-2-7b"].arch
    lora = Setup(method="lora", seq_len=2048, precision="bf16-true")
    eff, sources = efficiency("cuda", "lora")
    assert 0 < eff <= 1 and any("torchtune" in s for s in sources)
    assert flops_per_token(arch, replace(lora, gradient_checkpointing=True)) > flops_per_token(arch, lora)
    assert flops_per_token(arch, replace(lora, method="full")) > flops_per_token(arch, lora)


# ---- the command ---------------------------------------------------------------------------------------------------
def test_plan_command_prints_json(capsys):
    argv = ["plan", "--model", "llama-2-7b", "--method", "qlora", "--seq-len", "2048", "--micro-batch", "auto",
            "--gpu", "rtx4090-24gb", "--budget", "24h", "--json"]  # fmt: skip
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["setup"]["method"] == "qlora" and plan["device"]["name"] == "rtx4090-24gb"
    assert plan["memory"]["fits"] and plan["setup"]["micro_batch"] >= 1
    assert {"weights", "gradients", "optimizer_states", "activations_no_checkpointing",
            "activations_checkpointing", "logits_loss", "framework"} <= set(plan["memory"])  # fmt: skip
    assert plan["budget"]["seconds"] == 86400 and plan["speed"]["tokens_per_s"] > 0


def test_plan_command_with_data_and_a_local_model(capsys, tiny_model_dir, tmp_path):
    from conftest import EXAMPLES

    argv = ["plan", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "data" / "gsm8k_train.jsonl"),
            "--seq-len", "256", "--packing", "--gpu", "cpu", "--budget", "1h", "--json"]  # fmt: skip
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 300 < plan["data"]["examples"] <= 400 and plan["data"]["tokenizer"] == str(tiny_model_dir)
    assert 0 < plan["setup"]["label_fraction"] < 1
    assert plan["budget"]["epochs"] > 0
    # a recipe brings its own data, sequence length and micro-batch
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": str(tiny_model_dir), "data": {
        "train": str(EXAMPLES / "data" / "gsm8k_train.jsonl"), "max_seq_len": 128}, "train": {"micro_batch": 2}}))  # fmt: skip
    assert main(["plan", "--recipe", str(recipe), "--gpu", "a100-40gb", "--json"]) == 0
    from_recipe = json.loads(capsys.readouterr().out)
    assert from_recipe["data"]["path"] == plan["data"]["path"] and from_recipe["data"]["longest_row"] <= 128
    assert (from_recipe["setup"]["seq_len"], from_recipe["setup"]["micro_batch"]) == (128, 2)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["--model", "llama-2-7b", "--gpu", "tpu"], "unknown device"),
        (["--model", "llama-2-7b", "--micro-batch", "lots"], "--micro-batch"),
        (["--model", "llama-2-7b", "--lora-targets", "wq"], "'wq' is not a linear layer"),
        (["--model", "llama-2-7b", "--method", "sgd"], "train.method"),
    ],
)
def test_plan_command_errors_are_one_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---- micro_batch: auto -------------------------------------------------------------------------------------------
def test_search_finds_the_edge_with_few_tries():
    for cap in (1, 5, 16, 17, 100):
        for edge in (0, 1, 3, 8, 16, 50):
            best, tries = largest_that_fits(lambda n, e=edge: Try(n, n <= e, float(n)), cap)
            assert best == min(edge, cap), (cap, edge)
            assert len(tries) <= 2 * cap.bit_length() + 1


def test_micro_batch_auto_config(tmp_path):
    def load(**train):
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps({"train": train}))
        return load_run_config(path)

    assert load(micro_batch="auto", batch_size=16).train.micro_batch == "auto"
    with pytest.raises(ConfigError, match="auto needs train.batch_size"):
        load(micro_batch="auto")
    with pytest.raises(ConfigError, match="expected an integer or 'auto'"):
        load(micro_batch="max")
    with pytest.raises(ConfigError, match="leave train.grad_accum at 1"):
        load(micro_batch=4, batch_size=16, grad_accum=2)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch"):
        load(micro_batch=3, batch_size=16)
    with pytest.raises(ConfigError, match="train.memory_limit"):
        load(micro_batch="auto", batch_size=8, memory_limit="lots")
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("800MB") == 800_000_000


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peaks")
def test_micro_batch_auto_probes_then_trains_like_the_fixed_choice():
    """Run the test below in a fresh process: on CPU the probe reads the process's peak resident memory, and the heap
    that earlier tests freed (but the allocator kept) would absorb the tries' growth."""
    import subprocess
    import sys

    body = f"{__file__}::test_micro_batch_auto_in_a_fresh_process"
    env = {**os.environ, "DAYTUNE_FRESH_PROCESS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", body],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.skipif(
    os.environ.get("DAYTUNE_FRESH_PROCESS") != "1",
    reason="runs in its own process (the test above)",
)
def test_micro_batch_auto_in_a_fresh_process(tiny_recipe, tiny_model_dir, monkeypatch):
    """Real forward/backward tries measure peaks that grow with the micro-batch; against train.memory_limit the
    search picks the largest size that fits; accumulation keeps the batch; the probe leaves nothing behind:
    training afterwards equals a run with that micro-batch set by hand."""
    from test_train import new_run

    import daytune.train.probe as probe_module
    from daytune.data import encode_records, read_instructions
    from daytune.data.batching import BatchPlan
    from daytune.models import load_model, load_tokenizer
    from daytune.pipeline import train_run
    from daytune.train.memory import return_freed_memory
    from daytune.train.methods import prepare_for_training

    def recipe(**train_fields):
        fields = {"micro_batch": "auto", "batch_size": 8, "max_steps": 1, "precision": "32-true",
                  "checkpoint_every": 100, "lora": {"dropout": 0.1}, **train_fields}  # fmt: skip
        return load_run_config(
            tiny_recipe(data={"max_rows": 32, "max_seq_len": 256, "packing": True}, train=fields)
        )

    return_freed_memory()  # what training does first: freed activations go back to the OS
    # 1) what each size costs, probed with no ceiling: the machine has room for all 8 rows
    cfg = recipe()
    tokenizer = load_tokenizer(tiny_model_dir)
    examples, _ = encode_records(read_instructions(cfg.data.train, 32), tokenizer, "chat", 256, None)
    rows = BatchPlan([len(e.input_ids) for e in examples], 1, 0, 256, packing=True)
    model = prepare_for_training(load_model(tiny_model_dir), cfg.train, tiny_model_dir)
    make = worst_batches(rows, examples, tokenizer.pad_token_id, torch.device("cpu"))
    best, _, tries = probe_micro_batch(model, make, 8, torch.device("cpu"), 0, None, lambda *a: None)
    peaks = {t.micro_batch: t.peak_mb for t in tries}
    assert best == 8 and peaks[8] > peaks[1]
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    del model

    # 2) the search against a ceiling inside that growth. The real peaks are resident memory, file-backed pages
    # included, which the kernel evicts and faults back as other processes need memory: a ceiling a few MiB
    # above what this process holds would decide by the machine's load. So the tries here report a memory model
    # (100 MiB + 10 MiB a row) and the ceiling sits at 4.5 rows: 1, 2, 4 fit, 8 does not, bisection: 6, 5.
    class ModelledPeak:
        rows = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.peak = 100.0 + 10.0 * ModelledPeak.rows

    real_worst_batches = probe_module.worst_batches

    def counted_worst_batches(*args, **kwargs):
        make = real_worst_batches(*args, **kwargs)

        def make_rows(n):
            ModelledPeak.rows = n
            return make(n)

        return make_rows

    monkeypatch.setattr(probe_module, "_CpuPeak", ModelledPeak)
    monkeypatch.setattr(probe_module, "worst_batches", counted_worst_batches)
    cfg = recipe(memory_limit=str(145 * 2**20))
    # with its config.yaml, as `daytune train` writes it: the doctor reads it
    auto = train_run(cfg, new_run(cfg))
    monkeypatch.undo()
    probe = auto.micro_batch_probe
    assert auto.micro_batch == 4 and auto.grad_accum == 2 and probe["limit_mb"] == 145.0
    assert [(t["micro_batch"], t["fits"]) for t in probe["tries"]] == [
        (1, True), (2, True), (4, True), (8, False), (6, False), (5, False)
    ]  # fmt: skip
    summary = json.loads((Path(auto.run_dir) / "summary.json").read_text())
    assert summary["train"]["micro_batch"] == auto.micro_batch
    assert (
        summary["train"]["grad_accum"] == auto.grad_accum and summary["train"]["micro_batch_probe"]["tries"]
    )
    planned = json.loads((Path(auto.run_dir) / "plan.json").read_text())
    assert planned["setup"]["micro_batch"] == auto.micro_batch and planned["memory"]["peak"] > 0
    # the utilization doctor compares the run with the planner's prediction
    doctor = json.loads((Path(auto.run_dir) / "doctor.json").read_text())["findings"]
    (found,) = [f for f in doctor if f["check"] == "planner"]
    assert f"{planned['tokens_per_s']:.0f} predicted by the plan" in found["summary"]
    assert f"{planned['peak_memory_mb']:.0f} MB predicted" in found["summary"]
    # 3) the same micro-batch set by hand trains identically (the probe restored the random state)
    fixed = recipe(micro_batch=auto.micro_batch)
    by_hand = train_run(fixed, new_run(fixed))
    assert by_hand.micro_batch_probe is None and by_hand.grad_accum == auto.grad_accum
    assert by_hand.final_loss == pytest.approx(auto.final_loss, rel=1e-6)


def test_planned_precision_follows_the_training_rule():
    """`daytune plan` and a training run pick `auto` precision by one rule (daytune.hardware)."""
    from daytune.hardware import GPUS, Device, auto_precision, planned_precision

    assert planned_precision("auto", GPUS["a100-40gb"]) == "bf16-true" == auto_precision("cuda", True)
    old_gpu = Device("v100-like", "cuda", 16 * 2**30, peak={"fp16": 125e12, "fp32": 15.7e12})
    assert planned_precision("auto", old_gpu) == "16-mixed" == auto_precision("cuda", False)
    slow_bf16 = Device("cpu", "cpu", 2**34, peak={"fp32": 1e11, "bf16": 3e9})
    fast_bf16 = Device("cpu", "cpu", 2**34, peak={"fp32": 1e11, "bf16": 2e11})
    assert (
        planned_precision("auto", slow_bf16) == "32-true"
        and planned_precision("auto", fast_bf16) == "bf16-true"
    )
    with pytest.raises(ConfigError, match="--precision: 16-mixed needs a GPU"):
        planned_precision("16-mixed", slow_bf16)
