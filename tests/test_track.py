"""Tracking: the run store after a tiny run, W&B offline and MLflow holding the same numbers, a failing backend
contained, FLOPs, the doctor, run ids, and the HTML report in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daytune.config import load_run_config
from daytune.pipeline import run_recipe
from daytune.progress import Reporter
from daytune.track import RunDir
from daytune.track.tracker import BACKEND_NAMES, backend_metrics


def _run(recipe_path, argv=("daytune", "run")) -> RunDir:
    return run_recipe(load_run_config(recipe_path), list(argv), Reporter(quiet=True))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One tiny run with both backends on (W&B offline, MLflow on SQLite), trained and evaluated."""
    import os

    from conftest import write_tiny_recipe

    tmp = tmp_path_factory.mktemp("tracked")
    os.environ["WANDB_MODE"] = "offline"  # never the network
    path = write_tiny_recipe(
        tmp,
        tiny_model_dir,
        data={"max_rows": 24, "max_seq_len": 192},
        train={"max_steps": 3, "lr": 2e-4},
        eval={"heldout_rows": 4, "multiple_choice_rows": 4},
        track={"backends": ["wandb", "mlflow"], "system_every": 0.2, "wandb": {"log_model": "all"}},
    )
    try:
        yield _run(path)
    finally:
        os.environ.pop("WANDB_MODE", None)


def test_run_store_records_everything(tracked_run):
    p = tracked_run.path
    for name in (
        "config.yaml",
        "command.txt",
        "git.txt",
        "git.diff",
        "env.json",
        "lineage.json",
        "tracking.json",
    ):
        assert (p / name).is_file(), name
    assert (p / "code" / "daytune" / "train" / "loop.py").is_file()  # the code that ran
    assert (p / "code" / "daytune" / "track" / "tracker.py").read_text() == (
        Path(__file__).parents[1] / "src" / "daytune" / "track" / "tracker.py"
    ).read_text()
    env = json.loads((p / "env.json").read_text())
    for key in ("python", "torch", "cuda", "device_name", "packages", "key_packages", "torch_threads"):
        assert key in env
    assert env["key_packages"]["torch"] and env["packages"]["transformers"]
    assert "commit: " in (p / "git.txt").read_text() or "not a git repository" in (p / "git.txt").read_text()

    metrics = tracked_run.read_metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "flops", "mfu", "elapsed"):
            assert m[key] is not None and m[key] >= 0, key
        assert "budget_left" in m and 0 <= m["data_seconds"] <= m["step_seconds"]
        assert m["samples"] == 4 and m["flops"] > 0 and 0 < m["mfu"] < 1
    assert metrics[-1]["total_tokens"] == sum(m["tokens"] for m in metrics)

    system = tracked_run.read_system()
    assert len(system) >= 2
    assert all(s["rss_mb"] > 0 and "cpu_percent" in s for s in system)

    lineage = json.loads((p / "lineage.json").read_text())
    sha = lineage["dataset"]["fingerprint"]
    assert sha.startswith("sha256:") and len(sha) == 71 and lineage["dataset"]["train"]["bytes"] > 0
    assert tracked_run.read_summary()["data"]["fingerprint"] == sha  # the data stage's own fingerprint
    assert [c["step"] for c in lineage["checkpoints"]] == [2, 3]
    (output,) = lineage["outputs"]
    assert output["path"] == "adapter" and "adapter_model.safetensors" in output["files"]
    (evaluation,) = lineage["evaluations"]
    assert evaluation["headline"]["eval/tuned/multiple_choice_accuracy"] >= 0
    assert evaluation["datasets"]["heldout"]["sha256"]

    doctor = json.loads((p / "doctor.json").read_text())
    checks = {f["check"] for f in doctor["findings"]}
    assert {"data_wait", "padding", "device_utilization", "memory_headroom", "budget"} <= checks


