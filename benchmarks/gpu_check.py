"""The first GPU day, checked in one go (run through benchmarks/gpu_check.sh; about 8 minutes on one GPU).

1. CUDA, bitsandbytes and NVML agree: the devices PyTorch sees are the ones NVML samples (by UUID), and
   bitsandbytes' CUDA library runs a 4-bit matmul that matches its dequantized weights.
2. A random-weight 0.5B Llama trains (LoRA, bf16-true, packed, micro_batch auto: the probe on the GPU); then
   again with Liger's fused kernels (train.kernels liger) and with PyTorch's: losses, tokens/s, memory.
3. A 2-layer slice of Llama 2 7B trains with the RTX 4090 recipe's settings (QLoRA NF4, r=64 on every linear
   layer, gradient checkpointing, paged 8-bit AdamW, packed 2048-token rows); a copy is SIGKILLed after a
   checkpoint and resumed, and its losses are compared with the uninterrupted run.
4. Its peak CUDA memory against the planner's prediction for the slice, and the planner's full 32-layer figure
   scaled by that error.
5. Packed rows on the flash (varlen) path: the same losses as the 4D mask and as unpacked rows; time and memory.
6. Export (merged, bf16), serve and generate on CUDA through the HTTP API; the QLoRA slice served merged into its
   dequantized NF4 weights.
7. One FSDP2 process through accelerate (examples/accelerate/fsdp.yaml): checkpoints, resume.

Everything goes to one JSON (default benchmarks/results/gpu_check.json). `--dry-run` runs the same flow on the
CPU with tiny models in a minute or two (the test suite runs it, so the script does not rot): FSDP through the
CPU launcher of the tests, the varlen kernel replaced by its per-segment reference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data" / "gsm8k_train.jsonl"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class Sizes:
    """What the check builds and runs: the real sizes on a GPU, tiny ones for --dry-run."""

    small: dict  # LlamaConfig fields of the "0.5B" model
    slice: dict  # of the 2-layer slice of Llama 2 7B
    small_seq: int
    pack_len: int  # the packed rows of the attention check
    small_steps: int
    slice_steps: int
    device: str
    precision: str
    fsdp_precision: str


GPU = Sizes(
    small=dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),  # fmt: skip
    slice=dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),  # fmt: skip
    small_seq=1024,
    pack_len=2048,
    small_steps=6,
    slice_steps=6,
    device="cuda",
    precision="bf16-true",
    fsdp_precision="bf16-mixed",
)
DRY = Sizes(
    small=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),  # fmt: skip
    slice=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),  # fmt: skip
    small_seq=256,
    pack_len=1024,
    small_steps=3,
    slice_steps=6,
    device="cpu",
    precision="32-true",
    fsdp_precision="32-true",
)


@dataclass
class Check:
    ok: bool = False
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    error: str | None = None


class Context:
    def __init__(self, sizes: Sizes, work: Path, dry: bool):
        self.sizes, self.work, self.dry = sizes, work, dry
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
        self.facts: dict = {}

    def daytune(self, *args, timeout=600, launcher=None) -> subprocess.CompletedProcess:
        cmd = [*(launcher or [sys.executable, "-m", "daytune"]), "--quiet", *args]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=self.work
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[-6:])} exited {out.returncode}: {out.stderr[-2500:]}")
        return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- 1. CUDA, bitsandbytes, NVML ---------------------------------------------------------------------------------
def check_environment(ctx: Context) -> dict:
    import torch

    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if not ctx.dry and not torch.cuda.is_available():
        raise RuntimeError(f"PyTorch {torch.__version__} cannot use CUDA here")
    if torch.cuda.is_available():
        facts["devices"] = [
            {"index": i, "name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 2)}
            for i in range(torch.cuda.device_count())
        ]  # fmt: skip
    facts["nvml"] = _nvml_facts(facts.get("devices", []))
    facts["bitsandbytes"] = _bnb_facts(ctx.sizes.device)
    ok = facts["bitsandbytes"]["agrees"] and (ctx.dry or facts["nvml"].get("agrees", False))
    return {"ok": ok, **facts}


def _nvml_facts(devices: list) -> dict:
    from daytune.track.system import _nvml, cuda_uuids, visible_gpus

    nvml = _nvml()
    if nvml is None:
        return {"available": False}
    gpus = visible_gpus(nvml)
    names = [nvml.nvmlDeviceGetName(h) for _, h in gpus]
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    return {
        "available": True,
        "machine_gpus": nvml.nvmlDeviceGetCount(),
        "visible": [{"index": i, "name": n} for (i, _), n in zip(gpus, names)],
        "cuda_uuids": cuda_uuids(),
        "agrees": len(gpus) == len(devices) and all(d["name"] == n for d, n in zip(devices, names)),
    }


def _bnb_facts(device: str) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = bnb.nn.Linear4bit(512, 512, bias=False, compute_dtype=dtype, quant_type="nf4").to(device)
    x = torch.randn(8, 512, device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x).float()
        w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        ref = (x @ w.t()).float()
    err = float((y - ref).abs().max() / ref.abs().max())
    lib = getattr(getattr(bnb, "cextension", None), "lib", None)
    return {"version": bnb.__version__, "library": str(getattr(lib, "_name", lib)), "matmul_rel_err": err,
            "agrees": err < 2e-2}  # fmt: skip


# ---- building the models ---------------------------------------------------------------------------------------------
def build_tokenizer(folder: Path):
    """A byte-level BPE trained on the shipped data (a few seconds): no download, real token statistics."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [
        str(v) for line in DATA.read_text(encoding="utf-8").splitlines() for v in json.loads(line).values()
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, fields: dict, tok, device: str) -> dict:
    """Random weights (seeded), saved in bf16 on a GPU run (fp32 in the dry run), with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"path": str(folder), "params": params}


def recipe(ctx: Context, name: str, model: Path, **train) -> Path:
    import yaml

    cfg = {
        "name": name,
        "model": str(model),
        "data": {"train": str(DATA), "template": "alpaca", "max_seq_len": ctx.sizes.small_seq, "packing": True},
        "train": {"method": "lora", "lora": {"r": 16, "alpha": 32, "targets": "all-linear"},
                  "precision": ctx.sizes.precision, "device": ctx.sizes.device, "checkpoint_every": 1000,
                  "warmup_steps": 1, **train},
        "track": {"system_every": 1.0, "code_snapshot": False},
        "out_dir": str(ctx.work / "runs"),
    }  # fmt: skip
    path = ctx.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def latest_run(ctx: Context, name: str) -> Path:
    return sorted((ctx.work / "runs").glob(f"*-{name}"))[-1]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["train"]


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 2. the 0.5B model -----------------------------------------------------------------------------------------------
def check_small(ctx: Context) -> dict:
    s = ctx.sizes
    tok = build_tokenizer(ctx.work / "tokenizer")
    ctx.facts["tok"] = tok
    ctx.facts["small"] = build_model(ctx.work / "small", s.small, tok, s.device)
    ctx.facts["slice"] = build_model(ctx.work / "slice", s.slice, tok, s.device)
    path = recipe(ctx, "small", ctx.work / "small", micro_batch="auto", batch_size=8, max_steps=s.small_steps)
    t0 = time.perf_counter()
    ctx.daytune("train", str(path))
    run = latest_run(ctx, "small")
    ctx.facts["small_run"] = run
    train = summary_of(run)
    plan = json.loads((run / "plan.json").read_text()) if (run / "plan.json").is_file() else {}
    return {
        "ok": train["steps"] == s.small_steps and all(l == l for l in losses(run)),  # noqa: E741 (NaN check)
        "params": ctx.facts["small"]["params"],
        "seconds": round(time.perf_counter() - t0, 1),
        **{k: train.get(k) for k in ("micro_batch", "grad_accum", "tokens_per_s", "final_loss", "precision",
                                     "attention", "peak_gpu_allocated_mb", "peak_gpu_reserved_mb", "peak_rss_mb")},
        "probe": train.get("micro_batch_probe"),
        "planned_tokens_per_s": plan.get("tokens_per_s"),
        "planned_peak_mb": plan.get("peak_memory_mb"),
    }  # fmt: skip


# ---- 2b. Liger's fused kernels against PyTorch's on the same model, data and steps ---------------------------------
def check_liger(ctx: Context) -> dict:
    """train.kernels liger vs none on the 0.5B model (the micro-batch its probe chose): losses, tokens/s, memory.
    On the CPU (--dry-run) liger falls back to PyTorch's kernels, so both runs are the same computation."""
    s = ctx.sizes
    mb = summary_of(ctx.facts["small_run"]).get("micro_batch") or 1
    rows = {}
    for kernels in ("none", "liger"):
        name = f"kernels-{kernels}"
        path = recipe(ctx, name, ctx.work / "small", micro_batch=mb, grad_accum=max(1, 8 // mb),
                      max_steps=s.small_steps, kernels=kernels)  # fmt: skip
        ctx.daytune("train", str(path))
        run = latest_run(ctx, name)
        train = summary_of(run)
        rows[kernels] = {"losses": losses(run), **{k: train.get(k) for k in (
            "kernels", "tokens_per_s", "peak_gpu_allocated_mb", "peak_rss_mb")}}  # fmt: skip
    a, b = rows["none"]["losses"], rows["liger"]["losses"]
    diff = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b)) if a and len(a) == len(b) else None
    fell_back = rows["liger"]["kernels"] == "none"  # what the run resolved train.kernels liger to
    speed = (rows["liger"]["tokens_per_s"] or 0) / (rows["none"]["tokens_per_s"] or float("inf"))
    return {
        # bf16 kernels round differently: a few 1e-3 of relative loss on a GPU; the CPU fallback is the same math
        "ok": diff is not None and diff < (1e-5 if ctx.dry else 2e-2) and (fell_back == ctx.dry),
        "losses_rel_diff": diff,
        "liger_vs_pytorch_tokens_per_s": round(speed, 3),
        "fell_back_to_pytorch": fell_back,
        "runs": rows,
    }


