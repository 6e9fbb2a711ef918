"""What daytune's CPU dropout masks are worth: LoRA training steps with PyTorch's `nn.Dropout` and with
`train/dropout.py`'s `CPUDropout`, alternated in one process on the same micro-batches.

    python benchmarks/lora_dropout.py [--reps 3] [--steps 3] [--micro-batch 2] [--precision 32-true|bf16-true]

The step is the training loop's own parts (make_batch, response_loss, AdamW) on the training benchmark's settings
(SmolLM2-135M, GSM8K sample packed into 512-token rows, LoRA r=16 on all linear layers, dropout 0.05). Separate
processes, as train_throughput.py runs its rows, drift by several percent on a shared machine: here each repetition
times both variants back to back on the same batches, and the ratio is of their sums after one untimed warm-up
step each. Writes benchmarks/results/lora_dropout_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per variant and repetition")
    ap.add_argument("--micro-batch", type=int, default=2, help="packed rows per step (the benchmark's: 2)")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-true"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_dropout_cpu.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    import train_throughput as tt

    from daytune.data import encode_records
    from daytune.data.batching import BatchPlan, make_batch
    from daytune.engine.loss import response_loss
    from daytune.models import load_tokenizer
    from daytune.models.trained import load_base_for_training
    from daytune.train import methods
    from daytune.train.dropout import CPUDropout, use_cpu_dropout

    cfg = tt.daytune_config(False, "cpu", args.steps, 1, False, False)
    tc, path = cfg.train, Path(cfg.model)
    tc.micro_batch, tc.grad_accum = args.micro_batch, 1
    dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16
    device = torch.device("cpu")
    tok = load_tokenizer(path)
    model = methods.prepare_for_training(load_base_for_training(path, tc, dtype, device), tc, path)
    model.train()
    opt = methods.make_optimizer([p for p in model.parameters() if p.requires_grad], tc, device)
    examples, _ = encode_records(tt.records(), tok, "chat", tt.SEQ)
    plan = BatchPlan([len(e.input_ids) for e in examples], tc.micro_batch, tc.seed, tt.SEQ, packing=True)
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    torch_drop = {m: m.lora_dropout["default"] for m in layers}

    def use(variant: str) -> None:
        if variant == "daytune":
            use_cpu_dropout(model)
        else:
            for m, d in torch_drop.items():
                m.lora_dropout["default"] = d
        kinds = {type(m.lora_dropout["default"]) for m in layers}
        assert kinds == ({CPUDropout} if variant == "daytune" else {torch.nn.Dropout}), kinds

    def step(k: int) -> None:
        batch = make_batch(plan, examples, plan.get(k), tok.pad_token_id)
        batch.pop("n_tokens", None)
        loss, n = response_loss(model, batch)
        (loss / max(1, n)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds: dict[str, list[float]] = {"torch": [], "daytune": []}
    for variant in seconds:  # one untimed step each: allocator and caches warm for both
        use(variant)
        step(0)
    for r in range(args.reps):
        first = 1 + r * args.steps
        for variant in ("torch", "daytune") if r % 2 == 0 else ("daytune", "torch"):
            use(variant)
            t = time.perf_counter()
            for k in range(first, first + args.steps):  # the same micro-batches for both variants
                step(k)
            seconds[variant].append(round(time.perf_counter() - t, 3))
    ratio = round(sum(seconds["torch"]) / sum(seconds["daytune"]), 3)
    result = {
        "benchmark": "lora_dropout",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_bf16": tt.cpu_bf16_flags(),
        },  # fmt: skip
        "settings": {
            "model": path.name,
            "lora": tt.LORA,
            "max_seq_len": tt.SEQ,
            "micro_batch": args.micro_batch,
            "precision": args.precision,
            "steps_per_rep": args.steps,
            "reps": args.reps,
            "layers": len(layers),
        },  # fmt: skip
        "seconds": seconds,
        "step_seconds": {k: round(sum(v) / (len(v) * args.steps), 3) for k, v in seconds.items()},
        "speedup": ratio,  # PyTorch's dropout time / daytune's, same steps
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
