"""The CUDA paths, proven on CPUs: device and dtype choices with CUDA mocked at the boundary (torch.cuda,
from_pretrained), the shipped GPU recipes against the planner, the Makefile's PyTorch stamp with a fake venv, QLoRA
in bf16 and merged into its NF4 weights, packed rows on the variable-length attention path, accelerate's
accumulation boundary (what DeepSpeed steps on), the micro-batch probe, NVML behind CUDA_VISIBLE_DEVICES with a
fake NVML, and FSDP2 (DTensor parameters over gloo). benchmarks/gpu_check.sh checks the same on a real GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import EXAMPLES, ROOT
from safetensors.torch import load_file
from test_train import new_run

from daytune import hardware
from daytune.cli import main
from daytune.config import load_run_config
from daytune.errors import ConfigError
from daytune.pipeline import train_run

IDS = torch.tensor([[5, 77, 123, 9, 300, 41, 8, 17]])


@pytest.fixture
def cuda(monkeypatch):
    """torch.cuda as a machine with two Ampere GPUs would answer (only the calls daytune makes before it puts a
    tensor on a GPU)."""
    state = {"current": 0, "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])

    def set_device(d):
        state["current"] = torch.device(d).index
        state["set"].append(state["current"])

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, "fp32_precision", None), matmul.allow_tf32
    yield state
    if saved[0] is not None:
        matmul.fp32_precision = saved[0]
    matmul.allow_tf32 = saved[1]


# ---- 1. the shipped GPU recipes fit the GPU they name --------------------------------------------------------
GPU_OF = {"a100-40gb": "a100-40gb", "rtx4090": "rtx4090-24gb", "h100": "h100-80gb"}


def gpu_recipes():
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        gpus = [gpu for marker, gpu in GPU_OF.items() if marker in path.stem]
        if gpus:
            found.append((path.name, gpus[0]))
    return found


def test_every_gpu_recipe_is_checked():
    names = [name for name, _ in gpu_recipes()]
    assert {"llama2-7b-qlora-a100-40gb.yaml", "llama2-7b-qlora-rtx4090.yaml"} <= set(names)
    # a recipe that names a GPU in any other spelling would escape the test below
    for path in EXAMPLES.glob("*.yaml"):
        if re.search(r"a100|4090|h100|a10g|l4|3090", path.stem):
            assert path.name in names, f"{path.name}: add its GPU to GPU_OF"


@pytest.mark.parametrize("recipe,gpu", gpu_recipes())
def test_shipped_gpu_recipes_fit_their_gpu(recipe, gpu, capsys):
    """`daytune plan` on the recipe, for the GPU its name says, predicts a peak that fits with room to spare
    (the planner under-predicts QLoRA by up to 15 %: README)."""
    assert main(["plan", "--recipe", str(EXAMPLES / recipe), "--gpu", gpu, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["memory"]["fits"], f"{recipe}: predicted peak {plan['memory']['peak'] / 1e9:.1f} GB on {gpu}"
    assert plan["memory"]["peak"] * 1.15 < plan["memory"]["capacity"]
    assert plan["setup"]["micro_batch"] >= 1


# ---- 2, 4. eval and serve load in bf16 straight onto the GPU; QLoRA merges into its NF4 weights -----------------
class _Loaded:
    """What from_pretrained returns here: the calls load_for_inference makes on a model it loaded."""

    generation_config = SimpleNamespace(eos_token_id=2)
    config = SimpleNamespace(max_position_embeddings=512)

    def to(self, *args, **kwargs):
        self.moved = args
        return self

    def eval(self):
        return self


def _record_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []

    def fake(path, **kwargs):
        calls.append(kwargs)
        return _Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def test_inference_loads_bf16_straight_onto_the_gpu(cuda, monkeypatch, tiny_model_dir):
    from daytune.eval.lm import LocalLM
    from daytune.models import ModelSource, load_for_inference

    calls = _record_from_pretrained(monkeypatch)
    load_for_inference(ModelSource(str(tiny_model_dir)), "cuda:1")
    assert calls[-1]["dtype"] == torch.bfloat16 and calls[-1]["device_map"] == {"": "cuda:1"}
    LocalLM.load(str(tiny_model_dir), log=lambda *a: None)  # eval's default device: the GPU
    assert calls[-1]["dtype"] == torch.bfloat16 and calls[-1]["device_map"] == {"": "cuda"}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    load_for_inference(ModelSource(str(tiny_model_dir)), "cuda")  # a T4: bf16 only emulated
    assert calls[-1]["dtype"] == torch.float16
    load_for_inference(ModelSource(str(tiny_model_dir)), "cpu")
    assert calls[-1]["dtype"] == torch.float32 and "device_map" not in calls[-1]


def test_serve_loads_bf16_straight_onto_the_gpu(cuda, monkeypatch, tiny_model_dir):
    from daytune.serve.model import ServeModel

    calls = _record_from_pretrained(monkeypatch)
    server = ServeModel(str(tiny_model_dir), device="cuda", log=lambda *a: None)
    assert str(server.device) == "cuda"
    assert calls == [{"dtype": torch.bfloat16, "trust_remote_code": False, "device_map": {"": "cuda"}}]


def test_run_evaluates_on_the_training_device(cuda, monkeypatch, tiny_recipe):
    """`daytune run`'s evaluation: on train.device, in that device's inference dtype."""
    import daytune.models as models
    from daytune.pipeline import evaluate_pair

    seen = []
    real = models.load_for_inference

    def recording(source, device="cpu", **kwargs):
        seen.append((str(device), hardware.inference_dtype(torch.device(device))))
        return real(source, "cpu", **kwargs)  # the model itself runs here, on the CPU

    monkeypatch.setattr(models, "load_for_inference", recording)
    cfg = load_run_config(tiny_recipe(train={"device": "cuda:1"}, eval={"heldout_rows": 2}))
    cfg.eval.multiple_choice = None
    evaluate_pair(cfg, cfg.model, None, SimpleNamespace(log=lambda *a: None))
    assert seen == [("cuda:1", torch.bfloat16)]


def test_export_keeps_the_dtype_the_weights_came_in(tiny_recipe, tiny_model_dir, tmp_path):
    """`daytune export --merge` writes the base's own dtype by default, not fp32 (a 7B model: 13 GB, not 27)."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    for f in tiny_model_dir.iterdir():  # the tokenizer
        if f.is_file() and not (base / f.name).exists():
            (base / f.name).write_bytes(f.read_bytes())
    cfg = load_run_config(tiny_recipe(model=str(base), train={"max_steps": 1}))
    run = new_run(cfg)
    train_run(cfg, run)
    assert main(["--quiet", "export", str(run.path), "--merge", "--out", str(tmp_path / "m")]) == 0
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def test_qlora_adapter_merges_into_its_nf4_weights(tiny_recipe, tiny_model_dir, tmp_path):
    """A QLoRA adapter learned its update on top of the NF4 weights: export, serve and eval fold it into those
    (dequantized), which gives the trained model's outputs; the full-precision base would not."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from daytune.models import ModelSource, load_for_inference, load_model
    from daytune.models.trained import QUANT_FILE, load_base_for_training

    cfg = load_run_config(tiny_recipe(train={"method": "qlora", "max_steps": 3, "lr": 1e-2}))
    run = new_run(cfg)
    train_run(cfg, run)
    note = json.loads((run.adapter / QUANT_FILE).read_text())
    assert note == {"method": "qlora", "quant_type": "nf4", "double_quant": True, "load_dtype": "float32"}
    trained = PeftModel.from_pretrained(
        load_base_for_training(tiny_model_dir, cfg.train, torch.float32, torch.device("cpu")),
        str(run.adapter),
    )
    expected = _logits(trained)  # the 4-bit base with the adapter, as training computed
    on_full_precision = _logits(
        PeftModel.from_pretrained(load_model(tiny_model_dir), str(run.adapter)).merge_and_unload()
    )
    assert main(["--quiet", "export", str(run.path), "--merge", "--out", str(tmp_path / "merged")]) == 0
    # bitsandbytes' CPU 4-bit matmul itself rounds (~1e-3 here); the NF4 quantization error is ~100x that
    quantization = (on_full_precision - expected).abs().max()
    merged = _logits(load_model(tmp_path / "merged"))
    assert (merged - expected).abs().max() < min(1e-2, quantization / 20)
    # serve and eval of the bare adapter folder (no run around it: a submission image) find its quantization.json
    served, _, _ = load_for_inference(ModelSource(str(tiny_model_dir), run.adapter), "cpu", merge=True)
    evaluated, _, _ = load_for_inference(ModelSource(str(tiny_model_dir), run.adapter), "cpu")
    assert torch.allclose(_logits(served), merged, atol=1e-5)
    assert torch.allclose(_logits(evaluated), merged, atol=1e-5)  # unmerged, on the dequantized base


# ---- 3. QLoRA bf16-true computes in bf16 ---------------------------------------------------------------------
def test_qlora_bf16_runs_the_base_in_bf16(tiny_recipe, tiny_model_dir):
    """prepare_model_for_kbit_training upcasts embeddings, norms and head to fp32; a bf16-true run keeps them in
    bf16, so the residual stream, attention and head compute in bf16 (LoRA weights stay fp32, as PEFT keeps
    adapters on a 16-bit base)."""
    pytest.importorskip("bitsandbytes")
    from daytune.models.trained import load_base_for_training
    from daytune.train.methods import prepare_for_training

    cfg = load_run_config(tiny_recipe(train={"method": "qlora", "precision": "bf16-true"}))
    base = load_base_for_training(tiny_model_dir, cfg.train, torch.bfloat16, torch.device("cpu"))
    model = prepare_for_training(base, cfg.train, tiny_model_dir)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.dtype.is_floating_point}
    lora = {n for n in dtypes if "lora_" in n}
    assert lora and all(dtypes[n] == torch.float32 for n in lora)
    assert {dtypes[n] for n in dtypes if n not in lora} == {torch.bfloat16}  # embeddings, norms, head
    seen = {}

    def hook(name, value):
        def record(module, inputs, output):
            seen.setdefault(name, value(inputs, output).dtype)  # returns None: the output stays

        return record

    layer = model.get_base_model().model.layers[0]
    layer.register_forward_hook(hook("block", lambda i, o: o[0] if isinstance(o, tuple) else o))
    layer.self_attn.o_proj.register_forward_hook(hook("attention", lambda i, o: i[0]))
    with torch.no_grad():
        model(input_ids=IDS)
    assert seen == {"block": torch.bfloat16, "attention": torch.bfloat16}


def test_cuda_device_index_tf32_and_native_bf16(cuda, monkeypatch):
    """train.device cuda:1 becomes the current device (everything that says "cuda" lands there) and the one a
    4-bit base loads on; TF32 is on; bf16 counts only where it is native (a T4 or V100 says it emulates)."""
    from daytune.models.trained import load_base_for_training

    device = hardware.use_device(hardware.pick_device("cuda:1"))
    assert device == torch.device("cuda", 1) and cuda["set"] == [1]
    matmul = torch.backends.cuda.matmul
    assert getattr(matmul, "fp32_precision", None) == "tf32" or matmul.allow_tf32
    with pytest.raises(ConfigError, match="each of the 2 processes takes its own"):
        hardware.use_device(torch.device("cuda:1"), processes=2)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        hardware.pick_device("cuda:5")
    from transformers import AutoModelForCausalLM

    maps = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: maps.append(k["device_map"]))
    monkeypatch.setattr("daytune.models.trained._bnb_4bit", lambda tc, dtype: None)
    load_base_for_training(Path("x"), SimpleNamespace(method="qlora"), torch.bfloat16, torch.device("cuda"))
    assert maps == [{"": 1}]  # the current device, not device 0
    assert hardware.resolve_precision("auto", torch.device("cuda")) == "bf16-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert hardware.resolve_precision("auto", torch.device("cuda")) == "16-mixed"
    assert hardware.inference_dtype(torch.device("cuda")) == torch.float16


# ---- 5. a CUDA machine with a CPU-only PyTorch fails loudly ----------------------------------------------------
def test_auto_device_refuses_the_cpu_beside_an_nvidia_driver(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "nvidia_driver", lambda: "/usr/bin/nvidia-smi")
    with pytest.raises(ConfigError, match="NVIDIA driver.*cannot use CUDA.*TORCH_SPEC.*train.device: cpu"):
        hardware.pick_device("auto")
    with pytest.raises(ConfigError, match="cannot use CUDA"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("cpu") == torch.device("cpu")  # chosen explicitly: fine
    monkeypatch.setattr(hardware, "nvidia_driver", lambda: None)
    assert hardware.pick_device("auto") == torch.device("cpu")


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$FAKE_LOG"
case "$*" in
  *cuda.is_available*) exit "$FAKE_NO_CUDA";;
  *torch.__version__*) echo 2.13.0+cpu;;
esac
exit 0
"""


