"""Packing, batching, export, multi-process and crash-resume invariants of the training engine."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXAMPLES
from safetensors.torch import load_file
from test_train import new_run

from daytune.config import load_run_config
from daytune.data import encode_records, read_instructions
from daytune.data.batching import BatchPlan, collate, collate_packed
from daytune.engine.forward import final_hidden
from daytune.engine.loss import response_loss
from daytune.pipeline import train_run
from daytune.train.loop import find_resume_checkpoint


def gsm8k_examples(tok, n=12, max_len=200):
    records = read_instructions(EXAMPLES / "data" / "gsm8k_train.jsonl", n)
    examples, _ = encode_records(records, tok, "chat", max_len)
    return examples


def test_packed_losses_equal_unpacked(tiny_model):
    model, tok = tiny_model
    exs = gsm8k_examples(tok, n=5, max_len=120)
    packed = collate_packed([exs[:3], exs[3:]], tok.pad_token_id)  # two rows, uneven totals: padding too
    with torch.no_grad():
        h_packed = final_hidden(model, packed["input_ids"], packed["attention_mask"], packed["position_ids"])
        loss_packed, n_packed = response_loss(model, packed)
        total, count = 0.0, 0
        for r, row in enumerate([exs[:3], exs[3:]]):
            at = 0
            for e in row:
                single = collate([e], tok.pad_token_id)
                h = final_hidden(model, single["input_ids"], single["attention_mask"])
                n = len(e.input_ids)
                assert torch.allclose(
                    h_packed[r, at : at + n], h[0], atol=1e-5
                )  # each example sees only itself
                loss, c = response_loss(model, single)
                total, count, at = total + float(loss), count + c, at + n
    assert n_packed == count
    assert float(loss_packed) == pytest.approx(total, rel=1e-5)


def test_packing_plan_fills_rows_and_covers_every_example():
    lengths = [50, 300, 120, 80, 400, 60, 200, 90, 30, 250] * 5
    plan = BatchPlan(lengths, micro_batch=2, seed=0, max_seq_len=512, packing=True)
    rows = [row for mb in plan.epoch(0) for row in mb]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    fill = sum(lengths) / (len(rows) * 512)
    assert fill > 0.85


def test_group_by_length_cuts_padding():
    lengths = [int(x) for x in torch.randint(20, 500, (400,), generator=torch.Generator().manual_seed(0))]

    def waste(plan):
        mbs = plan.epoch(0)
        used = sum(lengths[row[0]] for mb in mbs for row in mb)
        return 1 - used / sum(len(mb) * max(lengths[row[0]] for row in mb) for mb in mbs)

    random_order = waste(BatchPlan(lengths, 8, 0, 512))
    grouped = waste(BatchPlan(lengths, 8, 0, 512, group_by_length=True))
    assert grouped < random_order / 3
    assert sorted(
        r[0] for mb in BatchPlan(lengths, 8, 0, 512, group_by_length=True).epoch(0) for r in mb
    ) == list(range(400))


def test_training_with_packing_reports_less_padding(tiny_recipe):
    results = {}
    for packing in (False, True):
        cfg = load_run_config(tiny_recipe(data={"packing": packing, "max_rows": 24}, train={"max_steps": 2}))
        results[packing] = train_run(cfg, new_run(cfg))
    assert results[True].padding_waste < results[False].padding_waste
    assert results[True].tokens_per_s > 0 and results[False].padding_waste > 0.05


def test_export_merged_loads_with_plain_transformers(tiny_recipe, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from daytune.cli import main

    cfg = load_run_config(tiny_recipe(train={"max_steps": 2, "lr": 1e-2}))
    run = new_run(cfg)
    train_run(cfg, run)
    out = tmp_path / "merged"
    assert main(["--quiet", "export", str(run.path), "--merge", "--out", str(out)]) == 0
    ids = torch.tensor([[5, 77, 123, 9, 300]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        ref = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run.adapter)
        )(ids).logits
    assert torch.allclose(merged, ref, atol=1e-4)
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert main(["--quiet", "export", str(run.path), "--merge", "--out", str(out)]) == 2  # never overwrites


def test_export_refuses_to_merge_prompt_learning(tiny_recipe, tmp_path):
    from daytune.cli import main

    cfg = load_run_config(tiny_recipe(train={"method": "prompt", "max_steps": 1}))
    run = new_run(cfg)
    train_run(cfg, run)
    assert main(["--quiet", "export", str(run.path), "--merge", "--out", str(tmp_path / "m")]) == 2
    assert main(["--quiet", "export", str(run.path), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_validation_and_early_stopping_keep_the_best(tiny_recipe):
    cfg = load_run_config(
        tiny_recipe(
            data={"val_fraction": 0.25},
            train={
                "lr": 0.3,
                "max_steps": 40,
                "eval_every": 1,
                "early_stopping_patience": 2,
                "grad_clip": None,
            },
        )
    )
    run = new_run(cfg)
    result = train_run(cfg, run)
    vals = [m["val_loss"] for m in run.read_metrics() if "val_loss" in m]
    assert result.stopped_by == "early_stopping" and result.steps < 40
    assert result.best_val_loss == pytest.approx(min(vals), abs=1e-6)
    best = load_file(str(run.checkpoints / "best.safetensors"))
    final = load_file(str(find_resume_checkpoint(run) / "weights.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)  # the saved model is the best one


def _train_cli(recipe, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "daytune", "--quiet", "train", str(recipe), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tiny_recipe, tmp_path):
    overrides = {
        "data": {"max_rows": 64},
        "train": {"max_steps": 40, "checkpoint_every": 4, "lora": {"dropout": 0.1}},
    }
    recipe = tiny_recipe(**overrides)
    assert _train_cli(recipe).wait() == 0
    (full,) = (tmp_path / "runs").iterdir()
    reference = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]

    proc, runs = _train_cli(recipe), []
    deadline = time.monotonic() + 600  # a hang guard: on a busy machine the run reaches step 10 late
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [p for p in (tmp_path / "runs").iterdir() if p != full]
        metrics = runs[0] / "metrics.jsonl" if runs else None
        if metrics and metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (crashed,) = runs
    killed_at = len((crashed / "metrics.jsonl").read_text().splitlines())
    assert 10 <= killed_at < 40, "the run finished before it could be killed"
    checkpoint = find_resume_checkpoint(__import__("daytune.track", fromlist=["RunDir"]).RunDir(crashed))
    assert killed_at - int(checkpoint.name.split("-")[1]) <= 4  # lost at most one checkpoint interval
    assert _train_cli(recipe, "--resume", str(crashed)).wait() == 0
    resumed = [json.loads(x)["loss"] for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == 40
    assert resumed == pytest.approx(reference, abs=1e-4)


def test_two_processes_equal_one_with_double_accumulation(tiny_recipe, tmp_path):
    common = {"data": {"max_rows": 32}, "train": {"max_steps": 3, "micro_batch": 2, "lora": {"dropout": 0.0}}}
    one = tiny_recipe(**{**common, "train": {**common["train"], "grad_accum": 2}, "name": "one"})
    one_copy = tmp_path / "one.yaml"
    one_copy.write_text(one.read_text())
    assert _train_cli(one_copy).wait() == 0
    two = tiny_recipe(**{**common, "train": {**common["train"], "grad_accum": 1}, "name": "two"})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # torchrun is what `accelerate launch --multi_gpu` runs; on CPUs accelerate itself only launches through mpirun
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "daytune",
        "--quiet",
        "train",
        str(two),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {
        json.loads((p / "summary.json").read_text())["train"]["processes"]: p
        for p in (tmp_path / "runs").iterdir()
    }
    assert set(runs) == {1, 2}
    a = [json.loads(x)["loss"] for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, abs=1e-5)
    wa = load_file(str(runs[1] / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(runs[2] / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


KILL_DURING_SAVE = """
import os, signal, sys
import daytune.train.checkpoint, daytune.train.methods
from daytune.cli import main

