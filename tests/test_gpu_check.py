"""benchmarks/gpu_check.sh, the one script the first GPU day runs: its --dry-run (the same flow on the CPU with
tiny models) keeps it from rotting, and the wheels it brings to a machine without a package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, timeout=1500)  # fmt: skip
    report = json.loads(out.read_text())
    failed = {k: v["error"] or v["details"] for k, v in report["checks"].items() if not v["ok"]}
    assert run.returncode == 0 and report["ok"], (failed, run.stdout[-2000:], run.stderr[-2000:])
    checks = report["checks"]
    assert list(checks) == [
        "environment",
        "small_model",
        "liger_kernels",
        "slice_7b",
        "packed_attention",
        "export_serve",
        "fsdp",
    ]
    assert report["dry_run"] and checks["slice_7b"]["details"]["killed_at_step"] >= 3
    assert checks["liger_kernels"]["details"]["fell_back_to_pytorch"]  # Triton kernels need CUDA
    assert checks["slice_7b"]["details"]["resumed_losses_rel_diff"] < 1e-4  # CPUs are deterministic
    memory = checks["slice_7b"]["details"]["memory"]
    assert memory["predicted_mb"] > 0 and memory["full_7b_predicted_mb"] > memory["predicted_mb"]
    attention = checks["packed_attention"]["details"]
    assert attention["examples"] > attention["rows"]  # rows really hold several examples
    assert attention["varlen"]["loss"] == pytest.approx(attention["unpacked_loss"], rel=1e-4)
    assert checks["export_serve"]["details"]["served_qlora_run"]["tokens"] > 0
    assert checks["fsdp"]["details"]["sharded_checkpoints"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_gpu_check_says_when_no_python_has_cuda(tmp_path):
    env = dict(os.environ, GPU_PYTHON=sys.executable)
    run = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                         text=True, env=env, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "no Python here has a PyTorch that can use CUDA" in run.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_wheels_keep_one_cuda_library_of_bitsandbytes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_wheels import requirements, slim_bitsandbytes

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu.so", "cuda118.so", "cuda128.so", "cuda130.so", "rocm64.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}", b"\0" * 100)
        record = ["bitsandbytes/__init__.py,,"] + [f"bitsandbytes/libbitsandbytes_{lib},," for lib in libs]
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(record) + "\n")
    slim_bitsandbytes(tmp_path, "128")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kept_record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {n for n in names if ".so" in n} == {
        f"bitsandbytes/libbitsandbytes_{x}" for x in ("cpu.so", "cuda128.so")
    }
    assert "cuda118" not in kept_record and "cuda128" in kept_record
    pins = requirements({"numpy"})
    names = {p.split("==")[0] for p in pins}
    # PyTorch and its CUDA libraries are the GPU machine's own; NVML's Python binding is not one of them
    assert not names & {"torch", "triton", "numpy"}
    assert {n for n in names if n.startswith("nvidia-")} == {"nvidia-ml-py"}
    assert {"transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel"} <= names