def _make(tmp_path, spec: str, driver: bool, cuda_ok: bool, extra=()):
    venv, bin_dir = tmp_path / "venv", tmp_path / "bin"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    smi = bin_dir / "nvidia-smi"
    if driver:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 4090'\n")
        smi.chmod(0o755)
    else:  # a machine without a driver (also when the one running the tests has one)
        smi.write_text("#!/bin/sh\nexit 9\n")
        smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "pip.log"),
               FAKE_NO_CUDA="0" if cuda_ok else "1")  # fmt: skip
    (tmp_path / "pip.log").write_text("")
    out = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "setup", f"VENV={venv}", f"TORCH_SPEC={spec}", *extra],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return out, (tmp_path / "pip.log").read_text()


def test_make_setup_installs_the_requested_torch_build(tmp_path):
    cpu, cu128 = "torch==2.13.0", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    out, log = _make(tmp_path, cpu, driver=False, cuda_ok=False)
    assert out.returncode == 0, out.stderr
    assert f"--force-reinstall --no-deps {cpu}\n" in log and "-e .[test]" in log
    out, log = _make(tmp_path, cpu, driver=False, cuda_ok=False)
    assert out.returncode == 0 and log == ""  # set up already: nothing to do
    # the same venv, another build: pip alone would keep 2.13.0+cpu (it satisfies ==2.13.0)
    out, log = _make(tmp_path, cu128, driver=True, cuda_ok=True)
    assert out.returncode == 0, out.stderr
    assert f"--force-reinstall --no-deps {cu128}" in log and "-e .[test]" in log
    assert len(list((tmp_path / "venv").glob(".daytune-torch-*"))) == 1


