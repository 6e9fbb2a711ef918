"""`daytune data prepare|inspect|sources`, the provenance gate, the data card, and training on what prepare wrote."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from daytune.cli import main
from daytune.data.prepare import prepare
from daytune.data.recipe import load_data_recipe
from daytune.data.show import CLOSE, OPEN
from daytune.data.tokenize import IGNORE_INDEX, encode_record
from daytune.data.trainset import load_train_data
from daytune.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "data"
DECLARED = {"licence": "CC0-1.0", "commercial": True, "llm_generated": False, "citation": "daytune tests"}


def write_recipe(tmp_path, model, filename="data.yaml", **fields):
    recipe = {
        "name": "small",
        "model": str(model),
        "max_seq_len": 512,
        "datasets_dir": str(tmp_path / "no-datasets-here"),
        "sources": [{"source": "dolly", "path": str(FIX / "dolly.jsonl")}],
        "val_fraction": 0.0,
    }
    recipe.update(fields)
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture
def heldout(tmp_path):
    """An eval file (instruction JSONL) that shares a 13-gram with the first Dolly row."""
    p = tmp_path / "heldout.jsonl"
    p.write_text(
        json.dumps(
            {
                "instruction": "Where did it land? The first transatlantic telegraph cable was laid across the floor "
                "of the Atlantic Ocean from Telegraph Field.",
                "output": "Newfoundland.",
            }
        )
        + "\n"
    )
    return p


def test_prepare_cleans_counts_and_writes_the_card(tmp_path, tiny_model_dir, heldout):
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        sources=[
            {"source": "dolly", "path": str(FIX / "dolly.jsonl"), "weight": 2},
            {
                "name": "chat",
                "format": "messages",
                "path": str(FIX / "messages.jsonl"),
                "provenance": DECLARED,
            },
            {"name": "notes", "format": "text", "path": str(FIX / "notes.txt"), "provenance": DECLARED},
        ],
        decontaminate={"eval_files": [str(heldout)]},
    )
    card = prepare(load_data_recipe(path), tmp_path / "out")
    out = tmp_path / "out"
    for name in ("train.jsonl", "val.jsonl", "data_card.json", "data_card.md", "token_lengths.png"):
        assert (out / name).is_file(), name
    assert (out / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {s["name"]: s["rows"] for s in card["sources"]}
    # dolly: 5 loaded, 1 empty response, 1 exact duplicate (punctuation differs), 1 contaminated; weight 2 doubles
    assert rows["dolly"] == {
        "loaded": 5, "after_filters": 4, "after_exact_dedup": 3, "after_near_dedup": 3,
        "after_decontamination": 2, "selected": 2, "val": 0, "train": 4,
    }  # fmt: skip
    assert rows["chat"]["train"] == 2 and rows["notes"]["train"] == 1
    reasons = {(r["step"], r["reason"]): r for r in card["removed"]}
    assert reasons[("filters", "empty response")]["examples"][0]["id"] == "dolly-4"
    assert reasons[("exact_dedup", "exact duplicate")]["examples"][0]["detail"] == "same text as dolly-1"
    contaminated = reasons[("decontamination", "overlaps heldout.jsonl")]
    assert (
        contaminated["count"] == 1
        and "the first transatlantic telegraph cable" in contaminated["examples"][0]["detail"]
    )
    assert card["decontamination"]["not_found"] == list(
        ["mmlu", "gsm8k", "truthfulqa", "bbq", "openbookqa", "wikitext2", "xsum"]
    )
    assert any("not checked" in w for w in card["warnings"])
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(train) == 7 and sum(r["source"] == "dolly" for r in train) == 4
    assert any(r.get("messages") and r["messages"][0]["role"] == "system" for r in train)
    assert any("text" in r for r in train)
    md = (out / "data_card.md").read_text()
    assert card["fingerprint"] in md and "overlaps heldout.jsonl" in md and "CC BY-SA 3.0" in md
    # the same recipe gives the same bytes; an existing folder is never overwritten without --force
    with pytest.raises(DataError, match="already exists"):
        prepare(load_data_recipe(path), out)
    again = prepare(load_data_recipe(path), out, force=True)
    assert again["fingerprint"] == card["fingerprint"]


def test_provenance_gate_refuses_disallowed_sources(tmp_path, tiny_model_dir):
    def attempt(**fields):
        return prepare(load_data_recipe(write_recipe(tmp_path, tiny_model_dir, **fields)), tmp_path / "o")

    alpaca = [{"source": "alpaca", "path": str(FIX / "alpaca.json")}]
    with pytest.raises(
        ConfigError, match=r"'alpaca': refused: its responses are LLM-generated.*allow_llm_generated: false"
    ):
        attempt(sources=alpaca)
    with pytest.raises(
        ConfigError, match=r"'alpaca': refused: its licence \(CC BY-NC 4.0\).*allow_noncommercial: false"
    ):
        attempt(sources=alpaca, allow_llm_generated=True)
    lima = [{"source": "lima", "path": str(FIX / "alpaca.json")}]
    with pytest.raises(ConfigError, match=r"'lima': refused: its licence \(CC BY-NC-SA 4.0\)"):
        attempt(sources=lima, allow_noncommercial=False)
    mine = {"format": "dolly", "path": str(FIX / "dolly.jsonl")}
    with pytest.raises(
        ConfigError, match=r"not a registered source.*missing provenance.licence, provenance.commercial"
    ):
        attempt(sources=[mine])
    declared_llm = {**mine, "provenance": {**DECLARED, "llm_generated": True}}
    with pytest.raises(ConfigError, match="LLM-generated"):
        attempt(sources=[declared_llm])
    # a declaration cannot loosen a registered source's terms
    loosened = {**alpaca[0], "provenance": {"llm_generated": False, "commercial": True}}
    with pytest.raises(ConfigError, match="LLM-generated"):
        attempt(sources=[loosened])
    with pytest.raises(
        ConfigError, match=r"sources\[0\]\.prompt: 'tk' is not one of definition, tk-instruct"
    ):
        attempt(sources=[{**mine, "provenance": DECLARED, "prompt": "tk"}])
    assert not (tmp_path / "o").exists()


def test_noncommercial_task_licence_is_refused(tmp_path, tiny_model_dir):
    task = json.loads((Path(__file__).parents[1] / "examples" / "data" / SVAMP).read_text())
    task["Instance License"] = ["CC BY-NC 4.0"]
    folder = tmp_path / "sni"
    folder.mkdir()
    (folder / "task999_nc_example.json").write_text(json.dumps(task))
    shutil.copy(Path(__file__).parents[1] / "examples" / "data" / SVAMP, folder / SVAMP)
    sources = [{"source": "natural_instructions", "path": str(folder)}]
    with pytest.raises(ConfigError, match=r"1 task\(s\).*task999_nc_example \(CC BY-NC 4.0\).*exclude_tasks"):
        prepare(load_data_recipe(write_recipe(tmp_path, tiny_model_dir, sources=sources)), tmp_path / "o")
    sources[0]["exclude_tasks"] = ["task999_*"]
    card = prepare(load_data_recipe(write_recipe(tmp_path, tiny_model_dir, sources=sources)), tmp_path / "o")
    assert card["sources"][0]["rows"]["loaded"] == 195
    assert card["sources"][0]["task_licences"] == {SVAMP[:-5]: "MIT"}


SVAMP = "task753_svamp_addition_question_answering.json"


def test_on_error_skip_counts_malformed_rows(tmp_path, tiny_model_dir):
    bad = tmp_path / "dolly.jsonl"
    bad.write_text((FIX / "dolly.jsonl").read_text() + '{"instruction": "no response"}\n')
    path = write_recipe(tmp_path, tiny_model_dir, sources=[{"source": "dolly", "path": str(bad)}])
    with pytest.raises(DataError, match=r"dolly\.jsonl:6: missing field 'response'"):
        prepare(load_data_recipe(path), tmp_path / "o")
    card = prepare(load_data_recipe(path, ["on_error=skip"]), tmp_path / "o")
    (skipped,) = [r for r in card["removed"] if r["step"] == "load"]
    assert skipped["count"] == 1 and "dolly.jsonl:6" in skipped["examples"][0]["detail"]


def test_prepare_a_mix_of_lima_natural_instructions_and_gsm8k(shared_data, tmp_path, tiny_model_dir):
    """The example recipe on the real files: dedup and decontamination counts show in the card."""
    recipe = load_data_recipe(
        Path(__file__).parents[1] / "examples" / "data-mix.yaml",
        [
            f"datasets_dir={shared_data}",
            f"model={tiny_model_dir}",
            "max_seq_len=4096",
            "sources.1.max_per_task=10",
            "decontaminate.eval_sets=[gsm8k, mmlu]",
        ],
    )
    card = prepare(recipe, tmp_path / "mix")
    rows = {s["name"]: s["rows"] for s in card["sources"]}
    assert set(rows) == {"lima", "natural_instructions", "gsm8k"}
    assert rows["lima"]["loaded"] == 1029 and rows["gsm8k"]["loaded"] == 7473
    assert rows["natural_instructions"]["loaded"] == 420
    removed = card["decontamination"]["removed_by_eval_set"]
    assert removed["gsm8k"] >= 1 and removed["mmlu"] >= 1  # GSM8K train shares 13-grams with GSM8K test
    near = [r for r in card["removed"] if r["step"] == "near_dedup"]
    assert near and near[0]["count"] >= 1
    assert rows["gsm8k"]["selected"] == 1500 and rows["gsm8k"]["train"] + rows["gsm8k"]["val"] == 1500
    assert {s["name"]: s["commercial"] for s in card["sources"]}["lima"] is False
    with pytest.raises(ConfigError, match="'lima': refused"):
        prepare(load_data_recipe(
            Path(__file__).parents[1] / "examples" / "data-mix.yaml", ["allow_noncommercial=false"]
        ), tmp_path / "refused")  # fmt: skip


def test_messages_train_on_every_assistant_turn(tiny_model):
    _, tok = tiny_model
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "times 3?"},
            {"role": "assistant", "content": "12"},
        ]
    }
    ex = encode_record(rec, tok, "chat")
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    trained, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            current.append(tid)
        elif current:
            trained.append(tok.decode(current))
            current = []
    if current:
        trained.append(tok.decode(current))
    assert trained == ["4<|im_end|>\n", "12<|im_end|>\n"]
    alpaca = encode_record(rec, tok, "alpaca")
    text = tok.decode(alpaca.input_ids)
    assert text.startswith("Be brief.\n\n### Instruction:\n2+2?") and "### Instruction:\ntimes 3?" in text
    assert tok.decode([t for t, lab in zip(alpaca.input_ids, alpaca.labels) if lab != IGNORE_INDEX]) == (
        "4<|im_end|>12<|im_end|>"
    )
    plain = encode_record({"text": "Rivers carry silt."}, tok, "chat")
    assert all(lab != IGNORE_INDEX for lab in plain.labels)


def test_cli_prepare_inspect_sources_and_train_on_the_folder(
    capsys, tmp_path, tiny_model_dir, tiny_recipe, heldout
):
    data = write_recipe(
        tmp_path,
        tiny_model_dir,
        sources=[
            {"source": "dolly", "path": str(FIX / "dolly.jsonl")},
            {
                "name": "chat",
                "format": "messages",
                "path": str(FIX / "messages.jsonl"),
                "provenance": DECLARED,
            },
        ],
    )
    out = tmp_path / "prepared"
    assert main(["--quiet", "data", "prepare", str(data), "--out", str(out)]) == 0
    assert "Inspect it: daytune data inspect" in capsys.readouterr().out
    assert main(["data", "prepare", str(data), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "inspect", str(out), "-n", "5", "--source", "chat"]) == 0
    shown = capsys.readouterr().out
    assert "Data card: small" in shown and f"{OPEN}Lima.<|im_end|>\n{CLOSE}" in shown
    assert "<|im_start|>user\nCapital of Peru?<|im_end|>" in shown  # masked, so outside the markers
    assert main(["data", "sources"]) == 0
    listing = capsys.readouterr().out
    assert "alpaca" in listing and "LLM" in listing and "CC BY-NC-SA 4.0" in listing
    refused = write_recipe(
        tmp_path,
        tiny_model_dir,
        "refused.yaml",
        sources=[{"source": "alpaca", "path": str(FIX / "alpaca.json")}],
    )
    assert main(["data", "prepare", str(refused), "--out", str(tmp_path / "x")]) == 2
    assert "refused" in capsys.readouterr().err

    # training on the prepared folder records its fingerprint; a run recipe can prepare the data itself
    card = json.loads((out / "data_card.json").read_text())
    recipe = tiny_recipe(data={"train": str(out), "max_rows": None})
    assert main(["--quiet", "train", str(recipe), "--set", "train.max_steps=1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["data"]["fingerprint"] == card["fingerprint"]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["fingerprint"] == card["fingerprint"]
    recipe = tiny_recipe(data={"train": None, "prepare": str(data), "max_rows": None, "max_seq_len": 256})
    assert (
        main(
            [
                "--quiet",
                "train",
                str(recipe),
                "--set",
                "train.max_steps=1",
                "--set",
                f"eval.heldout={heldout}",
            ]
        )
        == 0
    )
    run2 = next(p for p in (tmp_path / "runs").iterdir() if p != run)
    saved = yaml.safe_load((run2 / "config.yaml").read_text())["data"]
    card2 = json.loads((run2 / "data" / "data_card.json").read_text())
    assert saved["train"] == str(run2 / "data") and saved["fingerprint"] == card2["fingerprint"]
    assert card2["tokenizer"]["max_seq_len"] == 256  # the run's settings apply to its data stage
    assert card2["decontamination"]["removed_by_eval_set"] == {"heldout.jsonl": 1}  # the run's eval file

    # the run's evaluation suite is checked too: its data root holds a GSM8K test question that overlaps a row
    suite_root = tmp_path / "suite-data"
    (suite_root / "gsm8k").mkdir(parents=True)
    question = json.loads(heldout.read_text())["instruction"]
    (suite_root / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": question, "answer": "#### 1"}) + "\n"
    )
    suite = ["--set", "eval.suite=quick", "--set", f"eval.data_root={suite_root}"]
    assert main(["--quiet", "train", str(recipe), "--set", "train.max_steps=1", *suite]) == 0
    run3 = next(p for p in (tmp_path / "runs").iterdir() if p not in (run, run2))
    card3 = json.loads((run3 / "data" / "data_card.json").read_text())
    assert card3["decontamination"]["removed_by_eval_set"] == {"gsm8k": 1}
    assert {"name": "gsm8k", "items": 1, "files": 1, "from": str(suite_root)} in card3["decontamination"][
        "checked"
    ]


def test_changed_data_is_refused(tmp_path, tiny_model_dir):
    from daytune.config import DataConfig

    path = write_recipe(tmp_path, tiny_model_dir)
    card = prepare(load_data_recipe(path), tmp_path / "d")
    records, info = load_train_data(DataConfig(train=str(tmp_path / "d"), fingerprint=card["fingerprint"]))
    assert info["fingerprint"] == card["fingerprint"] and len(records) == 3
    with pytest.raises(DataError, match="the data changed since the run started"):
        load_train_data(DataConfig(train=str(tmp_path / "d"), fingerprint="sha256:0000"))
    with open(tmp_path / "d" / "train.jsonl", "a") as f:
        f.write('{"instruction": "extra", "output": "row"}\n')
    with pytest.raises(DataError, match="changed after `daytune data prepare`"):
        load_train_data(DataConfig(train=str(tmp_path / "d")))


def test_missing_registered_source_says_where_it_looked(tmp_path, tiny_model_dir, capsys):
    path = write_recipe(tmp_path, tiny_model_dir, sources=[{"source": "lima"}], allow_noncommercial=True)
    with pytest.raises(
        DataError,
        match=r"source 'lima': not in the datasets folder .*no-datasets-here/lima/lima.json.*GAIR/lima",
    ):
        prepare(load_data_recipe(path), tmp_path / "o")
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_near_dedup_judges_a_tk_instruct_row_on_its_instance(shared_data, tmp_path, tiny_model_dir):
    """A Tk-Instruct prompt repeats the task's definition in every row: near-dedup must compare the instances
    (input and output), or a task of short inputs (well-formed queries: 4-10 words after a 40-word definition)
    loses most of its rows as 'near duplicates' of each other."""
    from daytune.data.dedup import near_duplicates
    from daytune.data.prepare import near_text

    task = "task673_google_wellformed_query_classification"
    path = write_recipe(
        tmp_path,
        tiny_model_dir,
        datasets_dir=str(shared_data),
        sources=[
            {"source": "natural_instructions", "tasks": [task], "max_per_task": 80, "prompt": "tk-instruct"}
        ],
        dedup={"exact": True, "near": True, "threshold": 0.8},
        decontaminate={"enabled": False},
    )
    card = prepare(load_data_recipe(path), tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    (counts,) = [s["rows"] for s in card["sources"]]
    assert counts["after_near_dedup"] >= counts["after_exact_dedup"] - 3  # distinct queries stay
    assert all(r["meta"]["instance_input"] in r["instruction"] for r in rows)
    assert near_text(rows[0]) == f"{rows[0]['meta']['instance_input']}\n{rows[0]['output']}"
    whole = near_duplicates([f"{r['instruction']}\n{r['output']}" for r in rows], 0.8, 128, 3, 0)
    assert len(whole) > len(rows) // 3  # what judging the whole prompt would have removed
