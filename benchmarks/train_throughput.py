"""Training throughput, memory and MFU: daytune vs the Hugging Face path most users take, side by side, one run.

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--runners ...] [--device cpu|cuda]

Same model (SmolLM2-135M; on --device cuda a ~1B Llama built from a config with random weights), same data (the
GSM8K train sample, its natural length spread, chat template, loss on answers), LoRA r=16 on all linear layers,
max_seq_len 512, 8 sequences per optimizer step. Equal settings: fp32 on CPU (bf16 on GPU), no gradient
checkpointing:

  trl-sft          TRL SFTTrainer + PEFT, its default batching (pad to the longest in each batch)
  trl-sft-packed   the same with TRL's own packing turned on (packing=True)
  daytune-lora     daytune, packing on
  trainer-full     full fine-tuning with TRL SFTTrainer (HF Trainer underneath), default batching
  daytune-full     full fine-tuning with daytune, packing on

Each tool's own defaults for the machine (same model, data, LoRA and sequences per step; what a user gets without
choosing): TRL's SFTConfig turns gradient checkpointing on and bf16 (autocast) on wherever bf16 is available,
daytune's `precision: auto` measures fp32 against bf16 on the device and keeps the faster (bf16-true on a CPU with
AVX512-BF16):

  trl-sft-defaults      TRL SFTTrainer, SFTConfig's defaults for gradient checkpointing, bf16 and packing
  daytune-lora-defaults daytune, precision auto (the resolved precision is recorded)
  daytune-lora-compile  daytune fp32 with train.compile: true; the steps that compiled are left out of the timed
                        steps and reported as compile_seconds
  trl-sft-compile       TRL SFTTrainer fp32 with TrainingArguments' torch_compile=True (the whole model), its
                        warm-up steps absorbing the compilation: the compiled peer of daytune-lora-compile

Each runner is its own process (its peak RSS is its own). Useful tokens = non-padding tokens. MFU = model FLOPs per
useful token x tokens/s / the fp32 (bf16 on GPU) matmul peak measured at the start of this run. Model FLOPs per
token (daytune.track.flops, the count the run store logs): 2N forward + 2N backward through frozen weights (+2N
weight gradients for full fine-tuning), N = parameters in matmuls (embedding lookup excluded, output layer
included), plus attention forward and backward. Writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "gsm8k_train.jsonl"
SEQ, ROWS, SEQS_PER_STEP = 512, 400, 8
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
RUNNERS = ["trl-sft", "trl-sft-packed", "daytune-lora", "trainer-full", "daytune-full"]
DEFAULT_RUNNERS = ["trl-sft-defaults", "daytune-lora-defaults"]
ALL_RUNNERS = RUNNERS + DEFAULT_RUNNERS + ["daytune-lora-compile", "trl-sft-compile"]


def model_path(device: str) -> Path:
    from daytune.models import resolve_model

    if device == "cpu":
        return resolve_model("smollm2-135m", log=lambda *a: None)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / "daytune-bench-llama-1b"
    if not (folder / "config.json").is_file():
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=49152,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(cfg).save_pretrained(folder)
        tok_src = resolve_model("smollm2-135m", log=lambda *a: None)
        AutoTokenizer.from_pretrained(tok_src).save_pretrained(folder)
    return folder


def matmul_peak_gflops(device: str, dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def cpu_bf16_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx512f")})


def records():
    from daytune.data import read_instructions

    return read_instructions(DATA, ROWS)


# ---- runners (each in its own process) ---------------------------------------------------------------------------
def daytune_config(full: bool, device: str, steps: int, warmup: int, defaults: bool, compile_: bool):
    from daytune.config import RunConfig

    cfg = RunConfig(model=str(model_path(device)))
    cfg.data.train, cfg.data.max_seq_len, cfg.data.packing = str(DATA), SEQ, True
    tc = cfg.train
    tc.method = "full" if full else "lora"
    tc.lora.r, tc.lora.alpha, tc.lora.dropout, tc.lora.targets = (
        LORA["r"],
        LORA["alpha"],
        LORA["dropout"],
        LORA["targets"],
    )
    tc.micro_batch, tc.grad_accum = 2, 2  # 2 packed rows of 512 ~ 4-5 examples each micro-batch: ~8 per step
    tc.max_steps, tc.warmup_steps, tc.checkpoint_every = steps + warmup, 1, 10_000
    tc.precision = "auto" if defaults else "32-true" if device == "cpu" else "bf16-true"
    tc.compile = compile_
    tc.device = device
    return cfg


def run_daytune(
    full: bool, device: str, steps: int, warmup: int, defaults: bool = False, compile_: bool = False
) -> dict:
    from daytune.pipeline import train_run
    from daytune.track import RunDir

    cfg = daytune_config(full, device, steps, warmup, defaults, compile_)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "bench")
        result = train_run(cfg, run)
        everything = run.read_metrics()
    compiling = [m for m in everything if m.get("compiling")]
    metrics = [m for m in everything[warmup:] if not m.get("compiling")]
    out = {
        "tokens": sum(m["tokens"] for m in metrics),
        "seconds": sum(m["step_seconds"] for m in metrics),
        "steps": len(metrics),
        "padding": sum(m["padding"] for m in metrics) / len(metrics),
        "precision": result.precision,
    }
    if compile_:  # what compiling cost: the compiling steps' time beyond a steady step's
        steady = out["seconds"] / max(1, out["steps"])
        out["compile_seconds"] = round(sum(m["step_seconds"] - steady for m in compiling), 1)
        out["compiling_steps"] = len(compiling)
    return out


OP_CLASSES = {  # aten op name fragments -> class, first match wins
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),  # before attention: "_log_softmax" has "_softmax"
    "attention": ("scaled_dot_product", "flash_attention", "_softmax", "softmax_backward"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn_linear"),
    "norm_activation": ("pow", "rsqrt", "mean", "silu", "aten::mul", "aten::add", "aten::div", "aten::neg",
                        "aten::cat", "aten::sum", "aten::exp", "aten::sigmoid"),
    "copies_layout": ("copy_", "aten::to", "contiguous", "clone", "transpose", "view", "reshape", "expand",
                      "index", "slice", "select", "masked", "fill_", "zero_", "empty", "cat"),
}  # fmt: skip


def op_class(name: str, shapes: list) -> str:
    """The class of one profiled op; a matmul with a LoRA rank dimension is the LoRA branch."""
    for cls, keys in OP_CLASSES.items():
        if any(k in name for k in keys):
            if cls == "matmul" and any(LORA["r"] in (s or []) for s in shapes):
                return "lora_matmul"
            return cls
    return "other"


def profile_daytune(device: str, steps: int, warmup: int) -> dict:
    """Where a daytune-lora step's time goes: wall time of data, forward + loss, backward and optimizer over
    `steps` steps, and torch.profiler's self time of forward + backward by op class. The step is the loop's own
    parts (make_batch, response_loss, AdamW) on the daytune-lora settings, fp32 on CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from daytune.data import encode_records
    from daytune.data.batching import BatchPlan, make_batch
    from daytune.engine.loss import response_loss
    from daytune.models import load_tokenizer
    from daytune.models.trained import load_base_for_training
    from daytune.train import methods
    from daytune.train.dropout import use_cpu_dropout

    cfg = daytune_config(False, device, steps, warmup, False, False)
    tc, path = cfg.train, Path(cfg.model)
    dev = torch.device(device)
    tok = load_tokenizer(path)
    model = methods.prepare_for_training(load_base_for_training(path, tc, torch.float32, dev), tc, path)
    if device == "cpu":
        use_cpu_dropout(model)  # as the loop does on a CPU (train/dropout.py)
    model.train()
    opt = methods.make_optimizer([p for p in model.parameters() if p.requires_grad], tc, dev)
    examples, _ = encode_records(records(), tok, "chat", SEQ)
    plan = BatchPlan([len(e.input_ids) for e in examples], tc.micro_batch, tc.seed, SEQ, packing=True)
    wall = dict.fromkeys(("data", "forward_loss", "backward", "optimizer"), 0.0)

    def step(k: int, timed: bool) -> None:
        for j in range(tc.grad_accum):
            t0 = time.perf_counter()
            batch = make_batch(plan, examples, plan.get(k * tc.grad_accum + j), tok.pad_token_id)
            batch = {key: v.to(dev) for key, v in batch.items() if key != "n_tokens"}
            t1 = time.perf_counter()
            loss, n = response_loss(model, batch)
            t2 = time.perf_counter()
            (loss / max(1, n)).backward()
            t3 = time.perf_counter()
            if timed:
                wall["data"] += t1 - t0
                wall["forward_loss"] += t2 - t1
                wall["backward"] += t3 - t2
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timed:
            wall["optimizer"] += time.perf_counter() - t4

    for k in range(warmup):
        step(k, False)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for k in range(warmup, warmup + steps):
            step(k, True)
    by_class: dict[str, float] = {}
    other: dict[str, float] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        cls = op_class(ev.key, list(ev.input_shapes or []))
        by_class[cls] = by_class.get(cls, 0.0) + ev.self_cpu_time_total / 1e6
        if cls == "other":
            other[ev.key] = other.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
    total = sum(by_class.values())
    total_wall = sum(wall.values())
    return {
        "profiled_steps": steps,
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "wall_share": {k: round(v / total_wall, 4) for k, v in wall.items()},
        "op_self_seconds": {k: round(v, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "op_share": {k: round(v / total, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "other_top": {k: round(v, 3) for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:8]},
        "note": "self CPU time of all ops inside the profiled steps (profiler overhead included); "
        "optimizer ops are in it too (AdamW's foreach kernels count under norm_activation/other)",
    }


def run_trl(
    full: bool,
    packing: bool,
    device: str,
    steps: int,
    warmup: int,
    defaults: bool = False,
    compile_: bool = False,
) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = model_path(device)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [
        {
            "prompt": [{"role": "user", "content": r["instruction"]}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in records()
    ]
    # its defaults: the weights in fp32, bf16 autocast on top (SFTConfig's bf16=True)
    dtype = torch.float32 if device == "cpu" or defaults else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    peft_config = (
        None
        if full
        else LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    )
    from daytune.train.compile import graphs_compiled

    timings, tokens, compiling = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0, self.graphs = time.perf_counter(), graphs_compiled()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - self.t0)
            compiling.append(graphs_compiled() > self.graphs)  # torch_compile: a step that compiled

    # equal settings: precision and checkpointing set as daytune's row; defaults: SFTConfig's own
    chosen = {} if defaults else {"bf16": device != "cpu", "gradient_checkpointing": False}
    if compile_:
        chosen["torch_compile"] = True
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_length=SEQ,
            packing=packing,
            per_device_train_batch_size=2 if packing else 4,
            gradient_accumulation_steps=2,
            max_steps=steps + warmup,
            learning_rate=2e-4,
            warmup_steps=1,
            logging_steps=10_000,
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            disable_tqdm=True,
            seed=42,
            **chosen,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        collate = trainer.data_collator

        def counting(batch):
            out = collate(batch)
            mask = out.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(out["input_ids"].numel()))
            return out

        trainer.data_collator = counting
        trainer.train()
        settings = {
            "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "torch_compile": args.torch_compile,
        }
    per_step = [sum(tokens[i * 2 : i * 2 + 2]) for i in range(len(timings))]
    # the timed steps: after the warm-up, and (torch_compile) none that compiled, as for daytune's compiled row
    timed = [i for i in range(warmup, len(timings)) if not compiling[i]]
    out = {
        "tokens": sum(per_step[i] for i in timed),
        "seconds": sum(timings[i] for i in timed),
        "steps": len(timed),
        "settings": settings,
    }
    if compile_:
        steady = out["seconds"] / max(1, out["steps"])
        out["compile_seconds"] = round(sum(t - steady for t, c in zip(timings, compiling) if c), 1)
        out["compiling_steps"] = sum(compiling)
    return out


def child(runner: str, device: str, steps: int, warmup: int) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    defaults = runner.endswith("-defaults")
    if runner == "profile":
        print("PROFILE " + json.dumps(profile_daytune(device, 2, 1)), flush=True)
        return
    if runner.startswith("daytune"):
        result = run_daytune(
            runner.endswith("full"), device, steps, warmup, defaults, runner.endswith("compile")
        )
    else:
        result = run_trl(
            runner == "trainer-full",
            runner == "trl-sft-packed",
            device,
            steps,
            warmup,
            defaults,
            runner.endswith("compile"),
        )
    import torch

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":  # what limits a GPU run: CUDA memory, not the host process's RSS
        result["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--runners",
        default=",".join(RUNNERS + DEFAULT_RUNNERS),
        help=f"comma-separated, of {', '.join(ALL_RUNNERS)} (daytune-lora-compile is not in the default list: "
        "its compilation takes minutes)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile two daytune-lora steps: wall time by phase, self time by op class (into the JSON)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.steps, args.warmup)
        return
    import torch
    from transformers import AutoConfig

    from daytune.track.flops import flops_per_token

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    peak = matmul_peak_gflops(args.device, dtype)
    config = AutoConfig.from_pretrained(model_path(args.device))
    print(f"matmul peak ({dtype}, {args.device}): {peak:.1f} GFLOP/s", flush=True)
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
    )
    rows = []
    for runner in args.runners.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            runner,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(f"{runner} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[-1][7:])
        full = runner.endswith("full")
        tps = r["tokens"] / r["seconds"]
        r.update(
            runner=runner,
            tokens_per_s=round(tps, 2),
            step_seconds=round(r["seconds"] / max(1, r["steps"]), 3),
            mfu=round(tps * flops_per_token(config, full, SEQ) / (peak * 1e9), 4),
        )
        rows.append(r)
        memory = f"peak GPU {r['peak_gpu_reserved_mb']:6.0f} MB" if args.device == "cuda" else (
            f"peak RSS {r['peak_rss_mb']:6.0f} MB")  # fmt: skip
        print(
            f"{runner:15s} {tps:8.1f} useful tok/s  step {r['step_seconds']:6.2f}s  MFU {r['mfu']:6.1%}  {memory}",
            flush=True,
        )
    by = {r["runner"]: r for r in rows}
    profile = None
    if args.profile:
        cmd = [sys.executable, __file__, "--child", "profile", "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("PROFILE ")]
        if out.returncode != 0 or not line:
            print(f"profile failed:\n{out.stderr[-3000:]}", flush=True)
        else:
            profile = json.loads(line[-1][8:])
            print(
                f"profile (daytune-lora): wall {profile['wall_share']}; ops {profile['op_share']}", flush=True
            )

    def ratio(a, b, key="tokens_per_s"):
        return round(by[a][key] / by[b][key], 3) if a in by and b in by else None

    mem = "peak_gpu_reserved_mb" if args.device == "cuda" else "peak_rss_mb"
    summary = {
        "lora_speedup": ratio("daytune-lora", "trl-sft"),
        "lora_speedup_vs_packed": ratio("daytune-lora", "trl-sft-packed"),
        "lora_rss_ratio": ratio("daytune-lora", "trl-sft", mem),  # GPU memory on CUDA
        "lora_speedup_defaults": ratio("daytune-lora-defaults", "trl-sft-defaults"),
        "lora_compile_speedup": ratio("daytune-lora-compile", "daytune-lora"),
        "lora_compiled_vs_trl_compiled": ratio("daytune-lora-compile", "trl-sft-compile"),
        "full_speedup": ratio("daytune-full", "trainer-full"),
        "full_rss_ratio": ratio("daytune-full", "trainer-full", mem),
        "targets": {
            "lora_speedup": 1.5,
            "lora_speedup_vs_packed": 1.5,
            "lora_speedup_defaults": 1.5,
            "lora_rss_ratio": 0.8,
            "full_speedup": 1.3,
        },
    }
    for k, v in summary.items():
        if k != "targets":
            print(f"{k:24s} {v}")
    report = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "cpu_bf16": cpu_bf16_flags(),  # which bf16 kernels this CPU has: the defaults rows depend on it
        },
        "settings": {
            "model": str(model_path(args.device).name),
            "lora": LORA,
            "max_seq_len": SEQ,
            "sequences_per_step": SEQS_PER_STEP,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "matmul_peak_gflops": round(peak, 1),
        },
        "rows": rows,
        "summary": summary,
        "profile": profile,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"train_throughput_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