def test_make_setup_fails_when_the_driver_has_no_cuda_torch(tmp_path):
    out, _ = _make(tmp_path, "torch==2.13.0", driver=True, cuda_ok=False)
    assert out.returncode != 0
    assert "NVIDIA driver" in out.stderr and "cannot use CUDA" in out.stderr and "TORCH_SPEC" in out.stderr
    assert not list((tmp_path / "venv").glob(".daytune-setup-*"))  # not marked done: the next make retries
    out, _ = _make(tmp_path, "torch==2.13.0", driver=True, cuda_ok=False, extra=["CPU_ONLY=1"])
    assert out.returncode == 0, out.stderr


# ---- 6. packed rows on the variable-length attention path -------------------------------------------------------
def _examples(tok, n=12, max_len=200):
    from daytune.data import encode_records, read_instructions

    records = read_instructions(EXAMPLES / "data" / "gsm8k_train.jsonl", n)
    return encode_records(records, tok, "chat", max_len)[0]


@pytest.fixture
def reference_varlen(monkeypatch):
    """The varlen kernel is CUDA-only: on CPUs its reference (SDPA per segment) stands in for it."""
    from daytune.engine import attention

    monkeypatch.setattr(attention, "_kernel", lambda: attention.reference_varlen)
    return attention


def test_packed_losses_equal_unpacked_on_the_varlen_path(tiny_model_dir, reference_varlen):
    """Packed rows attended by segments (no mask) give every example its unpacked loss and gradients, as the
    4D-mask path does."""
    from daytune.data.batching import collate, collate_packed
    from daytune.engine.loss import response_loss
    from daytune.models import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    exs = _examples(tok)
    rows = [exs[:4], exs[4:6], exs[6:7]]  # uneven totals: padding segments too
    masked_model = load_model(tiny_model_dir)
    varlen_model = load_model(tiny_model_dir)
    assert reference_varlen.use_varlen(varlen_model)
    batch = collate_packed(rows, tok.pad_token_id, varlen=True)
    assert "attention_mask" not in batch and batch["cu_seq_lens_q"].dtype == torch.int32
    assert int(batch["cu_seq_lens_q"][-1]) == batch["input_ids"].numel()

    def grads(model, b):
        model.zero_grad()
        loss, n = response_loss(model, b)
        loss.backward()
        return float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    total, count = 0.0, 0
    with torch.no_grad():
        for e in exs[:7]:
            loss, c = response_loss(masked_model, collate([e], tok.pad_token_id))
            total, count = total + float(loss), count + c
    v_loss, v_n, v_grads = grads(varlen_model, batch)
    m_loss, m_n, m_grads = grads(masked_model, collate_packed(rows, tok.pad_token_id))
    assert v_n == m_n == count
    assert v_loss == pytest.approx(total, rel=1e-5) and m_loss == pytest.approx(total, rel=1e-5)
    assert all(torch.allclose(v_grads[k], m_grads[k], rtol=1e-5, atol=1e-5) for k in m_grads)
    with torch.no_grad():  # without segments (held-out loss, padded rows) the switched model is plain SDPA
        padded = collate(exs[:3], tok.pad_token_id)
        assert float(response_loss(varlen_model, padded)[0]) == pytest.approx(
            float(response_loss(masked_model, padded)[0]), rel=1e-6
        )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_takes_the_varlen_path_on_cuda(tiny_recipe, reference_varlen, monkeypatch, checkpointing):
    """Where the kernel runs (CUDA, 16-bit), a packed run trains by segments (also through recomputed blocks);
    the losses are the mask path's."""
    import daytune.train.loop as loop

    losses = {}
    for varlen in (False, True):
        monkeypatch.setattr(loop, "varlen_available", lambda device, dtype, v=varlen: v)
        train = {"max_steps": 2, "gradient_checkpointing": checkpointing}
        cfg = load_run_config(tiny_recipe(data={"packing": True, "max_rows": 24}, train=train))
        run = new_run(cfg)
        assert train_run(cfg, run).attention == ("varlen" if varlen else "sdpa")
        losses[varlen] = [m["loss"] for m in run.read_metrics()]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert not reference_varlen.varlen_available(torch.device("cpu"), torch.bfloat16)