def killing(module, name):
    real = module.replace_dir_atomic
    def replace(tmp, final):
        if final.name == name:  # the folder is written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tmp, final)
    module.replace_dir_atomic = replace

killing(daytune.train.checkpoint, sys.argv[1])
killing(daytune.train.methods, sys.argv[1])
sys.exit(main(["--quiet", "train", *sys.argv[2:]]))
"""


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith("tmp"))


def test_saves_killed_midway_are_cleaned_on_the_next_start(tiny_recipe, tmp_path):
    """SIGKILL in the middle of a checkpoint save, then in the middle of the final adapter save: each next start
    of the run removes what the killed save left; a checkpoint swapped out but never replaced is put back."""
    from daytune.cli import main

    recipe = tiny_recipe(train={"max_steps": 5, "checkpoint_every": 1, "keep_checkpoints": 10})
    kill = [sys.executable, "-c", KILL_DURING_SAVE]
    assert subprocess.run([*kill, "step-0000003", str(recipe)]).returncode == -signal.SIGKILL
    (run,) = (tmp_path / "runs").iterdir()
    (left,) = _hidden(run / "checkpoints")
    assert left.startswith(".step-0000003.")  # a complete-looking folder that was never renamed into place
    assert subprocess.run([*kill, "adapter", "--resume", str(run)]).returncode == -signal.SIGKILL
    assert _hidden(run / "checkpoints") == []  # the second start removed the first one's leftover
    (left,) = _hidden(run)
    assert left.startswith(".adapter.")
    # killed between the two renames of a re-save: only the swapped-out copy of step 5 exists
    (run / "checkpoints" / "step-0000005").rename(run / "checkpoints" / ".step-0000005.old-4242")
    (run / ".summary.json.abcd1234.tmp").write_text("{")
    (run / ".save-probe.x1y2z3").mkdir()
    assert main(["--quiet", "train", "--resume", str(run)]) == 0
    assert _hidden(run) == [] and _hidden(run / "checkpoints") == []
    assert (run / "checkpoints" / "step-0000005" / "state.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