# ---- 3, 4. the 7B slice with the 4090 recipe: kill, resume, memory ------------------------------------------------
def slice_recipe(ctx: Context, name: str) -> Path:
    import yaml

    cfg = yaml.safe_load((EXAMPLES / "llama2-7b-qlora-rtx4090.yaml").read_text())
    cfg["name"], cfg["model"], cfg["out_dir"] = name, str(ctx.work / "slice"), str(ctx.work / "runs")
    cfg["data"].pop("prepare", None)  # the recipe's own data mix is prepared for a day; a sample does here
    cfg["data"].update(train=str(DATA), val_fraction=0.05)
    tc = cfg["train"]
    for key in ("budget", "epochs"):
        tc.pop(key, None)
    tc.update(max_steps=ctx.sizes.slice_steps, checkpoint_every=2, eval_every=3, device=ctx.sizes.device,
              warmup_steps=1, keep_checkpoints=5)  # fmt: skip
    if ctx.dry:  # the CPU has no paged optimizer and no bf16 speed; short rows keep it to seconds
        tc.update(precision="32-true", optimizer="adamw", grad_accum=2)
        cfg["data"]["max_seq_len"] = ctx.sizes.small_seq
    cfg["track"] = {"system_every": 1.0, "code_snapshot": False}
    path = ctx.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def check_slice(ctx: Context) -> dict:
    ctx.daytune("train", str(slice_recipe(ctx, "slice-ref")))
    reference = latest_run(ctx, "slice-ref")
    crash_recipe = slice_recipe(ctx, "slice-crash")
    cmd = [sys.executable, "-m", "daytune", "--quiet", "train", str(crash_recipe)]
    proc = subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed_at = time.monotonic() + 300, None
    while time.monotonic() < deadline and proc.poll() is None:
        runs = sorted((ctx.work / "runs").glob("*-slice-crash"))
        if runs and (runs[-1] / "metrics.jsonl").is_file():
            steps = len((runs[-1] / "metrics.jsonl").read_text().splitlines())
            if steps >= 3 and list((runs[-1] / "checkpoints").glob("step-*/state.json")):
                proc.send_signal(signal.SIGKILL)
                killed_at = steps
                break
        time.sleep(0.05)
    proc.wait()
    crashed = latest_run(ctx, "slice-crash")
    ctx.daytune("train", str(crash_recipe), "--resume", str(crashed))
    ctx.facts["slice_run"] = reference
    a, b = losses(reference), losses(crashed)
    diff = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(a, b)) if len(a) == len(b) else None
    train = summary_of(reference)
    return {
        "ok": killed_at is not None and diff is not None and diff < 1e-2,
        "params": ctx.facts["slice"]["params"],
        "killed_at_step": killed_at,
        "resumed_losses_rel_diff": diff,
        **{k: train.get(k) for k in ("tokens_per_s", "final_loss", "attention", "precision",
                                     "peak_gpu_allocated_mb", "peak_gpu_reserved_mb", "peak_rss_mb")},
        "memory": memory_against_plan(reference, train, ctx.sizes.device),
    }  # fmt: skip