def _wandb_records(path: Path):
    """Records of a .wandb file (W&B's LevelDB-style log of protobuf records), with W&B's own protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full, or last fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_holds_the_run_store_numbers(tracked_run):
    tracking = json.loads((tracked_run.path / "tracking.json").read_text())
    ref = tracking["backends"]["wandb"]
    assert ref["mode"] == "offline" and "error" not in ref
    run_dir = Path(ref["dir"])
    assert run_dir.is_dir() and run_dir.parent == tracked_run.path / "wandb"
    (wandb_file,) = run_dir.glob("run-*.wandb")
    history, artifacts, summary = {}, [], {}
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "artifact":
            artifacts.append((rec.artifact.type, json.loads(rec.artifact.metadata)))
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update if i.key})
    metrics = tracked_run.read_metrics()
    assert sorted(history) == [m["step"] for m in metrics]
    for m in metrics:
        expected = backend_metrics(m)
        row = history[m["step"]]
        for key in ("loss", "learning_rate", "grad_norm", "iter_time", "throughput/tokens_per_sec",
                    "throughput/samples_per_sec", "throughput/device/mfu", "time/total", "samples", "total_tokens"):  # fmt: skip
            assert row[key] == pytest.approx(expected[key], rel=1e-12), key
    # the latest system sample taken during a step joins that step's row (a step shorter than the sampling interval
    # has none); every value is one of system.jsonl's samples
    joined = [row["system/cpu_percent"] for row in history.values() if "system/cpu_percent" in row]
    sampled = {s["cpu_percent"] for s in tracked_run.read_system()}
    assert joined and set(joined) <= sampled
    kinds = [k for k, _ in artifacts]
    assert kinds.count("checkpoint") == 2 and kinds.count("model") == 1  # log_model: all
    model_meta = next(meta for k, meta in artifacts if k == "model")
    assert model_meta["content"] == "adapter" and model_meta["base_model"]
    assert summary["final/steps"] == 3 and "doctor/padding" in summary


def test_mlflow_holds_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    ref = json.loads((tracked_run.path / "tracking.json").read_text())["backends"]["mlflow"]
    assert ref["tracking_uri"].startswith("sqlite:///") and "error" not in ref
    client = MlflowClient(ref["tracking_uri"])
    run = client.get_run(ref["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.method"] == "lora" and run.data.params["train.max_steps"] == "3"
    metrics = tracked_run.read_metrics()
    for key, name in (
        ("loss", "loss"),
        ("tokens_per_s", "throughput/tokens_per_sec"),
        ("mfu", "throughput/device/mfu"),
    ):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == [(m["step"], pytest.approx(m[key])) for m in metrics], name
    system = client.get_metric_history(run.info.run_id, "system/rss_mb")
    assert len(system) == len(tracked_run.read_system())  # every sample, each at its own time
    assert "eval/tuned/multiple_choice_accuracy" in run.data.metrics  # the evaluation joined the run
    files = [f.path for f in client.list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in files


class _Exploding:
    name = "exploding"

    def __init__(self, fail_in: str):
        self.fail_in, self.calls = fail_in, []

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self.calls.append(method)
            if method == self.fail_in:
                raise ConnectionError("no network")
            return {"ok": True} if method == "start" else None

        return call


@pytest.mark.parametrize("fail_in", ["start", "log_metrics"])
def test_a_failing_backend_warns_once_and_training_goes_on(tiny_recipe, fail_in, capsys, monkeypatch):
    from daytune.pipeline import train_run
    from daytune.track import tracker

    cfg = load_run_config(tiny_recipe(train={"max_steps": 3}, track={"backends": ["wandb"]}))
    run = RunDir.create(cfg.out_dir, cfg.name)
    run.write_start("model: x\n", ["daytune"])
    backend = _Exploding(fail_in)
    monkeypatch.setattr(tracker, "make_backend", lambda name, track_cfg: backend)
    result = train_run(cfg, run)
    assert result.steps == 3 and (run.path / "adapter").is_dir()
    assert len(run.read_metrics()) == 3  # the run store is complete
    err = capsys.readouterr().err
    assert err.count("tracking backend exploding failed") == 1 and "no network" in err
    assert backend.calls.count(fail_in) == 1  # switched off after the failure
    ref = json.loads((run.path / "tracking.json").read_text())["backends"]["exploding"]
    assert "ConnectionError" in ref["error"]


def test_backend_names_follow_the_lit_gpt_logger():
    record = {
        "step": 3,
        "loss": 1.5,
        "lr": 1e-4,
        "tokens_per_s": 100.0,
        "mfu": 0.2,
        "val_loss": 2.0,
        "elapsed": 9.0,
    }
    out = backend_metrics(record, world=2)
    assert out["loss"] == 1.5 and out["learning_rate"] == 1e-4 and out["time/total"] == 9.0
    assert out["throughput/tokens_per_sec"] == 100.0 and out["throughput/device/tokens_per_sec"] == 50.0
    assert out["val_ppl"] == pytest.approx(2.718281828**2, rel=1e-6)
    assert "step" not in out and set(BACKEND_NAMES) >= {"loss", "lr", "mfu", "val_loss"}


def test_flops_count_matches_a_hand_count(tiny_model):
    import torch

    from daytune.hardware import compute_dtype, table_peak
    from daytune.track.flops import ModelFlops

    model, _ = tiny_model
    f = ModelFlops.of(model)
    cfg = model.config
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size
    n = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size  # the tied output layer counts once
    assert f.matmul_params == n and f.trainable_matmul_params == n  # a plain model trains everything
    assert f == ModelFlops.of_config(cfg, full=True)
    # 6N per token when everything trains, 4N when nothing does; attention 6·L·d·len² per example
    assert f.step(10, 0) == 6 * n * 10
    assert f.step(10, 100) - f.step(10, 0) == 6 * cfg.num_hidden_layers * h * 100
    assert ModelFlops.of_config(cfg, full=False).per_token() == 4 * n
    assert table_peak("NVIDIA A100-SXM4-40GB", torch.bfloat16) == 312e12
    assert table_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert table_peak("NVIDIA GeForce RTX 4090", torch.float32) == 82.6e12
    assert (
        table_peak("NVIDIA A10G", torch.bfloat16) is None and table_peak("Mystery GPU", torch.float32) is None
    )
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32


def _fake_run(tmp_path, metrics, system=(), plan=None, summary=None, cfg=None) -> RunDir:
    import yaml

    run = RunDir.create(tmp_path / "runs", "fake")
    (run.path / "config.yaml").write_text(yaml.safe_dump(cfg or {"data": {}, "train": {"micro_batch": 4}}))
    for m in metrics:
        run.log(m)
    for s in system:
        run.system_file.open("a").write(json.dumps(s) + "\n")
    if plan:
        (run.path / "plan.json").write_text(json.dumps(plan))
    if summary:
        run.update_summary(**summary)
    return run


def test_doctor_says_what_is_wrong_and_what_to_change(tmp_path):
    from daytune.track.doctor import diagnose, format_findings

    metrics = [
        {"step": i, "step_seconds": 1.0, "data_seconds": 0.3, "padding": 0.4, "tokens": 1000, "tokens_per_s": 1000.0,
         "elapsed": 10.0 + i, "mfu": 0.05, "loss": 1.0}
        for i in range(1, 6)
    ]  # fmt: skip
    gpu = {
        "index": 0,
        "util": 40,
        "mem_used_mb": 10_000.0,
        "mem_total_mb": 40_000.0,
        "temp_c": 60,
        "power_w": 200,
    }
    system = [{"elapsed": 10.0 + i, "cpu_percent": 100, "rss_mb": 5000, "gpus": [gpu]} for i in range(6)]
    run = _fake_run(
        tmp_path,
        metrics,
        system,
        plan={"tokens_per_s": 2000.0, "peak_memory_mb": 12_000},
        summary={
            "train": {
                "padding_waste": 0.4,
                "elapsed_seconds": 20.0,
                "train_seconds": 5.0,
                "budget_seconds": 60,
            }
        },
    )
    found = {f.check: f for f in diagnose(run)}
    assert found["data_wait"].status == "warn" and found["data_wait"].value == pytest.approx(0.3)
    assert "data.packing: true" in found["data_wait"].recommendation
    assert found["padding"].status == "warn" and "data.packing: true" in found["padding"].recommendation
    assert found["device_utilization"].status == "warn" and found[
        "device_utilization"
    ].value == pytest.approx(0.4)
    assert found["mfu"].status == "warn"
    assert (
        found["memory_headroom"].status == "info"
        and "micro_batch 4 -> about 13" in found["memory_headroom"].recommendation
    )
    assert found["planner"].status == "warn" and found["planner"].value == pytest.approx(0.5)
    assert "12000 MB predicted" in found["planner"].summary
    assert found["budget"].status == "warn"
    text = format_findings(list(found.values()))
    assert "WARN  data_wait" in text and "->" in text

    healthy = [dict(m, data_seconds=0.001, padding=0.01, tokens_per_s=2100.0) for m in metrics]
    run = _fake_run(tmp_path, healthy, [dict(s, gpus=[dict(gpu, util=95, mem_used_mb=36_000.0)]) for s in system],
                    plan={"step_seconds": 0.5}, cfg={"data": {"packing": True}, "train": {"micro_batch": 4}})  # fmt: skip
    found = {f.check: f for f in diagnose(run)}
    assert found["data_wait"].status == "ok" and found["device_utilization"].status == "ok"
    assert found["memory_headroom"].status == "ok" and found["planner"].status == "ok"


def test_runs_resolve_by_id_and_cli_lists_shows_compares(tracked_run, tmp_path, monkeypatch):
    from daytune.cli import main
    from daytune.errors import RunError
    from daytune.track.runs import resolve_run

    root = tracked_run.path.parent
    second = RunDir(shutil.copytree(tracked_run.path, root / (tracked_run.run_id + "-copy")))
    assert resolve_run(tracked_run.run_id, root).path == tracked_run.path  # exact id wins over a longer one
    assert resolve_run(str(second.path)).path == second.path
    assert resolve_run("-copy", root).path == second.path
    with pytest.raises(RunError, match="matches 2 runs"):
        resolve_run("tiny", root)
    with pytest.raises(RunError, match="no run 'nope'"):
        resolve_run("nope", root)

    monkeypatch.setenv("DAYTUNE_RUNS", str(root))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["runs", "list", "--json"]) == 0
    assert main(["runs", "list"]) == 0
    assert main(["runs", "show", tracked_run.run_id]) == 0
    assert main(["runs", "doctor", tracked_run.run_id]) == 0
    assert main(["runs", "show", "nope"]) == 2
    out = tmp_path / "report.html"
    assert main(["runs", "compare", tracked_run.run_id, second.run_id, "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<svg") >= 5 and "Wilson" in page and "Configuration differences" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "<script" not in page.lower()


def test_eval_and_serve_take_a_run_id(tracked_run, monkeypatch, capsys):
    from daytune.cli import main

    monkeypatch.setenv("DAYTUNE_RUNS", str(tracked_run.path.parent))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tracked_run.path / "eval-by-id.json"
    recipe = str(tracked_run.path / "config.yaml")  # the recipe path: held-out loss and accuracy
    args = ["--recipe", recipe, "--set", "track.backends=[]", "--set", "eval.base=false", "--out", str(out)]
    assert main(["eval", "--run", tracked_run.run_id, *args]) == 0
    result = json.loads(out.read_text())
    assert result["trained"] == str(tracked_run.path / "adapter")
    lineage = json.loads((tracked_run.path / "lineage.json").read_text())
    assert lineage["evaluations"][-1]["results"] == str(out)
    assert main(["serve", "--run", "no-such-run", "--port", "1"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err


def test_wandb_model_reference_resolves_base_and_adapter(tmp_path, monkeypatch, tiny_model_dir):
    from daytune.errors import ModelError
    from daytune.track import artifacts
    from daytune.track.backends import wandb as wandb_backend

    adapter = tmp_path / "dl" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    seen = {}

    def fake_download(ref, root):
        seen["ref"] = ref
        return adapter, {"base_model": str(tiny_model_dir), "content": "adapter"}

    monkeypatch.setattr(wandb_backend, "download_model", fake_download)
    base, trained = artifacts.pull_wandb_model(
        "wandb:team/daytune/run-adapter:v3", log=lambda *a: None, root=tmp_path
    )
    assert (base, trained) == (str(tiny_model_dir), adapter) and seen[
        "ref"
    ] == "wandb:team/daytune/run-adapter:v3"
    with pytest.raises(ModelError, match="wandb:ENTITY/PROJECT/NAME:VERSION"):
        artifacts.parse_wandb_ref("wandb:only-a-name")


def test_wandb_mode_is_online_only_with_a_key(monkeypatch, tmp_path):
    from daytune.track.backends.wandb import resolve_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline" and resolve_mode("online") == "online"


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def _chromium(page: Path, tmp_path: Path, shot: Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium package)")
    profile = tmp_path / f"profile-{shot.stem}"  # a fresh profile every time
    out = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2600",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


def _console_errors(log: str) -> list[str]:
    """Chromium logs page console messages as CONSOLE lines; failed loads and uncaught errors appear there."""
    return [ln for ln in log.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "net::ERR" in ln]


def test_report_opens_in_headless_chromium_without_console_errors(tracked_run, tmp_path):
    from daytune.track.report import write_report

    page = write_report([tracked_run], tmp_path / "report.html")
    shot = tmp_path / "report.png"
    log = _chromium(page, tmp_path, shot)
    assert _console_errors(log) == []
    assert shot.is_file() and shot.stat().st_size > 50_000  # a rendered page, not a blank one
    keep = Path(__file__).parents[1] / ".pytest_cache" / "report-screenshot.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)  # left for a person to look at
    # the check itself can fail: a page with a script error and a remote image is caught
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<html><body><img src='http://127.0.0.1:9/x.png'><script>undefinedCall()</script></body></html>"
    )
    assert _console_errors(_chromium(bad, tmp_path, tmp_path / "bad.png"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_system_sampler_reads_nvml_and_flattens_for_backends(tmp_path):
    """The NVML path with a stand-in for the driver (no GPU here): what each GPU reports, and what backends get."""
    from types import SimpleNamespace

    from daytune.track.system import SystemSampler, flatten_system, gpu_samples

    class FakeNvml:
        NVML_TEMPERATURE_GPU = 0

        def nvmlDeviceGetCount(self):
            return 2

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetUtilizationRates(self, h):
            return SimpleNamespace(gpu=90 + h)

        def nvmlDeviceGetMemoryInfo(self, h):
            return SimpleNamespace(used=30 * 2**30, total=80 * 2**30)

        def nvmlDeviceGetTemperature(self, h, kind):
            return 70

        def nvmlDeviceGetPowerUsage(self, h):
            if h == 1:
                raise RuntimeError("not supported on this board")
            return 350_000  # milliwatts

    gpus = gpu_samples(FakeNvml())
    assert gpus[0] == {"index": 0, "util": 90, "mem_used_mb": 30720.0, "mem_total_mb": 81920.0, "temp_c": 70,
                       "power_w": 350.0}  # fmt: skip
    assert gpus[1]["power_w"] is None and gpus[1]["util"] == 91
    flat = flatten_system({"time": 1.0, "elapsed": 2.0, "cpu_percent": 150.0, "rss_mb": 900.0, "gpus": gpus})
    assert flat["system/gpu.0.power_w"] == 350.0 and flat["system/gpu.1.util"] == 91.0
    assert (
        "system/gpu.1.power_w" not in flat and "system/time" not in flat and flat["system/cpu_percent"] == 150
    )

    sampler = SystemSampler(tmp_path / "system.jsonl", every=0.05).start()
    import time

    deadline = (
        time.monotonic() + 120
    )  # a hang guard only: a busy machine schedules the sampler late, not never
    while time.monotonic() < deadline and len(_lines(tmp_path / "system.jsonl")) < 3:
        time.sleep(0.05)
    sampler.stop()
    lines = (tmp_path / "system.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and len(sampler.drain()) == len(lines)
    assert all(json.loads(ln)["rss_mb"] > 0 for ln in lines)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_tracker_start_leaves_random_states_alone(tiny_recipe, tiny_model):
    """The peak measurement draws random matrices: a resumed run must still replay the same dropout masks."""
    import random

    import torch

    from daytune.track.tracker import Tracker

    cfg = load_run_config(tiny_recipe())
    run = RunDir.create(cfg.out_dir, cfg.name)
    run.write_start("model: x\n", ["daytune"])
    torch.manual_seed(3)
    random.seed(3)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    tracker = Tracker(run, cfg).start(tiny_model[0], torch.device("cpu"), "32-true")
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert tracker.peak > 0 and tracker.peak_source.startswith("measured: cpu")
    tracker.finish({}, None)


def test_suite_results_feed_the_headline_lineage_and_report(tmp_path):
    from daytune.track.report import write_report
    from daytune.track.runs import eval_headline
    from daytune.track.tracker import eval_metrics

    def side(acc):
        mmlu = {"n": 10, "main_metric": "exact_match", "metrics": {"exact_match": {"value": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1}}}  # fmt: skip
        return {"heldout": {"loss": 1.5 - acc}, "suite": {"name": "quick", "scenarios": {"mmlu": mmlu}}}

    results = {"base": side(0.3), "tuned": side(0.4)}
    assert eval_headline(results) == "mmlu 0.400 (+0.100)  loss 1.100 (-0.100)"
    assert eval_metrics(results)["eval/tuned/mmlu/exact_match"] == 0.4
    run = _fake_run(tmp_path, [{"step": 1, "loss": 1.0, "lr": 1e-4, "elapsed": 1.0, "tokens_per_s": 10.0}],
                    summary={"eval": results})  # fmt: skip
    page = write_report([run], tmp_path / "r.html").read_text()
    assert "Evaluation suite" in page and "[0.3, 0.5]" in page
