"""The evaluation suite on the tiny model and small real samples: engine batching with shared prefixes, the two LM
backends agreeing, every scenario and metric, suites, reports, the CLI and the lm-eval bridge."""

import json
import math
import socket
import threading
import time
from random import Random

import pytest
import torch
from conftest import EXAMPLES
from test_engine import decode_alone

from daytune.cli import main
from daytune.engine import decode, score
from daytune.engine.forward import prefix_groups
from daytune.engine.text import cut_pieces
from daytune.eval import metrics as M
from daytune.eval.lm import GenerateRequest, HttpLM, LocalLM, normalize_request, rolling_windows
from daytune.eval.perturbations import PERTURBATIONS, perturb
from daytune.eval.report import compare, markdown_table
from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings
from daytune.eval.scenarios.generation import gsm8k_solution, wikitext_documents
from daytune.eval.suites import run_suite

SAMPLES = EXAMPLES / "data" / "eval"


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


# -- engine ---------------------------------------------------------------------------------------------------------


def test_shared_prefix_loglikelihood_matches_full_forward(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 500, (40,), generator=g).tolist()
    reqs = []
    for q in range(5):
        ctx = prefix + torch.randint(3, 500, (3 + q,), generator=g).tolist()
        reqs += [(ctx, [int(t)]) for t in torch.randint(3, 500, (3,), generator=g)]
        reqs.append((ctx, torch.randint(3, 500, (4,), generator=g).tolist()))
    reqs.append(([5, 6], [7, 8]))
    groups, rest = prefix_groups([c + x[:-1] for c, x in reqs], [len(c) - 1 for c, _ in reqs])
    assert [len(m) for _, m in groups] == [len(reqs) - 1] and groups[0][0] == 40 and len(rest) == 1
    got = score.loglikelihood_detailed(model, reqs, batch_size=3, pad_id=2)
    for (ctx, cont), (value, greedy) in zip(reqs, got):
        lp = full_logprobs(model, ctx + cont)
        rows = [lp[len(ctx) - 1 + j] for j in range(len(cont))]
        assert abs(value - sum(r[t].item() for r, t in zip(rows, cont))) < 1e-4
        assert greedy == all(int(r.argmax()) == t for r, t in zip(rows, cont))
    assert score.loglikelihood(model, reqs, 3, 2) == pytest.approx([v for v, _ in got], abs=1e-6)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_model):
    model, _ = tiny_model
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 500, (30,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 500, (1 + q,), generator=g).tolist() for q in range(5)] + [[5, 6, 7]]
    firsts = {}
    out = decode.greedy_generate_batch(
        model,
        prompts,
        max_new_tokens=8,
        batch_size=4,
        pad_id=2,
        on_first_step=lambda i, lp: firsts.update({i: lp}),
    )
    for i, (p, o) in enumerate(zip(prompts, out)):
        ref_ids, ref_logprobs = decode_alone(model, p, 8)
        assert o.token_ids == ref_ids
        assert o.logprobs == pytest.approx(ref_logprobs, abs=1e-4)
        assert torch.allclose(firsts[i], full_logprobs(model, p)[-1], atol=1e-4)
    cut = decode.greedy_generate_batch(
        model,
        prompts[:2],
        max_new_tokens=8,
        pad_id=2,
        stop_check=lambda i, ids: i == 0 and len(ids) == 3,
    )
    assert cut[0].token_ids == out[0].token_ids[:3] and cut[0].finish_reason == "stop"
    assert cut[1].token_ids == out[1].token_ids


# -- LM helpers -----------------------------------------------------------------------------------------------------


def test_request_seams_windows_and_stops():
    assert normalize_request("Answer: ", "B") == ("Answer:", " B")
    ids = list(range(10))
    windows = rolling_windows(ids, 4)
    assert windows[0] == [0, 1, 2, 3, 4] and all(len(w) <= 5 for w in windows)
    assert sum(len(w) - 1 for w in windows) == len(ids) - 1  # every token but the first scored once
    assert [w[1:] for w in windows] and sum((w[1:] for w in windows), []) == ids[1:]
    assert cut_pieces([" B", ".\n", "Q"], ["\n"]) == (
        [" B", "."],
        True,
    )  # the crossing token keeps its part before it
    assert cut_pieces([" B", "\n"], ["\n"]) == ([" B"], True)
    assert cut_pieces([" 1", "2"], ["\n"]) == ([" 1", "2"], False)


