"""Pinned behaviour: a fixed-seed tiny run's losses and adapter checksum, eval outputs and the server's greedy
tokens and logprobs. `python tests/pinned.py --record` writes tests/fixtures/pinned.json; test_pinned.py checks
that moving code around leaves every value as it was (torchtune's pinned-trajectory habit)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "pinned.json"


# instruction sets that change which oneDNN/MKL kernels run (and so how float sums round) within one capability
KERNEL_FLAGS = ("avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_kernel() -> str:
    """The torch build, its CPU capability, the CPU model and the flags above: two machines with one AVX512
    capability but another CPU (an AMX one, say) round differently, so exact pins hold only on the same kernel."""
    import platform

    import torch

    model, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    extra = "+".join(f for f in KERNEL_FLAGS if f in flags) or "-"
    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.cpu.get_cpu_capability()}, {model}, {extra}"


def tensors_checksum(path: Path) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (not the file: its metadata may change)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def train_trajectory(tmp: Path, model_dir: Path) -> dict:
    from conftest import write_tiny_recipe

    from daytune.cli import main

    recipe = write_tiny_recipe(
        tmp,
        model_dir,
        train={
            "micro_batch": 2,
            "grad_accum": 2,
            "max_steps": 10,
            "warmup_steps": 2,
            "checkpoint_every": 5,
            "lora": {"dropout": 0.1, "r": 4},
        },
        eval={},
    )
    assert main(["train", str(recipe)]) == 0
    (run,) = [p for p in (tmp / "runs").iterdir() if p.is_dir()]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in records if "loss" in r and r.get("step") is not None][:10]
    return {
        "losses": losses,
        "adapter_sha256": tensors_checksum(run / "adapter" / "adapter_model.safetensors"),
    }


def eval_outputs(tmp: Path, model_dir: Path) -> dict:
    from daytune.cli import main

    out = tmp / "eval"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--suite",
        "quick",
        "--max-instances",
        "2",
        "--bootstrap",
        "50",
    ]
    assert main([*args, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    pinned = {}
    for name, sc in sorted(res["scenarios"].items()):
        pinned[name] = {
            "metrics": {k: v.get("value") if isinstance(v, dict) else v for k, v in sc["metrics"].items()},
            "records": sc.get("records", sc.get("instances")),
        }
    return pinned


def server_outputs(model_dir: Path) -> list:
    from fastapi.testclient import TestClient

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel

    server = ServeModel(str(model_dir), device="cpu", log=lambda *a: None)
    requests = [
        {"prompt": "Natalia sold clips to", "max_new_tokens": 12, "temperature": 1e-7},
        {"prompt": "The answer is", "max_new_tokens": 10, "echo_prompt": True, "top_k_per_token": 3},
        {"prompt": "Weng earns $12 an hour", "max_new_tokens": 16, "stop_sequences": ["\n", "."]},
        {
            "prompt": "Q: 2+2? A:",
            "max_new_tokens": 8,
            "num_return_sequences": 2,
            "temperature": 0.8,
            "seed": 7,
        },
        # sampled from a near-uniform model: many different tokens through the detokenizer and the stop cutter
        {"prompt": "Janet", "max_new_tokens": 40, "temperature": 1.0, "seed": 3, "stop_sequences": ["ing"]},
        {"prompt": "Janet", "max_new_tokens": 40, "temperature": 1.0, "seed": 5, "top_k_per_token": 2},
    ]
    outs = []
    with TestClient(create_app(server)) as client:
        for body in requests:
            r = client.post("/process", json=body)
            assert r.status_code == 200, r.text
            j = r.json()
            j.pop("request_time", None)
            outs.append(j)
    return outs


def observe(tmp: Path, model_dir: Path) -> dict:
    (tmp / "train").mkdir(parents=True, exist_ok=True)
    return {
        "kernel": cpu_kernel(),
        "train": train_trajectory(tmp / "train", model_dir),
        "eval": eval_outputs(tmp, model_dir),
        "serve": server_outputs(model_dir),
    }


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    from conftest import build_tiny_model

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/pinned.py --record")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = build_tiny_model(tmp / "tiny")
        FIXTURE.write_text(json.dumps(observe(tmp, model_dir), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