def test_planner_counts_no_mask_for_packed_rows_on_cuda():
    from dataclasses import replace

    from daytune.models.registry import MODELS
    from daytune.plan.memory import Setup, breakdown

    arch = MODELS["llama-2-7b"].arch
    gpu = Setup(method="qlora", precision="bf16-true", seq_len=2048, micro_batch=2, packing=True)
    assert gpu.varlen and not gpu.masked
    cpu = replace(gpu, device_type="cpu")
    assert cpu.masked and not cpu.varlen  # CPUs keep the block-diagonal mask
    assert replace(gpu, packing=False).masked  # padded rows still pass a mask
    mask_per_layer = 2048 * 2048 * 2 * 2  # (batch, 1, seq, seq) in bf16, kept in every layer
    diff = breakdown(arch, replace(gpu, stack=replace(gpu.stack, varlen_packing=False))).activations
    assert diff - breakdown(arch, gpu).activations >= arch.layers * mask_per_layer


# ---- 7. accumulation through accelerate: DeepSpeed's boundary is the last micro-batch --------------------------
def test_only_the_last_micro_batch_syncs(tiny_recipe, monkeypatch):
    """accelerate hands `sync_gradients` to DeepSpeed as its accumulation boundary (the engine clips and steps
    there) and syncs DDP/FSDP gradients only then: once per optimizer step, not per micro-batch."""
    from accelerate import Accelerator

    flags = []
    real = Accelerator.backward

    def backward(self, loss, **kwargs):
        flags.append(self.sync_gradients)
        return real(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)
    cfg = load_run_config(tiny_recipe(train={"max_steps": 2, "micro_batch": 1, "grad_accum": 3}))
    result = train_run(cfg, new_run(cfg))
    assert flags == [False, False, True] * 2 and result.steps == 2


