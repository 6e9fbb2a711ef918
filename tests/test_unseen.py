"""Unseen-task evaluation: the Super-NaturalInstructions scenario's metrics against hand-computed values, prompt
truncation counted, the `unseen` suite on the tiny model, and data recipes that refuse to train on held-out tasks
(by task and by Source), with clear errors and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from daytune.cli import main
from daytune.config import load_run_config
from daytune.data.heldout import UNSEEN_TASKS
from daytune.errors import ConfigError
from daytune.eval import metrics as M
from daytune.eval.lm import LM, GenerateRequest, Generation, LocalLM, LoglikelihoodResult, Usage
from daytune.eval.scenarios import DataRoot
from daytune.eval.scenarios.sni import SNI, label_set
from daytune.eval.suites import run_suite, suite_plan


def test_sni_normalization_exact_match_and_rouge_l_by_hand():
    assert M.sni_normalize("  The Cat,  sat!\n") == "the cat sat"
    assert M.sni_exact_match(["Entailment"], " entailment.") == 1.0
    assert M.sni_exact_match(["a dog"], "dog") == 0.0  # SNI keeps articles (SQuAD's normalization drops them)
    assert M.sni_exact_match(["no", "None"], "none") == 1.0  # the best over the references
    # LCS of [the cat sat on the mat] and [the cat is on the mat] is 5 of 6 tokens: P = R = F = 5/6
    assert M.sni_rouge_l(["xyz", "the cat is on the mat"], "the cat sat on the mat") == pytest.approx(5 / 6)
    # stemmed: [run dog] vs [the dog run]: LCS 1, P = 1/2, R = 1/3, F = 2PR/(P+R) = 0.4
    assert M.sni_rouge_l(["the dog runs"], "running dogs") == pytest.approx(0.4)
    # macro average: task a 1/4, task b 1/1 -> 0.625 (the micro mean would be 0.4)
    recs = [{"task": "a", "x": v} for v in (1, 0, 0, 0)] + [{"task": "b", "x": 1}, {"task": "b"}]
    assert M.macro_mean_of("x")(recs) == pytest.approx(0.625)


def test_label_sets_are_small_fixed_output_sets():
    rows = [{"output": ["Yes"]}, {"output": ["no."]}, {"output": ["yes"]}, {"output": ["No"]}]
    assert label_set(rows) == ["Yes", "no."]
    assert label_set(rows[:1]) == []  # one instance is not a label set
    many = [{"output": [f"w{i}"]} for i in range(11)]
    assert label_set(many) == []  # more than MAX_LABELS distinct outputs: an open task


def _task_file(root: Path, name: str, instances: list[tuple[str, list[str]]], definition: str) -> None:
    folder = root / "natural_instructions"
    folder.mkdir(parents=True, exist_ok=True)
    obj = {
        "Source": [name],
        "Categories": ["Test"],
        "Definition": [definition],
        "Positive Examples": [{"input": "example in", "output": "example out"}],
        "Instances": [{"id": f"{name}-{i}", "input": x, "output": o} for i, (x, o) in enumerate(instances)],
    }
    (folder / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")


class ScriptedLM(LM):
    """Generates 'Yes.' for everything; a continuation's log-likelihood is minus its length (shorter wins); the
    prompt of the input 'long' is reported cut by 7 tokens."""

    name = "scripted"

    def __init__(self):
        self.usage = Usage()
        self.prompts = []

    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        self.prompts += [r.prompt for r in requests]
        return [Generation("Yes.", 2, -1.0, 7 if "Input: long" in r.prompt else 0) for r in requests]

    def loglikelihood(self, requests):
        return [LoglikelihoodResult(-float(len(cont)), False, 1) for _, cont in requests]


def test_sni_scenario_scores_by_hand(tmp_path):
    pairs = [("one", ["yes"]), ("two", ["no"]), ("long", ["yes"]), ("four", ["no"])]
    _task_file(tmp_path, "task_x", pairs, "Answer yes or no")
    _task_file(tmp_path, "task_y", [("cat", ["the cat is on the mat"])], "Describe.")
    scen, lm = SNI(), ScriptedLM()
    s = SNI.defaults()
    s.subjects = ["task_x", "task_y"]
    instances = scen.load(DataRoot(tmp_path), s)
    records, example = scen.run(lm, instances, s)
    by_id = {r["id"]: r for r in records}
    # task_x: "Yes." matches the two yes (EM 1/2); the shorter label " no" has the higher log-likelihood, so rank
    # accuracy is right only for the two 'no' instances (1/2); every answer is a label
    assert [by_id[f"task_x-{i}"]["exact_match"] for i in range(4)] == [1.0, 0.0, 1.0, 0.0]
    assert [by_id[f"task_x-{i}"]["rank_correct"] for i in range(4)] == [0.0, 1.0, 0.0, 1.0]
    assert all(by_id[f"task_x-{i}"]["valid_label"] == 1.0 for i in range(4))
    assert by_id["task_y-0"]["exact_match"] == 0.0 and "rank_correct" not in by_id["task_y-0"]
    m = {k: spec.fn(records) for k, spec in SNI.metrics.items()}
    assert m["exact_match"] == pytest.approx((1 / 2 + 0) / 2)  # macro over the two tasks
    assert m["rank_accuracy"] == pytest.approx(1 / 2)  # only the classification task has labels
    assert m["exact_match_labels"] == pytest.approx(1 / 2)  # exact match of the labelled task alone
    assert m["valid_label"] == 1.0 and m["rouge_l"] == pytest.approx(1 / 4)  # 'yes' vs 'yes': 1; vs 'no': 0
    assert m["truncated"] == pytest.approx(1 / 5)  # one prompt of five was cut
    # Tk-Instruct's zero-shot encoding: no positive example, the definition ends with a full stop
    assert example["prompt"].startswith(
        "Definition: Answer yes or no.\n\nNow complete the following example -"
    )
    assert any(p.endswith("Input: one.\nOutput:") for p in lm.prompts)
    s.shots = 1
    assert "Positive Example 1 -\nInput: example in.\nOutput: example out.\n\n" in scen._tasks[
        "task_x"
    ].prompt("q", 1)


def test_local_backend_counts_cut_prompts(tiny_model):
    model, tok = tiny_model
    lm = LocalLM(model, tok, max_length=64)
    long = "Natalia sold clips to 48 of her friends in April. " * 20
    short, cut = lm.generate([GenerateRequest("Q: 2+2?", 4), GenerateRequest(long, 4)])
    assert short.truncated == 0 and cut.truncated > 0
    assert lm.usage.truncated == 1
    (res,) = lm.loglikelihood([(long, " yes")])
    assert res.truncated > 0 and lm.usage.truncated == 2


def test_unseen_suite_runs_on_the_tiny_model(tiny_model, shared_data):
    model, tok = tiny_model
    res = run_suite(LocalLM(model, tok), "unseen", data_root=shared_data, max_instances=2, bootstrap=50)
    sc = res["scenarios"]["sni"]
    assert sc["n"] == 2 * len(UNSEEN_TASKS) and list(sc["by_task"]) == list(UNSEEN_TASKS)
    for metric in ("exact_match", "rouge_l", "rank_accuracy", "valid_label", "truncated"):
        m = sc["metrics"][metric]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    labelled = [t for t, row in sc["by_task"].items() if row["labels"]]
    assert "task1388_cb_entailment" in labelled and len(labelled) >= 4
    # the tiny model's context is 512 tokens: some prompts are cut, and the results say how many
    assert sc["truncated"] == sc["efficiency"]["truncated_requests"] > 0
    assert sum(row["truncated"] for row in sc["by_task"].values()) == round(
        sc["metrics"]["truncated"]["value"] * sc["n"]
    )


def test_eval_tasks_picks_the_sni_tasks_and_refuses_bad_ones(tiny_model_dir, shared_data, tmp_path, capsys):
    """`daytune eval --tasks` scores the named SNI tasks (a sweep's validation tasks, say) instead of the ten."""
    out = tmp_path / "val"
    args = ["eval", "--model", str(tiny_model_dir), "--suite", "unseen", "--data-root", str(shared_data)]
    tasks = "task642_esnli_classification,task1562_zest_text_modification"
    assert (
        main([*args, "--tasks", tasks, "--max-instances", "2", "--bootstrap", "20", "--out", str(out)]) == 0
    )
    sni = json.loads((out / "results.json").read_text())["scenarios"]["sni"]
    assert list(sni["by_task"]) == tasks.split(",") and sni["n"] == 4
    bad = tmp_path / "bad"
    assert main([*args, "--tasks", "task642_esnli_classification,task0_nope", "--out", str(bad)]) == 2
    assert "--tasks: no task file" in capsys.readouterr().err and not bad.exists()
    assert main([*args[:4], "quick", "--tasks", "task642_esnli_classification", "--out", str(bad)]) == 2
    assert "has no sni scenario" in capsys.readouterr().err and not bad.exists()


# ---- held out by task, and by Source -------------------------------------------------------------------------
def _data_recipe(tmp_path: Path, model_dir: Path, shared: Path, **fields) -> Path:
    recipe = {
        "name": "held",
        "model": str(model_dir),
        "datasets_dir": str(shared),
        "max_seq_len": 2048,
        "sources": [{"source": "natural_instructions", "tasks": ["task75*", "task1388*"], "max_per_task": 6}],
        "dedup": {"near": False},
        "decontaminate": {"eval_sets": ["gsm8k"]},
        "val_fraction": 0.0,
    }
    recipe.update(fields)
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"heldout_tasks": ["task9999_missing"]}, r"heldout_tasks\[0\]: unknown task 'task9999_missing'"),
        (
            {
                "heldout_tasks": ["task1388_cb_entailment"],
                "sources": [{"source": "natural_instructions", "tasks": ["task1388_cb_entailment"]}],
            },
            r"sources\[0\]\.tasks: task 'task1388_cb_entailment' is held out \(it is in heldout_tasks\)",
        ),
        (  # another task of the same source dataset counts as the held-out one
            {
                "heldout_tasks": ["task753_svamp_addition_question_answering"],
                "sources": [
                    {
                        "source": "natural_instructions",
                        "tasks": ["task752_svamp_multiplication_question_answering"],
                    }
                ],
            },
            r"sources\[0\]\.tasks: .*task752.* shares its Source \(svamp\) with held-out task task753",
        ),
        (
            {
                "heldout_tasks": ["unseen"],
                "sources": [{"source": "natural_instructions", "path": "TASK_FILE"}],
            },
            r"sources\[0\]\.path: task 'task1388_cb_entailment' is held out",
        ),
    ],
)
def test_held_out_tasks_in_the_mix_are_refused(
    tmp_path, tiny_model_dir, shared_data, capsys, fields, message
):
    for s in fields.get("sources", []):
        if s.get("path") == "TASK_FILE":
            s["path"] = str(shared_data / "natural_instructions" / "task1388_cb_entailment.json")
    recipe = _data_recipe(tmp_path, tiny_model_dir, shared_data, **fields)
    out = tmp_path / "out"
    assert main(["data", "prepare", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing written


def test_data_stage_never_trains_on_held_out_tasks_or_their_source(tmp_path, tiny_model_dir, shared_data):
    from daytune.data.prepare import prepare
    from daytune.data.recipe import load_data_recipe

    recipe = _data_recipe(
        tmp_path, tiny_model_dir, shared_data, heldout_tasks=["task753_svamp_addition_question_answering"]
    )
    card = prepare(load_data_recipe(recipe), tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    tasks = {r["meta"]["task"] for r in rows}
    assert tasks == {"task1388_cb_entailment"}  # the svamp tasks all went with the held-out one
    held = card["heldout"]
    assert held["tasks"] == ["task753_svamp_addition_question_answering"]
    assert held["same_source_as"] == {
        "task752_svamp_multiplication_question_answering": "task753_svamp_addition_question_answering",
        "task754_svamp_common-division_question_answering": "task753_svamp_addition_question_answering",
    }
    removed = {r["reason"]: r["count"] for r in card["removed"]}
    assert removed["held out (heldout_tasks)"] == 195  # every instance of task753
    assert removed["same Source as a held-out task"] == 108 + 165
    assert any(c["name"] == "heldout_tasks" and c["items"] == 195 for c in card["decontamination"]["checked"])
    assert "## Held-out tasks" in (tmp_path / "out" / "data_card.md").read_text()


def test_a_run_scores_exactly_its_held_out_tasks(tmp_path, tiny_recipe):
    """The unseen suite of a run evaluates the tasks its data card holds out, and refuses tasks it trained on."""
    from daytune.pipeline import run_suite_plan

    folder = tmp_path / "data"
    folder.mkdir()
    card = {"heldout": {"tasks": ["task753_svamp_addition_question_answering"]}, "sources": []}
    (folder / "data_card.json").write_text(json.dumps(card))
    cfg = load_run_config(tiny_recipe(data={"train": str(folder)}))
    (plan,) = run_suite_plan(cfg, "unseen")
    assert plan[0] == "sni" and plan[1].subjects == ["task753_svamp_addition_question_answering"]
    card = {"sources": [{"task_licences": {"task1388_cb_entailment": "CC BY-SA 3.0"}}]}
    (folder / "data_card.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match="trains on 1 task.*task1388_cb_entailment.*heldout_tasks"):
        run_suite_plan(cfg, "unseen")
    assert [n for n, _ in suite_plan("quick")] == [n for n, _ in run_suite_plan(cfg, "quick")]


def test_a_runs_unseen_suite_is_held_out_of_its_data(tmp_path, tiny_recipe, shared_data):
    """With eval.suite unseen and a data recipe that names no held-out tasks, the data stage holds the suite's
    tasks out: a wildcard that would include two of them trains on the others only."""
    from daytune.pipeline import prepare_recipe_data
    from daytune.progress import Reporter

    data = _data_recipe(tmp_path, Path("smollm2-135m"), shared_data)
    spec = yaml.safe_load(data.read_text())
    spec["sources"][0]["tasks"] = ["task13*"]  # task134, task1382 (quarel), task1388 (cb), task1393 (copa)
    data.write_text(yaml.safe_dump(spec))
    cfg = load_run_config(tiny_recipe(data={"prepare": str(data), "train": None, "max_seq_len": 2048}))
    card = prepare_recipe_data(
        cfg, tmp_path / "prepared", Reporter(quiet=True), [("unseen", str(shared_data), None)]
    )
    assert card["heldout"]["tasks"] == list(UNSEEN_TASKS)
    rows = [json.loads(x) for x in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    trained = {"task1382_quarel_write_correct_answer", "task134_winowhy_reason_generation"}
    assert {r["meta"]["task"] for r in rows} == trained  # task13* less cb (1388) and copa (1393)


def test_validation_tasks_are_held_out_but_not_scored_as_unseen(
    tmp_path, tiny_model_dir, tiny_recipe, shared_data
):
    from daytune.data.prepare import prepare
    from daytune.data.recipe import load_data_recipe
    from daytune.pipeline import run_suite_plan

    recipe = _data_recipe(
        tmp_path,
        tiny_model_dir,
        shared_data,
        heldout_tasks=["task753_svamp_addition_question_answering"],
        validation_tasks=["task1388_cb_entailment"],
    )
    spec = yaml.safe_load(recipe.read_text())
    spec["sources"][0]["tasks"].append("task1382*")
    recipe.write_text(yaml.safe_dump(spec))
    card = prepare(load_data_recipe(recipe), tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert {r["meta"]["task"] for r in rows} == {"task1382_quarel_write_correct_answer"}
    assert card["heldout"]["tasks"] == ["task753_svamp_addition_question_answering"]
    assert card["heldout"]["validation_tasks"] == ["task1388_cb_entailment"]
    cfg = load_run_config(tiny_recipe(data={"train": str(tmp_path / "out")}))
    ((_, settings),) = run_suite_plan(cfg, "unseen")  # the test tasks only: a sweep tuned on the others
    assert settings.subjects == ["task753_svamp_addition_question_answering"]