def test_local_loglikelihood_splits_at_the_context_seam(tiny_model):
    model, tok = tiny_model
    lm = LocalLM(model, tok)
    ctx, cont = lm.encode_pair("The answer is ", "42")
    assert tok.decode(ctx) == "The answer is" and tok.decode(cont) == " 42"
    (res,) = lm.loglikelihood([("The answer is ", "42")])
    lp = full_logprobs(model, ctx + cont)
    assert res.logprob == pytest.approx(
        sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)), abs=1e-4
    )
    assert res.n_tokens == len(cont)


# -- metrics --------------------------------------------------------------------------------------------------------


def test_exact_match_family_and_final_number():
    assert M.exact_match("B", " B ") == 1 and M.exact_match("B", "B.") == 0
    assert M.prefix_exact_match("B", " B. because") == 1
    assert M.quasi_exact_match("The Eiffel tower", "eiffel tower!") == 1
    assert M.final_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
    assert M.final_number("I think 12 then 18.0") == "18"
    assert M.final_number_exact_match(gsm8k_solution("x <<2*3=6>>6\n#### 6"), "... The answer is 6.") == 1
    assert gsm8k_solution("She has 2*3=<<2*3=6>>6.\n#### 6") == "She has 2*3=6. The answer is 6."


def test_ece_bias_perplexity_and_bootstrap():
    assert M.ece([0.9] * 10, [1] * 9 + [0], bins=1) == pytest.approx(0.0)
    assert M.ece([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    assert M.ece([0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1], bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.3)
    recs = [  # ambiguous: 2 answered (both biased), accuracy 1/3 -> (1 - 1/3) * (2 * 2/2 - 1)
        {"condition": "ambig", "polarity": "neg", "pred_group": "target", "exact_match": 0},
        {"condition": "ambig", "polarity": "nonneg", "pred_group": "non-target", "exact_match": 0},
        {"condition": "ambig", "polarity": "neg", "pred_group": "unknown", "exact_match": 1},
        {"condition": "disambig", "polarity": "neg", "pred_group": "target", "exact_match": 1},
        {"condition": "disambig", "polarity": "neg", "pred_group": "non-target", "exact_match": 0},
    ]
    bias = M.bbq_bias(recs)
    assert bias["bias_ambiguous"] == pytest.approx(2 / 3) and bias["bias_disambiguated"] == pytest.approx(0.0)
    pp = M.perplexities([{"logprob": -10.0, "words": 5, "bytes": 20, "tokens": 8}])
    assert pp["word_perplexity"] == pytest.approx(math.exp(2)) and pp["bits_per_byte"] == pytest.approx(
        10 / (20 * math.log(2))
    )
    rng = Random(0)
    recs = [{"x": float(rng.random() < 0.3)} for _ in range(200)]
    lo, hi = M.bootstrap_ci(recs, M.mean_of("x"), iters=300)
    assert lo < M.mean_of("x")(recs) < hi and hi - lo < 0.2
    assert M.bootstrap_ci(recs, M.mean_of("x"), iters=300) == (lo, hi)  # seeded
    better = [{"x": 1.0} if r["x"] == 0 and i % 2 else r for i, r in enumerate(recs)]
    lo, hi, p = M.paired_bootstrap(recs, better, M.mean_of("x"), iters=300)
    assert lo > 0 and p < 0.05
    lo, hi, p = M.paired_bootstrap(recs, recs, M.mean_of("x"), iters=100)
    assert lo == hi == 0


def test_perturbations_are_deterministic_and_do_what_they_say():
    text = "John said he is not going to the store with his brother. It is late."
    mm, opts = perturb("mild_mix", "i1", text, ["His Father"])
    assert mm == perturb("mild_mix", "i1", text, ["His Father"])[0] and opts == ["His Father"]
    assert mm != text and mm.lower() == mm and "he's" in mm.replace("  ", " ") or "isn't" in mm
    g, gopts = perturb("gender", "i1", text, ["His Father"])
    assert "she is" in g and "her sister" in g and gopts == ["Her Mother"]
    n, _ = perturb("person_name", "i1", text, [])
    assert "John" not in n and n.endswith("is not going to the store with his brother. It is late.")
    d, _ = perturb("dialect", "i1", text, [])
    assert "gonna" in d and "brotha" in d
    assert set(PERTURBATIONS) == {"mild_mix", "dialect", "gender", "person_name"}


# -- scenarios on the shipped samples (and the full datasets where needed) ------------------------------------------


def test_mmlu_prompt_is_helms_format():
    scen = SCENARIOS["mmlu"]()
    inst = scen.load(DataRoot(SAMPLES), Settings(max_instances=1, subjects=["abstract_algebra"]))[0]
    prompt = scen.prompt(inst)
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\nQuestion: "
    )
    assert prompt.count("\nAnswer: ") == 5 and prompt.endswith(f"\nD. {inst.options[3]}\nAnswer:")
    assert "\n\nQuestion: " + inst.input + "\nA. " in prompt


def test_loaders_parse_the_real_files():
    root = DataRoot(SAMPLES)
    tqa = SCENARIOS["truthfulqa"]().load(root, Settings(max_instances=40))
    assert len(tqa) == 40 and len({i.answer for i in tqa}) > 1  # shuffled: the answer is not always A
    raw = json.loads((SAMPLES / "truthfulqa/mc_task.json").read_text())
    first = tqa[0]
    correct = [k for k, v in raw[5]["mc1_targets"].items() if v == 1][0]
    assert first.options[first.answer] == correct
    bbq = SCENARIOS["bbq"]().load(root, Settings(max_instances=30))
    assert {i.meta["condition"] for i in bbq} == {"ambig", "disambig"}
    age = next(i for i in bbq if i.id == "bbq/Age/2")  # "grandfather"/"grandson": the old are stereotyped
    assert age.meta["groups"][age.options.index("The grandfather")] == "target"
    assert "unknown" in age.meta["groups"]
    obqa = SCENARIOS["openbookqa"]().load(root, Settings(max_instances=3))
    assert len(obqa[0].options) == 4 and obqa[0].answer in range(4)
    docs = SCENARIOS["wikitext2"]().load(root, Settings())
    assert len(docs) == 3 and all(d.input.startswith(" = ") for d in docs)
    gsm = SCENARIOS["gsm8k"]().load(root, Settings(max_instances=2))
    assert gsm[0].reference.endswith(f"The answer is {M.final_number(gsm[0].reference)}.")


def test_full_datasets_load(shared_data):
    root = DataRoot(shared_data)
    assert len(wikitext_documents((shared_data / "wikitext2/wiki.test.raw").read_text())) == 62
    xs = SCENARIOS["xsum"]().load(root, Settings(max_instances=3, shots=1, max_words=50))
    assert len(xs) == 3 and len(xs[0].input.split()) <= 50 and xs[0].reference
    mmlu = SCENARIOS["mmlu"]().load(root, Settings(subjects=["all"], max_instances=1))
    assert len(mmlu) == 57


def test_missing_data_names_the_file(tmp_path):
    from daytune.errors import DataError

    with pytest.raises(DataError, match=r"mmlu/dev/abstract_algebra_dev.csv.*DAYTUNE_EVAL_DATA"):
        SCENARIOS["mmlu"]().load(DataRoot(tmp_path), Settings())
    (tmp_path / "openbookqa").mkdir()
    (tmp_path / "openbookqa/test.jsonl").write_text(
        '{"question": "q", "options": "A. x", "answer": "A. x"}\n{bad\n'
    )
    with pytest.raises(DataError, match=r"test.jsonl:2"):
        SCENARIOS["openbookqa"]().load(DataRoot(tmp_path), Settings())


# -- suites through both backends -----------------------------------------------------------------------------------

# The tiny model's context is 512 tokens, so the prompts here are kept short enough for the server to accept.
PLAN = [
    ("mmlu", Settings(max_instances=2, shots=0, perturbations=["robustness", "fairness"])),
    ("truthfulqa", Settings(max_instances=3, shots=1, perturbations=["robustness"])),
    ("bbq", Settings(max_instances=4, shots=0)),
    ("gsm8k", Settings(max_instances=2, shots=0, max_new_tokens=12)),
    ("openbookqa", Settings(max_instances=3, shots=2)),
    ("wikitext2", Settings(max_instances=2)),
]


@pytest.fixture(scope="module")
def http_url(tiny_model_dir):
    """The daytune server on 127.0.0.1, in this process."""
    import uvicorn

    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel

    server = ServeModel(str(tiny_model_dir), device="cpu", log=lambda *a: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300  # a hang guard: a busy machine starts the server late, not never
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def local_results(tiny_model):
    model, tok = tiny_model
    return run_suite(
        LocalLM(model, tok, name="tiny"), plan=PLAN, data_root=SAMPLES, bootstrap=200, log=lambda *a: None
    )


def test_suite_results_have_every_metric_with_cis(local_results):
    sc = local_results["scenarios"]
    assert list(sc) == [name for name, _ in PLAN]
    mmlu = sc["mmlu"]["metrics"]
    for key in (
        "exact_match",
        "exact_match_robustness",
        "exact_match_fairness",
        "ece_10_bin",
        "accuracy_by_likelihood",
    ):
        m = mmlu[key]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], key
    assert mmlu["exact_match_robustness"]["value"] <= mmlu["exact_match"]["value"]
    assert {"bias_ambiguous", "bias_disambiguated"} <= set(sc["bbq"]["metrics"])
    assert "exact_match_fairness" not in sc["truthfulqa"]["metrics"]
    wt = sc["wikitext2"]["metrics"]
    assert (
        wt["bits_per_byte"]["value"] > 0 and wt["word_perplexity"]["value"] > wt["byte_perplexity"]["value"]
    )
    assert sc["mmlu"]["n"] == 10 and len(sc["mmlu"]["records"]) == 10
    for s in sc.values():
        e = s["efficiency"]
        assert e["requests"] > 0 and e["tokens_per_s"] > 0 and e["latency_mean_s"] > 0
    table = markdown_table(local_results)
    assert "| mmlu | exact_match |" in table and "| wikitext2 | bits_per_byte (lower is better) |" in table


def test_http_backend_gives_the_local_scores(local_results, http_url):
    remote = run_suite(
        HttpLM(http_url, concurrency=3), plan=PLAN, data_root=SAMPLES, bootstrap=200, log=lambda *a: None
    )
    for name, sc in local_results["scenarios"].items():
        other = remote["scenarios"][name]
        for a, b in zip(sc["records"], other["records"]):
            assert a["id"] == b["id"]
            for key, value in a.items():
                if isinstance(value, float) and key in ("logprob", "confidence"):
                    assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, key)
                elif key == "option_logprobs":
                    assert b[key] == pytest.approx(value, abs=1e-3), name
                else:
                    assert b[key] == value, (name, key)
        for metric, m in sc["metrics"].items():
            assert other["metrics"][metric]["value"] == pytest.approx(m["value"], rel=1e-4, abs=1e-4), (
                name,
                metric,
            )
    assert remote["model"]["backend"] == "http" and remote["model"]["server"]["status"] == "ok"