def test_deepspeed_config_and_checkpoints(tiny_recipe, monkeypatch, tmp_path):
    """Under DeepSpeed the recipe sets the engine's micro-batch, accumulation and clipping, and the optimizer
    state (not plain tensors) goes through accelerate's save_state/load_state."""
    from daytune.train import loop
    from daytune.train.checkpoint import load_checkpoint

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1}
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
                          num_processes=2)  # fmt: skip
    tc = load_run_config(tiny_recipe(train={"micro_batch": 2, "grad_accum": 4, "grad_clip": 0.5})).train
    loop.configure_deepspeed(acc, tc)
    assert config == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                      "gradient_clipping": 0.5, "train_batch_size": 16}  # fmt: skip

    cfg = load_run_config(tiny_recipe(train={"max_steps": 1}))
    s = loop.setup(cfg, new_run(cfg))
    folder = tmp_path / "checkpoints"
    saved, loaded = [], []

    def save_state(folder, **kwargs):
        saved.append(kwargs)
        Path(folder).mkdir(parents=True)
        (Path(folder) / "engine.bin").write_text("engine")

    s.accelerator.save_state, s.accelerator.load_state = save_state, loaded.append
    s.sharded = s.deepspeed = True
    loop.checkpoint(s, folder)
    (ckpt,) = folder.glob("step-*")
    assert (ckpt / "deepspeed" / "engine.bin").is_file() and not list(ckpt.glob("optimizer*.pt"))
    assert saved == [{"exclude_frozen_parameters": True}]
    load_checkpoint(ckpt, s.unwrapped, s.optimizer, 0, s.accelerator.load_state)
    assert loaded == [str(ckpt / "deepspeed")]


