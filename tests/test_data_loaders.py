"""Loaders on exact-format fixtures (Dolly, OASST1, FLAN, Alpaca, ShareGPT, chat, text) and on the real files
(LIMA, Super-NaturalInstructions, GSM8K); malformed rows name file and line; the hub fails fast offline."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from daytune.data import loaders
from daytune.data.files import ErrorPolicy, iter_json
from daytune.data.hub import fetch_dataset
from daytune.errors import DataError

FIX = Path(__file__).parent / "fixtures" / "data"


def load(fmt, path, policy="fail", **opts):
    files = loaders.data_files(fmt, Path(path), None)
    return loaders.load(fmt, files, fmt, loaders.LoadOptions(**opts), ErrorPolicy(policy))


def test_dolly_maps_context_to_input():
    out = load("dolly", FIX / "dolly.jsonl")
    first = out.records[0]
    assert first["instruction"].startswith("When was the first transatlantic")
    assert first["input"].startswith("The first transatlantic telegraph cable")
    assert first["output"] == "It was completed on 5 August 1858."
    assert first["meta"] == {"category": "closed_qa"} and first["source"] == "dolly"
    assert len(out.records) == 5 and len({r["id"] for r in out.records}) == 5


def test_oasst1_follows_the_top_ranked_path(tmp_path):
    gz = tmp_path / "2023-04-12_oasst_ready.messages.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write((FIX / "oasst1_messages.jsonl").read_bytes())
    out = load("oasst1", gz)
    by_id = {r["id"]: r for r in out.records}
    egg = by_id["oasst1-6ab24d72-0181-4594-a9cd-deaf170242fb"]
    assert [m["role"] for m in egg["messages"]] == ["user", "assistant", "user", "assistant"]
    assert egg["messages"][1]["content"].startswith("Lower the egg")  # rank 0, not rank 1 or unranked
    assert egg["messages"][3]["content"].startswith(
        "Keep it in the boiling water"
    )  # the synthetic one is out
    assert egg["instruction"] == "And for a hard yolk?" and egg["output"].startswith("Keep it")
    prime = by_id["oasst1-9f1c0d3b-7a44-4b8e-8e51-5d7f3c2a1b00"]  # the deleted rank-0 reply is skipped
    assert prime["output"].startswith("103 is prime") and "messages" not in prime
    assert len(out.records) == 2  # the German tree is not in languages: [en]
    assert out.dropped == {"deleted, synthetic or failed review": 2, "language not selected": 1}
    assert len(load("oasst1", gz, languages=[]).records) == 3


def test_oasst1_trees_format_gives_the_same_conversation():
    trees = load("oasst1", FIX / "oasst1_trees.jsonl").records
    rows = load("oasst1", FIX / "oasst1_messages.jsonl").records
    assert trees[0]["messages"] == rows[0]["messages"]


def test_flan_alpaca_sharegpt_messages_text():
    flan = load("flan", FIX / "flan.jsonl", max_per_task=1)
    assert {r["meta"]["task"] for r in flan.records} == {"anli_r1", "wmt14_translate_fr-en"}
    assert flan.dropped == {"max_per_task": 1}
    assert load("flan", FIX / "flan.jsonl", exclude_tasks=["wmt*"]).dropped == {"task not selected": 1}
    alpaca = load("alpaca", FIX / "alpaca.json").records
    assert alpaca[1]["input"] == "The cat chased the mouse." and alpaca[1]["output"].startswith("The mouse")
    share = load("messages", FIX / "sharegpt.json")
    assert len(share.records) == 1 and share.dropped == {"no assistant turn": 1}
    assert [m["role"] for m in share.records[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    chat = load("messages", FIX / "messages.jsonl").records
    assert chat[0]["messages"][0] == {"role": "system", "content": "You are terse."}
    text = load("text", FIX / "notes.txt", chunk_words=15).records
    assert [r["text"].split()[0] for r in text] == ["Rivers", "Deltas", "Floods"]
    assert len(load("text", FIX / "notes.txt").records) == 1  # all three paragraphs fit in 200 words


def test_malformed_rows_name_file_and_line_or_are_skipped(tmp_path):
    bad = tmp_path / "dolly.jsonl"
    lines = (FIX / "dolly.jsonl").read_text().splitlines()
    bad.write_text("\n".join([lines[0], '{"instruction": "x", "context": ""}', lines[1], "{oops"]) + "\n")
    with pytest.raises(DataError, match=r"dolly\.jsonl:2: missing field 'response'"):
        load("dolly", bad)
    out = load("dolly", bad, policy="skip")
    assert len(out.records) == 2
    policy = ErrorPolicy("skip")
    loaders.load("dolly", [bad], "dolly", loaders.LoadOptions(), policy)
    assert len(policy.skipped) == 2 and "dolly.jsonl:4: not valid JSON" in policy.skipped[1]
    arr = tmp_path / "alpaca.json"
    arr.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": 5,\n   "output": "c"}\n]\n')
    with pytest.raises(DataError, match=r"alpaca\.json:3: field 'instruction' must be a string"):
        load("alpaca", arr)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": \n')
    with pytest.raises(DataError, match=r"broken\.json:\d+: not valid JSON"):
        list(iter_json(broken))
    deep = "[" * 100_000 + "]" * 100_000
    nested = tmp_path / "nested.jsonl"
    nested.write_text(
        lines[0] + "\n" + f'{{"instruction": {deep}}}\n' + '{"instruction": null, "response": "r"}\n'
    )
    with pytest.raises(DataError, match=r"nested\.jsonl:2: JSON nested too deeply"):
        load("dolly", nested)
    policy = ErrorPolicy("skip")
    loaders.load("dolly", [nested], "dolly", loaders.LoadOptions(), policy)
    assert "nested.jsonl:3: field 'instruction' is null" in policy.skipped[1]
    (tmp_path / "nested.json").write_text(f"[\n{lines[0]},\n{deep}\n]\n")
    with pytest.raises(DataError, match=r"nested\.json:3: JSON nested too deeply"):
        list(iter_json(tmp_path / "nested.json"))


def test_lima_real_file(shared_data):
    out = load("lima", shared_data / "lima" / "lima.json")
    assert len(out.records) == 1029
    multi = [r for r in out.records if r.get("messages")]
    assert len(multi) == 29
    m = multi[0]["messages"]
    assert [x["role"] for x in m][:2] == ["user", "assistant"] and m[-1]["role"] == "assistant"
    assert m[-1]["content"] == multi[0]["output"]


def test_lima_gair_format(tmp_path):
    p = tmp_path / "train.jsonl"
    rows = [
        {"conversations": ["Q1", "A1", "Q2", "A2"], "source": "multi_turn"},
        {"conversations": ["Q"], "source": "x"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = load("lima", p)
    assert len(out.records) == 1 and out.records[0]["messages"][3] == {"role": "assistant", "content": "A2"}
    assert out.dropped == {"no response": 1}


def test_natural_instructions_real_task_files(shared_data):
    folder = shared_data / "natural_instructions"
    out = load("sni", folder)
    assert len(out.records) == 35361 and len(out.licences) == 42
    copa = [r for r in out.records if r["meta"]["task"] == "task1393_superglue_copa_text_completion"]
    assert copa[0]["instruction"].startswith("In this task, you are given a premise sentence")
    assert copa[0]["output"] in ("A", "B") and copa[0]["id"].startswith("task1393-")
    assert out.licences["task1393_superglue_copa_text_completion"] == "BSD 2-Clause"
    shot = load("sni", folder / "task1393_superglue_copa_text_completion.json", few_shot=2, max_per_task=10)
    assert len(shot.records) == 10 and "Example 2:\nInput:" in shot.records[0]["instruction"]
    # prompt: tk-instruct trains on the very prompt the unseen suite sends for the instance
    from daytune.eval.scenarios.base import DataRoot
    from daytune.eval.scenarios.sni import read_task

    tk = load(
        "sni", folder / "task1393_superglue_copa_text_completion.json", max_per_task=3, prompt="tk-instruct"
    )
    task, instances = read_task(DataRoot(shared_data), "task1393_superglue_copa_text_completion")
    by_id = {str(i["id"]): i for i in instances}
    for r in tk.records:
        assert r["input"] == "" and r["instruction"] == task.prompt(by_id[r["id"]]["input"], 0)
        assert r["instruction"].startswith("Definition: ") and r["instruction"].endswith("\nOutput:")


def test_gsm8k_real_train_file(shared_data):
    out = load("gsm8k", shared_data / "gsm8k" / "train.jsonl")
    assert len(out.records) == 7473
    assert not any("<<" in r["output"] for r in out.records) and all(
        "####" in r["output"] for r in out.records
    )


def test_hub_fails_fast_offline(monkeypatch):
    """Offline, fetching fails with what to do instead; fast by construction (the cache first, then one try with a
    short timeout), not by a stopwatch that a busy machine would trip."""
    import huggingface_hub

    from daytune.data.hub import HUB_TIMEOUT_S

    calls, real = [], huggingface_hub.snapshot_download

    def recorded(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    with pytest.raises(
        DataError, match=r"cannot fetch dataset 'databricks/databricks-dolly-15k'.*--local-dir DIR"
    ):
        fetch_dataset("databricks/databricks-dolly-15k", ["databricks-dolly-15k.jsonl"])
    assert [c.get("local_files_only", False) for c in calls] == [True, False]
    assert calls[1]["etag_timeout"] == HUB_TIMEOUT_S <= 10


def test_hub_reads_the_local_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    commit = "0" * 40
    repo = tmp_path / "datasets--databricks--databricks-dolly-15k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    shutil.copy(FIX / "dolly.jsonl", snap / "databricks-dolly-15k.jsonl")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    folder = fetch_dataset("databricks/databricks-dolly-15k", ["databricks-dolly-15k.jsonl"])
    assert len(load("dolly", folder).records) == 5


def test_parquet_rows_as_the_hub_ships_them(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {"question": ["What is 2+3?", "What is 4*5?"], "answer": ["2+3=<<2+3=5>>5\n#### 5", "#### 20"]}
    )
    folder = tmp_path / "main"
    folder.mkdir()
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    out = load("gsm8k", tmp_path)
    assert [r["output"] for r in out.records] == ["2+3=5\n#### 5", "#### 20"]