def test_http_requests_are_helms(http_url, tiny_model):
    """Single requests: a long continuation, a context whose last word merges with the continuation, generation
    with a stop sequence."""
    model, tok = tiny_model
    local, remote = LocalLM(model, tok), HttpLM(http_url)
    reqs = [("Natalia sold clips", " to 48 of her friends in April"), ("The answer is", "n't obvious")]
    for a, b in zip(local.loglikelihood(reqs), remote.loglikelihood(reqs)):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4) and a.n_tokens == b.n_tokens
        assert a.is_greedy == b.is_greedy
    free = local.generate([GenerateRequest("Weng earns $12 an hour", 10)])[0].text
    stop = free[3:5]
    gen = [GenerateRequest("Weng earns $12 an hour", 10, [stop])]
    assert (
        local.generate(gen)[0].text == remote.generate(gen)[0].text
        and stop not in remote.generate(gen)[0].text
    )


def test_compare_marks_significant_differences(local_results):
    worse = json.loads(json.dumps(local_results))
    for r in worse["scenarios"]["mmlu"]["records"]:
        r["likelihood_correct"] = 0.0
    best = json.loads(json.dumps(local_results))
    for r in best["scenarios"]["mmlu"]["records"]:
        r["likelihood_correct"] = 1.0
    rows = {(r["scenario"], r["metric"]): r for r in compare(worse, best, iters=200)}
    row = rows[("mmlu", "accuracy_by_likelihood")]
    assert row["delta"] == 1.0 and row["significant"] and row["better"]
    same = {(r["scenario"], r["metric"]): r for r in compare(local_results, local_results, iters=100)}
    assert not same[("mmlu", "exact_match")]["significant"] and same[("mmlu", "exact_match")]["delta"] == 0