# ---- 10. the probe, validation, timing and memory records --------------------------------------------------------
def test_probe_runs_in_autocast_and_counts_allocation_failures(tiny_model_dir, monkeypatch):
    from contextlib import contextmanager

    import daytune.engine.loss as engine_loss
    from daytune.train.probe import probe_micro_batch

    seen, real = [], engine_loss.response_loss

    def loss(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        if batch["input_ids"].shape[0] >= 3:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return real(model, batch)

    monkeypatch.setattr(engine_loss, "response_loss", loss)

    @contextmanager
    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield

    from daytune.models import load_model

    model = load_model(tiny_model_dir)

    def make(n):
        return {"input_ids": IDS.repeat(n, 1), "labels": IDS.repeat(n, 1)}

    best, _, tries = probe_micro_batch(
        model, make, 8, torch.device("cpu"), 0, None, lambda *a: None, autocast
    )
    assert best == 2 and all(seen) and not any(t.fits for t in tries if t.micro_batch >= 3)
    monkeypatch.setattr(engine_loss, "response_loss", lambda m, b: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.raises(RuntimeError, match="bad"):  # a real failure is not "too large"
        probe_micro_batch(model, make, 8, torch.device("cpu"), 0, None, lambda *a: None, autocast)


def test_probe_reserves_ddp_buckets(tiny_recipe, monkeypatch):
    """With several processes, DDP allocates a gradient-sized bucket set when the model is wrapped (after the
    probe): the probe keeps room for it."""
    import accelerate.utils
    from accelerate.utils import DistributedType

    import daytune.train.probe as probe
    from daytune.data import encode_records, read_instructions
    from daytune.models import load_model, load_tokenizer
    from daytune.train.methods import prepare_for_training

    def fake_probe(model, make, size, device, reserve, *args):
        reserved.append(reserve)
        return 4, 1.0, []

    reserved = []
    monkeypatch.setattr(probe, "probe_micro_batch", fake_probe)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda x: x)
    cfg = load_run_config(tiny_recipe(train={"micro_batch": "auto", "batch_size": 8}))
    model = prepare_for_training(load_model(Path(cfg.model)), cfg.train, Path(cfg.model))
    tok = load_tokenizer(Path(cfg.model))
    examples = encode_records(read_instructions(cfg.data.train, 8), tok, "chat", 128)[0]
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    for world in (1, 2):
        acc = SimpleNamespace(num_processes=world, distributed_type=DistributedType.MULTI_CPU,
                              device=torch.device("cpu"), autocast=None)  # fmt: skip
        cfg.train.micro_batch = "auto"
        probe.resolve_micro_batch(cfg, model, examples, tok, acc, None, lambda *a: None)
    assert reserved[1] - reserved[0] == grads  # AdamW's two moments on both; the bucket on two processes


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one state per process: a run in another mixed precision needs it reset (and reset back)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_validation_runs_in_autocast_steps_are_synchronised_and_gpu_peaks(
    tiny_recipe, monkeypatch, fresh_accelerate
):
    import daytune.train.loop as loop

    autocast, syncs, real = [], [], loop.heldout_loss
    monkeypatch.setattr(
        loop, "heldout_loss", lambda *a: (autocast.append(torch.is_autocast_enabled("cpu")), real(*a))[1]
    )
    monkeypatch.setattr(loop, "sync", lambda device: syncs.append(device))
    cfg = load_run_config(tiny_recipe(data={"val_fraction": 0.25},
                                      train={"precision": "bf16-mixed", "max_steps": 2, "eval_every": 1}))  # fmt: skip
    result = train_run(cfg, new_run(cfg))
    assert autocast == [True, True]  # the precision training computes in
    assert len(syncs) >= result.steps  # before every step's clock is read
    assert result.peak_gpu_allocated_mb is None  # a CPU run: host memory only
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 4 * 2**30)
    assert loop.gpu_peaks(torch.device("cuda")) == {
        "peak_gpu_allocated_mb": 3072.0,
        "peak_gpu_reserved_mb": 4096.0,
    }