def memory_against_plan(run: Path, train: dict, device: str) -> dict:
    """Measured peak (CUDA's reserved memory on a GPU, RSS on the CPU) against the run's own plan.json (the slice
    on this device), and the planner's full 32-layer Llama 2 7B figure for the same setup, scaled by the slice's
    error."""
    from dataclasses import replace

    import torch

    from daytune.config import load_run_config
    from daytune.hardware import detect
    from daytune.models.registry import MODELS
    from daytune.plan import setup_from_config
    from daytune.plan.search import make_plan

    plan = json.loads((run / "plan.json").read_text())
    predicted = plan["memory"]["peak"] / 2**20
    measured = train.get("peak_gpu_reserved_mb") or train.get("peak_rss_mb")
    cfg = load_run_config(run / "config.yaml")
    setup = setup_from_config(cfg, train["precision"], plan["device"]["kind"], plan["setup"]["micro_batch"])
    setup = replace(setup, label_fraction=plan["setup"]["label_fraction"])
    full = make_plan(MODELS["llama-2-7b"].arch, setup, detect(torch.device(device))).to_dict()
    full_mb = full["memory"]["peak"] / 2**20
    ratio = measured / predicted if measured else None
    return {
        "measured_mb": measured,
        "predicted_mb": round(predicted, 1),
        "error": None if ratio is None else round(ratio - 1, 4),
        "full_7b_predicted_mb": round(full_mb, 1),
        "full_7b_scaled_mb": None if ratio is None else round(full_mb * ratio, 1),
        "full_7b_fits": full["memory"]["fits"],
        "device_mb": round(plan["device"]["memory"] / 2**20, 1),
    }