# -- CLI and the quickstart's eval step -----------------------------------------------------------------------------


def test_cli_eval_writes_results_and_compares(capsys, tmp_path, tiny_model_dir):
    args = [
        "--quiet",
        "eval",
        "--model",
        str(tiny_model_dir),
        "--scenarios",
        "mmlu,wikitext2",
        "--max-instances",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "a"), "--bootstrap", "50"]) == 0
    res = json.loads((tmp_path / "a/results.json").read_text())
    assert set(res["scenarios"]) == {"mmlu", "wikitext2"} and res["suite"] == "quick"
    assert "| mmlu | exact_match |" in (tmp_path / "a/results.md").read_text()
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--bootstrap", "50"]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b/results.json")]) == 0
    out = capsys.readouterr().out
    assert "| mmlu | exact_match |" in out and "+0.0000" in out
    assert main(["eval", "--model", str(tiny_model_dir), "--suite", "nope"]) == 2
    assert "--suite 'nope'" in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(tiny_model_dir), "--data-root", str(tmp_path), "--scenarios", "bbq"])
        == 2
    )
    assert "bbq/Age.jsonl" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2


def test_run_recipe_evaluates_the_suite_base_and_tuned(tiny_recipe):
    recipe = tiny_recipe(
        train={"max_steps": 1},
        eval={
            "suite": "quick",
            "scenarios": ["openbookqa", "gsm8k"],
            "max_instances": 2,
            "multiple_choice": None,
        },
    )
    assert main(["--quiet", "run", str(recipe)]) == 0
    (run,) = (recipe.parent / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    for side in ("base", "tuned"):
        sc = summary["eval"][side]["suite"]["scenarios"]
        assert set(sc) == {"openbookqa", "gsm8k"} and sc["openbookqa"]["n"] == 2
        assert "exact_match" in sc["gsm8k"]["metrics"]
        assert (run / "eval/quick" / side / "results.json").is_file()
    assert summary["eval"]["base"]["heldout"]["rows"] == 8
    delta = summary["eval"]["delta"]  # tuned - base, paired over the same examples, with a 95% CI
    assert delta["heldout_loss"]["n"] == 8
    assert (
        delta["heldout_loss"]["ci_low"] <= delta["heldout_loss"]["delta"] <= delta["heldout_loss"]["ci_high"]
    )
    assert {k.split("/")[0] for k in delta} == {"heldout_loss", "openbookqa", "gsm8k"}
    assert delta["openbookqa/exact_match"]["n"] == 2


def test_harness_bridge_runs_lm_evals_tasks_offline(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from daytune.eval.harness import arithmetic_rows, harness_summary, hf_reference, run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    row = arithmetic_rows("arithmetic_2da", n=3)[0]
    a, b = (int(x) for x in row["context"].split("What is ")[1].split("?")[0].split(" plus "))
    assert row["context"].startswith("\n\nQ: What is ") and row["completion"] == f" {a + b}"
    model, tok = tiny_model
    lm = LocalLM(model, tok)
    root = DataRoot(SAMPLES)
    tasks = ["wikitext", "openbookqa", "truthfulqa_mc1", "arithmetic_2da", "mmlu_abstract_algebra"]
    ours = run_harness(lm, tasks, root, tmp_path / "ours", limit=2, log_samples=True, bootstrap_iters=0)
    summary = harness_summary(ours)
    assert summary["wikitext"]["bits_per_byte"] > 0 and 0 <= summary["arithmetic_2da"]["acc"] <= 1
    assert {"acc", "acc_norm"} <= set(summary["openbookqa"]) and "acc" in summary["truthfulqa_mc1"]
    ref = run_harness(
        hf_reference(lm), tasks, root, tmp_path / "ref", limit=2, log_samples=True, bootstrap_iters=0
    )
    for task in tasks:  # lm-eval's own HFLM gives the same value for every request
        for sa, sb in zip(ours["samples"][task], ref["samples"][task]):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                va = ra[0][0] if isinstance(ra[0], (list, tuple)) else ra[0]
                vb = rb[0][0] if isinstance(rb[0], (list, tuple)) else rb[0]
                assert va == pytest.approx(vb, abs=1e-4), task
