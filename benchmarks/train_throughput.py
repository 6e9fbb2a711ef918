"""Training throughput and peak memory: daytune's loop vs Hugging Face `Trainer`, same model, data and settings.

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--out benchmarks/results/train_throughput.json]

Both train LoRA r=8 on q/k/v/o of SmolLM2-135M in fp32 with micro-batch 4. Two workloads:
  packed   every sequence exactly 256 tokens, every token trained (pure compute: no padding, no masking)
  sft      the GSM8K instruction sample, chat template, loss on responses only, padded per batch (max 256)
Each (workload, trainer) runs in its own process so peak RSS is its own; the first `--warmup` steps are not timed.
Prints a table and writes JSON. Ratios matter, not absolute numbers: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "gsm8k_train.jsonl"
SEQ, MICRO, ROWS = 256, 4, 96


def build_examples(workload: str, tokenizer):
    from daytune.data import encode_records, read_instructions
    from daytune.data.tokenize import Example

    records = read_instructions(DATA, ROWS)
    if workload == "sft":
        examples, _ = encode_records(records, tokenizer, "chat", SEQ)
        return examples
    stream = []
    for r in records:
        stream += tokenizer(
            r["instruction"] + "\n" + r["output"] + tokenizer.eos_token, add_special_tokens=False
        )["input_ids"]
    return [Example(stream[i : i + SEQ], stream[i : i + SEQ]) for i in range(0, len(stream) - SEQ + 1, SEQ)]


def run_daytune(workload: str, steps: int, warmup: int) -> dict:
    import tempfile

    import daytune.train.loop as loop
    from daytune.config import RunConfig
    from daytune.models import load_tokenizer, resolve_model
    from daytune.track import RunDir

    path = resolve_model("smollm2-135m")
    tok = load_tokenizer(path)
    examples = build_examples(workload, tok)
    loop.encode_records = lambda *a, **k: (
        examples,
        type("S", (), {"truncated": 0})(),
    )  # same examples as the peer
    cfg = RunConfig(model=str(path))
    cfg.data.train = str(DATA)
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.max_steps = MICRO, 1, steps + warmup
    cfg.train.precision, cfg.train.checkpoint_every, cfg.train.warmup_steps = "32-true", 10_000, 1
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir.create(tmp, "bench")
        loop.train(cfg, run)
        metrics = run.read_metrics()[warmup:]
    tokens = sum(m["tokens"] for m in metrics)
    seconds = sum(m["step_seconds"] for m in metrics)
    return {"tokens": tokens, "seconds": seconds}


def run_hf_trainer(workload: str, steps: int, warmup: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from daytune.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m")
    tok = load_tokenizer(path)
    examples = build_examples(workload, tok)
    model = get_peft_model(
        load_model(path),
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = (
                torch.tensor(r["input_ids"]),
                torch.tensor(r["labels"]),
                1,
            )
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    timings = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timings.append(time.perf_counter() - self.t0)

    tokens_per_step = []
    real_collate = collate

    def counting_collate(rows):
        batch = real_collate(rows)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        return batch

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=1,
            max_steps=steps + warmup,
            learning_rate=3e-4,
            warmup_steps=1,
            lr_scheduler_type="cosine",
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=counting_collate, callbacks=[Timer()]
        ).train()
    return {"tokens": sum(tokens_per_step[warmup : warmup + steps]), "seconds": sum(timings[warmup:])}


def child(trainer: str, workload: str, steps: int, warmup: int) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    fn = run_daytune if trainer == "daytune" else run_hf_trainer
    result = fn(workload, steps, warmup)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads", default="packed,sft")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    ap.add_argument("--child", nargs=2, metavar=("TRAINER", "WORKLOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.steps, args.warmup)
        return
    env = dict(
        os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    rows = []
    for workload in args.workloads.split(","):
        for trainer in ("hf-trainer", "daytune"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                trainer,
                workload,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"{trainer}/{workload} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[-1][7:])
            r.update(trainer=trainer, workload=workload, tokens_per_s=r["tokens"] / r["seconds"])
            rows.append(r)
            print(
                f"{workload:7s} {trainer:11s} {r['tokens_per_s']:8.1f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    summary = {}
    for workload in args.workloads.split(","):
        hf = next(r for r in rows if r["workload"] == workload and r["trainer"] == "hf-trainer")
        dt = next(r for r in rows if r["workload"] == workload and r["trainer"] == "daytune")
        summary[workload] = {
            "speedup": round(dt["tokens_per_s"] / hf["tokens_per_s"], 3),
            "memory_ratio": round(dt["peak_rss_mb"] / hf["peak_rss_mb"], 3),
        }
        print(
            f"{workload:7s} daytune / HF Trainer: {summary[workload]['speedup']:.2f}x tokens/s, "
            f"{summary[workload]['memory_ratio']:.2f}x peak RSS"
        )
    import torch

    report = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {
            "model": "smollm2-135m",
            "method": "lora r=8 q,k,v,o",
            "precision": "fp32",
            "seq_len": SEQ,
            "micro_batch": MICRO,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
        },
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