# ---- 5. packed rows on the flash path ------------------------------------------------------------------------------
def check_packed_attention(ctx: Context) -> dict:
    import torch

    from daytune.data import encode_records, read_instructions
    from daytune.data.batching import BatchPlan, collate, collate_packed
    from daytune.engine import attention
    from daytune.engine.loss import response_loss
    from daytune.models import load_model, load_tokenizer

    s, device = ctx.sizes, torch.device(ctx.sizes.device)
    dtype = torch.bfloat16 if s.device == "cuda" else torch.float32
    if ctx.dry:  # no varlen kernel on CPUs: its per-segment reference stands in
        attention._kernel = lambda: attention.reference_varlen
    available = attention.varlen_available(device, dtype) or ctx.dry
    tok = load_tokenizer(ctx.work / "small")
    examples = encode_records(read_instructions(DATA, 200), tok, "alpaca", s.small_seq)[0]
    plan = BatchPlan([len(e.input_ids) for e in examples], 1, 0, s.pack_len, packing=True)
    fullest = sorted((mb[0] for mb in plan.epoch(0)), key=len, reverse=True)[:2]  # several examples a row
    rows = [[examples[i] for i in row] for row in fullest]
    model = load_model(ctx.work / "small", dtype=dtype, device=device)
    kernel = attention._kernel()
    out = {"varlen_available": available, "kernel": f"{kernel.__module__}.{kernel.__name__}" if kernel else None,
           "rows": len(rows), "examples": sum(len(r) for r in rows), "dtype": str(dtype)}  # fmt: skip

    def run(batch, name):
        batch = {k: v.to(device) for k, v in batch.items() if k != "n_tokens"}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(s.device)
        t0 = time.perf_counter()
        loss, n = response_loss(model, batch)
        loss.backward()
        sync(s.device)
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        out[name] = {"loss": float(loss.detach()), "labels": n, "seconds": round(time.perf_counter() - t0, 4),
                     "peak_mb": None if peak is None else round(peak, 1)}  # fmt: skip

    run(collate_packed(rows, tok.pad_token_id), "mask")
    if available:
        attention.use_varlen(model)
        run(collate_packed(rows, tok.pad_token_id, varlen=True), "varlen")
        run(collate_packed(rows, tok.pad_token_id, varlen=True), "varlen")  # warm: the timing that counts
        model.set_attn_implementation("sdpa")
    total = 0.0
    for row in rows:
        for e in row:
            with torch.no_grad():
                total += float(
                    response_loss(
                        model, {k: v.to(device) for k, v in collate([e], tok.pad_token_id).items()}
                    )[0]
                )
    out["unpacked_loss"] = total
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    agree = [abs(out[k]["loss"] - total) / total < tol for k in ("mask", "varlen") if k in out]
    out["ok"] = available and all(agree) and len(agree) == 2
    return out