# ---- 9. NVML behind CUDA_VISIBLE_DEVICES ------------------------------------------------------------------------
class FakeNvml:
    """Four GPUs in PCI order, each busy differently."""

    NVML_TEMPERATURE_GPU = 0
    UUIDS = ["GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2", "GPU-dddd-3"]

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.UUIDS[h].encode()

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=10 * (h + 1))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 2**30, total=24 * 2**30)

    def nvmlDeviceGetTemperature(self, h, kind):
        return 60

    def nvmlDeviceGetPowerUsage(self, h):
        return 100_000


def test_nvml_samples_the_gpus_the_run_sees(monkeypatch, tmp_path):
    """CUDA_VISIBLE_DEVICES=2,0: CUDA's device 0 is NVML's device 2. The samples (and the doctor's averages)
    cover the run's GPUs, by UUID, indexed as the run sees them."""
    import daytune.track.system as system

    monkeypatch.setattr(system, "cuda_uuids", lambda: ["GPU-cccc-2", "GPU-aaaa-0"])
    nvml = FakeNvml()
    assert [(i, h) for i, h in system.visible_gpus(nvml)] == [(0, 2), (1, 0)]
    gpus = system.gpu_samples(nvml, system.visible_gpus(nvml, [0]))
    assert [(g["index"], g["util"], g["mem_used_mb"]) for g in gpus] == [(0, 30, 3072.0)]
    # without UUIDs from PyTorch, CUDA_VISIBLE_DEVICES itself (indices or UUID prefixes)
    monkeypatch.setattr(system, "cuda_uuids", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-bbbb")
    assert system.visible_gpus(nvml) == [(0, 3), (1, 1)]
    monkeypatch.setattr(system, "_nvml", lambda: nvml)
    monkeypatch.setattr(system, "cuda_uuids", lambda: ["GPU-cccc-2", "GPU-aaaa-0"])
    sampler = system.SystemSampler(tmp_path / "system.jsonl", every=60, devices=[1]).start()
    sampler.stop()
    lines = [json.loads(x) for x in (tmp_path / "system.jsonl").read_text().splitlines()]
    assert all(s["gpus"] == [dict(index=1, util=10, mem_used_mb=1024.0, mem_total_mb=24576.0, temp_c=60,
                                  power_w=100.0)] for s in lines)  # fmt: skip


def test_tracker_samples_the_device_of_a_single_process(cuda):
    from daytune.track.tracker import _run_gpus

    cuda["current"] = 1
    assert _run_gpus(torch.device("cuda"), 1) == [1]
    assert _run_gpus(torch.device("cuda", 0), 1) == [0]
    assert _run_gpus(torch.device("cpu"), 1) == []
    assert _run_gpus(torch.device("cuda", 0), 2) == [0, 1]


# ---- 8. FSDP2: DTensor parameters over gloo ----------------------------------------------------------------------
def _fsdp2(recipe, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp2_cpu.py"), "--quiet", "train", str(recipe), *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-4000:]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp2_trains_resumes_and_early_stops_like_one_process(tiny_recipe, tmp_path):
    """Two processes, parameters sharded by accelerate's FSDP2 (DTensors over gloo), against one process with
    twice the accumulation: the save probe and checkpoints gather the shards (no hang, no safetensors error),
    clipping acts on the sharded parameters (grad_clip well under the gradient norm), resume and the early
    stopping restore load full tensors into the shards, and both end with the same adapter."""
    common = {"data": {"max_rows": 32, "val_fraction": 0.25},
              "train": {"max_steps": 4, "micro_batch": 2, "grad_clip": 0.05, "eval_every": 1,
                        "early_stopping_patience": 1, "lora": {"dropout": 0.0}}}  # fmt: skip
    one = tiny_recipe(**{**common, "train": {**common["train"], "grad_accum": 2}, "name": "one"})
    one_copy = tmp_path / "one.yaml"
    one_copy.write_text(one.read_text())
    two = tiny_recipe(**{**common, "train": {**common["train"], "grad_accum": 1}, "name": "two"})
    assert main(["--quiet", "train", str(one_copy)]) == 0
    _fsdp2(two, cwd=tmp_path)
    runs = {p.name.split("-")[-1]: p for p in (tmp_path / "runs").iterdir()}
    summary = json.loads((runs["two"] / "summary.json").read_text())["train"]
    assert summary["processes"] == 2
    grad_norms = [
        json.loads(x)["grad_norm"] for x in (runs["two"] / "metrics.jsonl").read_text().splitlines()
    ]
    assert min(grad_norms) > 0.05  # every step was clipped
    assert _losses(runs["two"]) == pytest.approx(_losses(runs["one"]), abs=1e-5)
    # resume both with a learning rate that overshoots: validation worsens, early stopping restores the best
    more = ["--set", "train.max_steps=8", "--set", "train.lr=0.5", "--set", "train.grad_clip=null"]
    assert main(["--quiet", "train", str(one_copy), "--resume", str(runs["one"]), *more]) == 0
    _fsdp2(two, "--resume", str(runs["two"]), *more, cwd=tmp_path)
    for name in ("one", "two"):
        assert (
            json.loads((runs[name] / "summary.json").read_text())["train"]["stopped_by"] == "early_stopping"
        )
    assert _losses(runs["two"]) == pytest.approx(_losses(runs["one"]), abs=1e-4)
    wa = load_file(str(runs["one"] / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(runs["two"] / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
