"""Where daytune's serving time goes on the vLLM benchmark's workload: the engine's own prefill and decode steps,
in process (no HTTP), profiled by op class, against the floor the same machine sets for the same arithmetic.

    python benchmarks/serve_profile.py [--rows 8] [--max-new-tokens 32] [--dtype float32|bfloat16] [--threads N]
                                       [--no-fast-path] [--out benchmarks/results/serve_profile.json]

`--rows` GSM8K prompts of benchmarks/serve_vllm.py (no shots, greedy, top-1 log-probability), prefilled as one
batch, then `--max-new-tokens` decode steps, exactly the calls the scheduler makes (engine.decode's `prefill`,
`decode_step`, `choose_tokens`) on SmolLM2-135M in `--dtype`, with the server's fast path (engine/fast.py; bf16 on a
CPU packs its weights for oneDNN) unless `--no-fast-path`. Written:

- wall time per decode step and of the prefill, and torch.profiler's self CPU time of the decode steps by op
  class (matmuls, attention, norms and activations, copies and layout, sampling and log-probabilities, other);
- the part of a decode step no op accounts for (Python, dispatch, transformers' mask and cache bookkeeping);
- the floor: the same step's linear layers alone, as one `torch.mm` per weight on the same rows (what a fused,
  compiled step such as vLLM's CPU backend cannot go under), and that floor against the measured step; the bytes of
  weights a step reads, and the rate at which the step and the floor read them (a decode step of a few rows streams
  every weight from memory once: no cache holds them).

Run it alone: it measures the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import prompts  # noqa: E402
from train_throughput import OP_CLASSES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE_CLASSES = {"sampling_logprobs": ("log_softmax", "argmax", "topk", "aten::item", "_local_scalar_dense"),
                 **{k: v for k, v in OP_CLASSES.items() if k != "loss"}}  # fmt: skip
SERVE_CLASSES["matmul"] += ("_linear_pointwise",)  # oneDNN on packed weights (bf16 on a CPU)
SERVE_CLASSES["norm_activation"] += ("rms_norm",)  # the fast path's fused RMSNorm


def op_class(name: str) -> str:
    for cls, keys in SERVE_CLASSES.items():
        if any(k in name for k in keys):
            return cls
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="requests decoded together (the benchmark's clients)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, help="torch threads (default: PyTorch's choice)")
    ap.add_argument(
        "--no-fast-path", action="store_true", help="transformers' forward, as before the fast path"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_profile.json")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from daytune.engine.decode import Sampling, choose_tokens, decode_step, prefill
    from daytune.engine.fast import enable_fast_path, fast_forward
    from daytune.models import load_model, load_tokenizer, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    folder = resolve_model("smollm2-135m")
    model, tok = load_model(folder, dtype=dtype).eval(), load_tokenizer(folder)
    fast = False if args.no_fast_path else enable_fast_path(model, log=print)
    ids = [tok(p)["input_ids"] for p in prompts(args.rows, 0)]
    greedy, k1 = [Sampling()] * len(ids), [1] * len(ids)

    def run(profiled: bool):
        t0 = time.perf_counter()
        pf = prefill(model, ids, pad_id=tok.pad_token_id or 0)
        chosen = choose_tokens(pf.logits, greedy, k1)
        t_prefill = time.perf_counter() - t0
        steps = []
        ctx = profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext()
        with ctx:
            for _ in range(args.max_new_tokens):
                t = time.perf_counter()
                logits = decode_step(model, pf.batch, [c[0] for c in chosen])
                chosen = choose_tokens(logits, greedy, k1)
                steps.append(time.perf_counter() - t)
        return t_prefill, steps, ctx

    run(False)  # warm-up: allocator, oneDNN primitives
    t_prefill, steps, _ = run(False)
    _, prof_steps, prof = run(True)
    by_class: dict[str, float] = {}
    other: dict[str, float] = {}
    for ev in prof.key_averages():
        cls = op_class(ev.key)
        by_class[cls] = by_class.get(cls, 0.0) + ev.self_cpu_time_total / 1e6
        if cls == "other":
            other[ev.key] = other.get(ev.key, 0.0) + ev.self_cpu_time_total / 1e6
    prof_wall = sum(prof_steps)

    # the floor: every linear layer of one decode step as one mm on `rows` rows, nothing else
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings().weight
    x = {w.shape[1]: torch.randn(len(ids), w.shape[1], dtype=dtype) for w in weights}
    with torch.no_grad():
        for _ in range(3):
            [torch.mm(x[w.shape[1]], w.t()) for w in weights]
        t = time.perf_counter()
        reps = 10
        for _ in range(reps):
            for w in weights:
                torch.mm(x[w.shape[1]], w.t())
        floor = (time.perf_counter() - t) / reps
    step = sorted(steps)[len(steps) // 2]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    result = {
        "benchmark": "serve_profile",
        "model": "smollm2-135m",
        "dtype": args.dtype,
        "fast_path": fast,
        "packed_linears": fast_forward(model).packed if fast else 0,
        "rows": len(ids),
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
        "prefill_seconds": round(t_prefill, 4),
        "decode_step_seconds": {
            "median": round(step, 4),
            "min": round(min(steps), 4),
            "max": round(max(steps), 4),
        },
        "tokens_per_s": round(len(ids) / step, 1),
        "profile": {
            "wall_seconds": round(prof_wall, 3),
            "op_self_seconds": {k: round(v, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "op_share_of_wall": {
                k: round(v / prof_wall, 4) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])
            },
            "unaccounted_share_of_wall": round(1 - sum(by_class.values()) / prof_wall, 4),
            "other_top": {k: round(v, 4) for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:8]},
            "note": "self CPU time of the ops in the profiled decode steps (profiler overhead included); "
            "unaccounted: wall time no op covers (Python, dispatch, transformers' bookkeeping)",
        },
        "floor": {
            "linear_layers": len(weights),
            "output_layer_shape": list(head.shape),
            "matmul_seconds_per_step": round(floor, 4),
            "step_over_floor": round(step / floor, 2),
            "weight_bytes_per_step": weight_bytes,
            "step_reads_gb_per_s": round(weight_bytes / step / 1e9, 2),
            "floor_reads_gb_per_s": round(weight_bytes / floor / 1e9, 2),
            "note": "one torch.mm per linear layer on the same rows: the arithmetic every engine does per step",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("prefill_seconds", "decode_step_seconds", "tokens_per_s")}))
    print("ops (share of wall):", result["profile"]["op_share_of_wall"])
    print("unaccounted:", result["profile"]["unaccounted_share_of_wall"], "floor:", result["floor"])


if __name__ == "__main__":
    main()
