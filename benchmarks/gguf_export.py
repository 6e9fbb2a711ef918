"""GGUF export per quantization: file size, export and load times, and how far llama.cpp agrees with transformers.

    python benchmarks/gguf_export.py [--model smollm2-135m] [--quants f16 q8_0 q4_k_m] [--steps 4] [--tokens 48]
                                     [--prompts 8] [--out benchmarks/results/gguf_export.json]

Trains a short LoRA run on `--model` (the GSM8K sample), then for each quantization runs `daytune export --format
gguf` and loads the file with llama.cpp (tests/llama_check.py in the llama.cpp venv, `make llama-venv`). Against
transformers on the merged model (fp32) it measures, over `--prompts` GSM8K questions in the chat template:
greedy agreement (tokens until the first difference, of `--tokens`), teacher-forced top-1 agreement and the mean
KL divergence (nats/token) along the transformers greedy continuation, and llama.cpp's load time. The round trip
loads the file back into daytune (a fresh cache: GGUF -> safetensors) and times it. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "examples" / "data" / "gsm8k_test.jsonl"
# what the export tests compare with: transformers' greedy tokens, and llama.cpp's view of a file (llama_check.py)
from test_export_gguf import hf_greedy, llama  # noqa: E402


def train(folder: Path, model: str, steps: int):
    from conftest import write_tiny_recipe
    from test_train import new_run

    from daytune.config import load_run_config
    from daytune.pipeline import train_run

    cfg = load_run_config(write_tiny_recipe(folder, model, train={"max_steps": steps, "micro_batch": 2}))
    run = new_run(cfg)
    train_run(cfg, run)
    return run


def kl_and_top1(model, seq: list[int], prompt_len: int, theirs: np.ndarray) -> tuple[float, float]:
    """Mean KL(transformers || llama.cpp) and top-1 agreement over the positions that predict the continuation."""
    with torch.no_grad():
        ours = model(torch.tensor([seq])).logits[0, prompt_len - 1 : -1].double()
    their = torch.from_numpy(theirs[prompt_len - 1 : -1]).double()
    p, q = torch.log_softmax(ours, -1), torch.log_softmax(their, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return kl, (ours.argmax(-1) == their.argmax(-1)).double().mean().item()


def tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (k-quants fall back where a row is not 256 wide)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(gguf).tensors))


def round_trip(gguf: Path, tmp: Path) -> float:
    """Seconds for daytune to load the file back (GGUF -> safetensors, into a fresh cache)."""
    env = {**os.environ, "DAYTUNE_HOME": str(tmp / "home")}
    code = f"from daytune.models import resolve_model, load_model; load_model(resolve_model({str(gguf)!r}))"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_export.json"))
    args = ap.parse_args()

    from daytune.cli import main as cli
    from daytune.models import load_for_inference
    from daytune.track.runs import model_source

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    run = train(work, args.model, args.steps)
    model, tok, _ = load_for_inference(model_source(run.path), merge=True, log=lambda *a: None)
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[: args.prompts]]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False, add_generation_prompt=True)
        for r in rows
    ]  # fmt: skip
    ids = [tok(t).input_ids for t in texts]
    expected = [hf_greedy(model, i, args.tokens) for i in ids]
    results = []
    for quant in args.quants:
        out = work / quant
        t0 = time.monotonic()
        assert (
            cli(["--quiet", "export", str(run.path), "--format", "gguf", "--quant", quant, "--out", str(out)])
            == 0
        )
        export_seconds = time.monotonic() - t0
        record = json.loads((out / "export.json").read_text())
        gguf = out / record["file"]
        scratch = work / f"llama-{quant}"
        scratch.mkdir()
        seqs = [i + e for i, e in zip(ids, expected)]
        got = llama(gguf, scratch, texts, args.tokens, seqs)
        runs = [
            next((k for k, (a, b) in enumerate(zip(e, g)) if a != b), len(e))
            for e, g in zip(expected, got["greedy"])
        ]
        kls, top1 = zip(*(kl_and_top1(model, s, len(i), t) for s, i, t in zip(seqs, ids, got["logits"])))
        row = {
            "quant": quant,
            "bytes": record["bytes"],
            "mib": round(record["bytes"] / 2**20, 1),
            "export_seconds": round(export_seconds, 1),
            "llama_cpp_load_seconds": round(got["load_seconds"], 3),
            "llama_cpp_repacked": got["repacked"],  # False on an AMX CPU (see tests/llama_check.py)
            "daytune_load_seconds": round(round_trip(gguf, scratch), 1),
            "tensor_types": tensor_types(gguf),
            "tokenization_equal": got["tokens"] == ids,
            "greedy_tokens_agreeing": runs,
            "greedy_all_agree": sum(r == args.tokens for r in runs),
            "greedy_median_agreeing": statistics.median(runs),
            "teacher_forced_top1": round(statistics.mean(top1), 4),
            "mean_kl_nats": float(f"{statistics.mean(kls):.3g}"),
        }  # fmt: skip
        print(json.dumps(row))
        results.append(row)
    report = {
        "benchmark": "gguf_export",
        "model": args.model,
        "run_steps": args.steps,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "llama_cpp": record["llama_cpp"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "note": "2-core machine shared with other work: times are indicative",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