# ---- 6. export, serve, generate -----------------------------------------------------------------------------------
def check_export_serve(ctx: Context) -> dict:
    from safetensors import safe_open

    run, out = ctx.facts["small_run"], ctx.work / "exported"
    ctx.daytune("export", str(run), "--merge", "--out", str(out))
    dtypes = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    small = serve_and_generate(ctx, ["--model", str(out)], port=18931)
    qlora = serve_and_generate(ctx, ["--run", str(ctx.facts["slice_run"])], port=18932)
    want = {"BF16"} if ctx.sizes.device == "cuda" else {"F32"}
    return {"ok": dtypes == want and small["ok"] and qlora["ok"], "export_dtypes": sorted(dtypes),
            "export_mb": round(size_mb, 1), "served_merged": small, "served_qlora_run": qlora}  # fmt: skip


def serve_and_generate(ctx: Context, source: list[str], port: int) -> dict:
    import httpx

    cmd = [sys.executable, "-m", "daytune", "--quiet", "serve", *source, "--device", ctx.sizes.device,
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ctx.env, cwd=ctx.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
    try:
        health = None
        while time.perf_counter() - t0 < 240 and proc.poll() is None:
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        if health is None:
            raise RuntimeError(
                f"server did not start: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
            )
        load_s = time.perf_counter() - t0
        body = {"prompt": "Below is an instruction.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n",
                "max_new_tokens": 16, "temperature": 1e-7, "echo_prompt": False}  # fmt: skip
        t1 = time.perf_counter()
        reply = httpx.post(f"{base}/process", json=body, timeout=120).json()
        return {"ok": health.get("device", "").startswith(ctx.sizes.device) and len(reply.get("tokens", [])) > 0,
                "device": health.get("device"), "load_seconds": round(load_s, 1),
                "request_seconds": round(time.perf_counter() - t1, 3), "tokens": len(reply.get("tokens", [])),
                "text": reply.get("text", "")[:80]}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- 7. FSDP2 ---------------------------------------------------------------------------------------------------------
def check_fsdp(ctx: Context) -> dict:
    path = recipe(ctx, "fsdp", ctx.work / "small", micro_batch=2, max_steps=3, checkpoint_every=1,
                  precision=ctx.sizes.fsdp_precision, grad_clip=1.0)  # fmt: skip
    if ctx.dry:  # accelerate shards only on accelerators: the tests' launcher forces FSDP2 over gloo
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                    str(ROOT / "tests" / "fsdp2_cpu.py")]  # fmt: skip
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(EXAMPLES / "accelerate" / "fsdp.yaml"), "--num_processes", "1", "-m", "daytune"]  # fmt: skip
    ctx.daytune("train", str(path), launcher=launcher)
    run = latest_run(ctx, "fsdp")
    ctx.daytune("train", str(path), "--resume", str(run), "--set", "train.max_steps=4", launcher=launcher)
    shards = list((run / "checkpoints").glob("step-*/optimizer-0.pt"))
    train = summary_of(run)
    return {"ok": train["steps"] == 4 and bool(shards), "sharded_checkpoints": len(shards),
            "steps": train["steps"], "final_loss": train["final_loss"], "processes": train["processes"]}  # fmt: skip


CHECKS = [
    ("environment", check_environment),
    ("small_model", check_small),
    ("liger_kernels", check_liger),
    ("slice_7b", check_slice),
    ("packed_attention", check_packed_attention),
    ("export_serve", check_export_serve),
    ("fsdp", check_fsdp),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same flow on the CPU with tiny models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    import tempfile

    sizes = DRY if args.dry_run else GPU
    with tempfile.TemporaryDirectory(prefix="daytune-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(sizes, work, args.dry_run)
        results, t_all = {}, time.perf_counter()
        for name, fn in CHECKS:
            check, t0 = Check(), time.perf_counter()
            try:
                details = fn(ctx)
                check.ok, check.details = bool(details.pop("ok")), details
            except Exception as e:  # noqa: BLE001 - every check reports, the next ones still run where they can
                check.error = f"{type(e).__name__}: {e}"
                check.details = {"traceback": traceback.format_exc()[-3000:]}
            check.seconds = round(time.perf_counter() - t0, 1)
            results[name] = asdict(check)
            print(
                f"{name:18s} {'ok' if check.ok else 'FAILED'}  {check.seconds:6.1f}s  {check.error or ''}",
                flush=True,
            )
        report = {"version": 1, "dry_run": args.dry_run, "seconds": round(time.perf_counter() - t_all, 1),
                  "ok": all(r["ok"] for r in results.values()), "checks": results,
                  "sizes": asdict(sizes)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(
        f"{'all checks passed' if report['ok'] else 'some checks FAILED'} in {report['seconds']:.0f}s: {args.out}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
