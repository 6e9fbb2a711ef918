"""`daytune run`: data -> train -> eval (base and tuned) in one command, everything written to one run folder;
and every base-vs-tuned evaluation `daytune eval` runs (a suite, a recipe's eval section, lm-eval tasks).

With `data.prepare` (a data recipe), the data stage builds the dataset into `<run>/data/` first, decontaminated
also against the run's own eval files, and the run trains on it; config.yaml then records the prepared folder and
its fingerprint, so a resume trains on exactly the same rows.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from daytune.config import RunConfig, dump_yaml, load_run_config
from daytune.errors import ConfigError, RunError
from daytune.fileio import write_json_atomic, write_text_atomic
from daytune.models import ModelSource
from daytune.plan import write_run_plan
from daytune.progress import Reporter
from daytune.track import RunDir, record_eval
from daytune.train.checkpoint import list_checkpoints, remove_killed_saves
from daytune.train.loop import find_resume_checkpoint, fit, setup
from daytune.train.state import TrainResult


def start_or_resume(
    cfg: RunConfig | None, argv: list[str], resume: str | None, reporter: Reporter, overrides: list[str] = ()
) -> tuple[RunConfig, RunDir, Path | None]:
    """A new run folder, or (with --resume) the existing one and its newest checkpoint."""
    if resume is None:
        run = _new_run(cfg, argv)
        with discard_if_it_fails(run):
            prepare_run_data(cfg, run, reporter)
        return cfg, run, None
    if resume == "auto":
        if cfg is None:
            raise RunError("--resume auto needs the recipe, to know which runs to look at")
        run = find_latest_unfinished(Path(cfg.out_dir), cfg.name)
    else:
        run = RunDir.open(resume)
    saved = load_run_config(run.path / "config.yaml", overrides)
    run.note_resume(argv)
    saved.out_dir = str(run.path.parent)
    if int(os.environ.get("RANK", "0")) == 0:
        if run.read_summary().get("failed"):  # this attempt starts afresh; a new failure marks it again
            run.update_summary(failed=None)
        cleaned = remove_killed_saves(run.path)
        if cleaned:
            reporter.log(f"Cleaned up what interrupted saves left: {', '.join(cleaned)}")
    return saved, run, find_resume_checkpoint(run)


def prepare_run_data(cfg: RunConfig, run: RunDir, reporter: Reporter) -> None:
    """The data stage of a new run: prepare `data.prepare` into <run>/data (if set), then pin the training
    data's fingerprint in config.yaml. Under a multi-process launch the main process does it and tells the
    others where the data is."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _prepare_run_data(cfg, run, reporter)
        return
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    holder = [None]
    if PartialState().is_main_process:
        _prepare_run_data(cfg, run, reporter)
        holder = [(cfg.data.train, cfg.data.fingerprint)]
    broadcast_object_list(holder, from_process=0)
    cfg.data.train, cfg.data.fingerprint = holder[0]


def _prepare_run_data(cfg: RunConfig, run: RunDir, reporter: Reporter) -> None:
    from daytune.data.trainset import dataset_fingerprint

    if cfg.data.prepare:
        if cfg.data.train:
            raise ConfigError(
                "data: set either data.train (a JSONL or prepared folder) or data.prepare, not both"
            )
        suites = [(cfg.eval.suite, cfg.eval.data_root, None)] if cfg.eval.suite else []
        prepare_recipe_data(cfg, run.path / "data", reporter, suites)
        cfg.data.train = str(run.path / "data")
    if cfg.data.train and Path(cfg.data.train).exists() and not cfg.data.fingerprint:
        cfg.data.fingerprint = dataset_fingerprint(cfg.data.train)
    write_text_atomic(run.path / "config.yaml", dump_yaml(cfg))


def prepare_recipe_data(
    cfg: RunConfig,
    out: Path,
    reporter: Reporter,
    suites: list[tuple[str, str | None, list[str] | None]],
    overrides=(),
    validation_tasks: list[str] = (),
) -> dict:
    """Prepare the run's data recipe (`data.prepare`, with `overrides`) into `out` with the run's model, template
    and length, decontaminated against the run's eval files and the data of `suites` ((suite, data root, SNI
    tasks or None for the suite's own) the run will be scored on). The suites' SNI tasks join the recipe's
    heldout_tasks (those in `validation_tasks`, a sweep's objective, join its validation_tasks). Returns the data
    card."""
    from daytune.data.heldout import expand
    from daytune.data.prepare import prepare
    from daytune.data.recipe import load_data_recipe
    from daytune.eval.suites import sni_tasks, suite_data_root, suite_plan

    recipe = load_data_recipe(cfg.data.prepare, overrides)
    # the run's model, template and length decide tokens and filters, so they apply to the data stage too
    recipe.model, recipe.template = cfg.model, cfg.data.template
    recipe.max_seq_len, recipe.system_prompt = cfg.data.max_seq_len, cfg.data.system_prompt
    scored = [t for suite, _, tasks in suites for t in (tasks or sni_tasks(suite_plan(suite)))]
    val = list(dict.fromkeys([*recipe.validation_tasks, *validation_tasks]))
    test = [t for t in dict.fromkeys(expand([*recipe.heldout_tasks, *scored])) if t not in val]
    recipe.heldout_tasks, recipe.validation_tasks = test, val  # never train on either
    evals = [p for p in (cfg.eval.heldout, cfg.eval.multiple_choice) if p and Path(p).is_file()]
    reporter.log(f"Preparing data from {cfg.data.prepare}...")
    # the sets the run will be scored on, wherever the default datasets folder is
    suite_dirs = list(dict.fromkeys(suite_data_root(suite, root) for suite, root, _ in suites))
    card = prepare(
        recipe,
        out,
        reporter=reporter,
        extra_eval_files=evals,
        extra_eval_dirs=suite_dirs,
        recipe_file=cfg.data.prepare,
    )
    for w in card["warnings"]:
        reporter.log(f"data warning: {w}")
    return card


def data_card(cfg: RunConfig) -> dict:
    """The card of the run's prepared training data ({} for a plain JSONL)."""
    import json

    card = Path(cfg.data.train or "") / "data_card.json" if cfg.data.train else None
    if card is None or not card.is_file():
        return {}
    return json.loads(card.read_text(encoding="utf-8"))


def run_suite_plan(
    cfg: RunConfig, suite: str, scenarios=None, max_instances=None, tasks=None, subjects=None
) -> list:
    """The plan of `suite` for a run: its SNI scenario evaluates `tasks`, else the tasks the run's data held out;
    an SNI task the run trained on is refused, since it would be scored as unseen."""
    from daytune.eval.suites import sni_tasks, suite_plan, with_tasks

    card = data_card(cfg)
    tasks = tasks or (card.get("heldout") or {}).get("tasks")
    plan = with_tasks(suite_plan(suite, scenarios, max_instances, subjects), tasks)
    trained = {t for s in card.get("sources", []) for t in s.get("task_licences", {})}
    seen = [t for t in sni_tasks(plan) if t in trained]
    if seen:
        raise ConfigError(
            f"eval.suite {suite}: the run's data ({cfg.data.train}) trains on {len(seen)} task(s) this suite "
            f"would score as unseen: {', '.join(seen[:4])}; hold them out (heldout_tasks in the data recipe)"
        )
    return plan


def _new_run(cfg: RunConfig, argv: list[str]) -> RunDir:
    """Create the run folder; under a multi-process launch, the main process creates it and tells the others."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        run = RunDir.create(cfg.out_dir, cfg.name)
        run.write_start(dump_yaml(cfg), argv)
        return run
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from daytune.hardware import pick_device

    state = PartialState(cpu=pick_device(cfg.train.device).type == "cpu")  # the same state setup() will use
    holder = [None]
    if state.is_main_process:
        run = RunDir.create(cfg.out_dir, cfg.name)
        run.write_start(dump_yaml(cfg), argv)
        holder = [str(run.path)]
    broadcast_object_list(holder, from_process=0)
    return RunDir(holder[0])


def train_run(
    cfg: RunConfig,
    run: RunDir,
    reporter: Reporter | None = None,
    resume: Path | None = None,
    on_validation=None,
) -> TrainResult:
    """The train stage: set up, write the planner's prediction for this run to plan.json (before any step, to
    compare with what the run measures), then fit; `resume` is a checkpoint to carry on from. `on_validation(step,
    val_loss)` is called after each validation and stops the run (stopped_by "pruned") when it returns True."""
    session = setup(cfg, run, reporter, resume)
    session.on_validation = on_validation
    if session.is_main:
        facts = (session.model_dir, session.device, session.precision, session.examples, session.stats)
        write_run_plan(run, cfg, *facts, session.reporter.log)
    return fit(session)


@contextmanager
def discard_if_it_fails(run: RunDir, fresh: bool = True):
    """A new run whose train stage fails before it trained anything leaves no folder behind (so `runs list`
    never shows it); one with checkpoints or metrics is kept, resumable, and marked failed in summary.json.
    A resumed run's folder is never removed."""
    try:
        yield
    except BaseException as e:
        if int(os.environ.get("RANK", "0")) == 0 and run.path.is_dir():
            if fresh and not list_checkpoints(run.checkpoints) and not run.read_metrics():
                shutil.rmtree(run.path, ignore_errors=True)
            else:
                run.update_summary(failed=f"{type(e).__name__}: {e}")
        raise


def find_latest_unfinished(out_dir: Path, name: str) -> RunDir:
    if out_dir.is_dir():
        for path in sorted((p for p in out_dir.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True):
            if not (path / "config.yaml").is_file() or not (path / "checkpoints").is_dir():
                continue
            run = RunDir(path)
            if run.read_summary().get("finished"):
                continue
            try:
                if load_run_config(path / "config.yaml").name == name:
                    return run
            except Exception:
                continue
    raise RunError(f"--resume auto: no unfinished run named '{name}' with a checkpoint under {out_dir}")


def evaluate_pair(
    cfg: RunConfig,
    model_ref: str,
    trained: Path | None,
    reporter: Reporter,
    suite_dir: Path | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate the base model (unless eval.base is false) and, given a trained adapter or model folder, the tuned
    one, loaded back from disk (which also proves it loads). With `suite_dir`, the recipe's evaluation suite
    (eval.suite) runs too and writes its results under `suite_dir/<suite>/{base,tuned}/`. Both run on `device`
    (default: the training device, train.device) in its inference dtype (bf16 on GPUs, fp32 on CPUs)."""
    import torch

    from daytune.eval import evaluate
    from daytune.hardware import pick_device
    from daytune.models import ModelSource, load_for_inference, resolve_model

    where = pick_device(device or cfg.train.device, "--device" if device else "train.device")
    base_dir = str(resolve_model(model_ref, log=reporter.log))  # once: the base and the tuned model share it
    results = {}
    with torch.no_grad():
        if trained is None or cfg.eval.base:
            reporter.log(f"Evaluating the base model on {where}...")
            base, tokenizer, _ = load_for_inference(ModelSource(base_dir), where, log=reporter.log)
            results["base"] = evaluate(base, tokenizer, cfg.eval, cfg.data)
            if cfg.eval.suite and suite_dir is not None:
                results["base"]["suite"] = _suite(cfg, base, tokenizer, "base", suite_dir, reporter)
            del base
            gc.collect()
        if trained is not None:
            reporter.log(f"Evaluating the tuned model on {where}...")
            tuned, tokenizer, _ = load_for_inference(ModelSource(base_dir, trained), where, log=reporter.log)
            results["tuned"] = evaluate(tuned, tokenizer, cfg.eval, cfg.data)
            if cfg.eval.suite and suite_dir is not None:
                results["tuned"]["suite"] = _suite(cfg, tuned, tokenizer, "tuned", suite_dir, reporter)
    if "base" in results and "tuned" in results:
        results["delta"] = pair_deltas(
            results, suite_dir / cfg.eval.suite if cfg.eval.suite and suite_dir else None
        )
    return results


def pair_deltas(results: dict, suite_dir: Path | None) -> dict:
    """Tuned minus base with 95% CIs from paired bootstraps over the same examples: the held-out loss, and each
    suite scenario's main metric (from the records under `suite_dir/{base,tuned}`)."""
    from daytune.eval.basic import heldout_delta
    from daytune.eval.report import compare, load_results

    out: dict = {}
    if "heldout" in results["base"] and "heldout" in results["tuned"]:
        d = heldout_delta(results["base"]["heldout"], results["tuned"]["heldout"])
        if d is not None:
            out["heldout_loss"] = d
    if suite_dir is not None and (suite_dir / "tuned" / "results.json").is_file():
        a, b = (
            load_results(suite_dir / "base" / "results.json"),
            load_results(suite_dir / "tuned" / "results.json"),
        )
        main = {name: sc["main_metric"] for name, sc in b["scenarios"].items()}
        for row in compare(a, b):
            if main.get(row["scenario"]) == row["metric"]:
                keys = ("delta", "ci_low", "ci_high", "p", "n", "significant")
                out[f"{row['scenario']}/{row['metric']}"] = {k: row[k] for k in keys}
    return out


def evaluate_run(cfg: RunConfig, run: RunDir, reporter: Reporter, tuned: bool = True) -> dict:
    """The run's evaluation: the base model and (`tuned`) the trained one."""
    trained = run.trained if tuned else None
    results = evaluate_pair(cfg, cfg.model, trained, reporter, suite_dir=run.path / "eval")
    run.update_summary(eval=results)
    record_eval(run, cfg, results, None, cfg.model, trained)  # lineage; W&B/MLflow when configured
    return results


def _suite(cfg: RunConfig, model, tokenizer, label: str, suite_dir: Path, reporter: Reporter) -> dict:
    """Run the recipe's evaluation suite; full results go to <suite_dir>/<suite>/<label>/, the summary keeps each
    scenario's metrics with their 95% CIs."""
    from daytune.eval.lm import LocalLM
    from daytune.eval.report import write_results
    from daytune.eval.suites import run_suite

    lm = LocalLM(model, tokenizer, name=f"{cfg.model} ({label})", batch_size=cfg.eval.batch_size)
    plan = run_suite_plan(cfg, cfg.eval.suite, cfg.eval.scenarios, cfg.eval.max_instances)
    res = run_suite(lm, cfg.eval.suite, cfg.eval.data_root, log=reporter.log, plan=plan)
    res["title"] = label
    write_results(res, suite_dir / cfg.eval.suite / label)
    return suite_summary(res)


def suite_summary(res: dict) -> dict:
    """What summary.json keeps of a suite's results: each scenario's metrics with their 95% CIs."""
    return {
        "name": res["suite"],
        "seconds": res["seconds"],
        "scenarios": {
            name: {"n": sc["n"], "main_metric": sc["main_metric"], "metrics": sc["metrics"]}
            | ({"truncated": sc["truncated"]} if sc.get("truncated") else {})
            for name, sc in res["scenarios"].items()
        },
    }


def score_model(
    cfg: RunConfig, trained: Path | None, requests: dict[str, SuiteRequest], out: Path, reporter: Reporter
) -> dict[str, dict]:
    """One model (the run's base model, with `trained` when given), loaded once, scored on each named suite
    request (the run's held-out tasks for SNI) -> out/<name>/results.{json,md}; returns each suite's summary."""
    from daytune.eval.lm import LocalLM
    from daytune.eval.report import write_results
    from daytune.eval.suites import run_suite

    batch = next(iter(requests.values())).batch_size if requests else cfg.eval.batch_size
    lm = LocalLM.load(cfg.model, trained, batch, log=reporter.log)
    summaries = {}
    for label, req in requests.items():
        plan = req.plan or run_suite_plan(cfg, req.suite, req.scenarios, req.max_instances, req.tasks)
        res = run_suite(lm, req.suite, req.data_root, bootstrap=req.bootstrap, log=reporter.log, plan=plan)
        res["title"] = label
        write_results(res, out / label)
        summaries[label] = suite_summary(res)
    del lm
    gc.collect()
    return summaries


def _delta_cell(d: dict | None, fallback: float) -> tuple[str, str]:
    """(Δ with its 95% CI, instances) for the table; * marks a CI that excludes 0 (for suite scenarios, with
    enough instances for a verdict: eval.report.MIN_PAIRED)."""
    if d is None or d.get("ci_low") is None or math.isnan(d["ci_low"]):
        return f"{fallback:+.4f}", str(d["n"]) if d else ""
    star = " *" if d.get("significant", d["ci_low"] > 0 or d["ci_high"] < 0) else ""
    return f"{d['delta']:+.4f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{star}", str(d["n"])


def eval_table(results: dict) -> Table:
    """Base and tuned side by side; with both, Δ = tuned - base with its 95% CI (paired bootstrap over the same
    examples) and how many examples it rests on: a Δ of 0 on 3 instances says nothing, and the table shows it."""
    paired = len([c for c in ("base", "tuned") if c in results]) == 2
    table = Table(
        title="evaluation",
        caption="Δ [95% CI of Δ, paired bootstrap]; * = the CI excludes 0" if paired else None,
    )
    cols = [c for c in ("base", "tuned") if c in results]
    deltas = results.get("delta", {})
    table.add_column("metric")
    for c in cols:
        table.add_column(c, justify="right")
    if paired:
        table.add_column("Δ [95% CI]", justify="right")
        table.add_column("n", justify="right")
    rows = [
        ("held-out loss (lower is better)", ("heldout", "loss"), "heldout_loss"),
        ("held-out perplexity", ("heldout", "perplexity"), None),
        ("multiple-choice accuracy", ("multiple_choice", "accuracy"), None),
    ]
    for label, (section, key), dkey in rows:
        values = [results[c].get(section, {}).get(key) for c in cols]
        if all(v is None for v in values):
            continue
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        if paired and None not in values:
            n = results[cols[1]][section].get("rows")
            delta, count = _delta_cell(deltas.get(dkey) if dkey else None, values[1] - values[0])
            cells += [delta, count or ("" if n is None else str(n))]
        table.add_row(label, *cells)
    suites = [results[c].get("suite", {}).get("scenarios", {}) for c in cols]
    for name in suites[-1] if suites else []:
        metric = suites[-1][name]["main_metric"]
        values = [s.get(name, {}).get("metrics", {}).get(metric, {}).get("value") for s in suites]
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        if paired and None not in values:
            d = deltas.get(f"{name}/{metric}")
            delta, count = _delta_cell(d, values[1] - values[0])
            cells += [delta, count or str(suites[-1][name].get("n", ""))]
        table.add_row(f"{name}: {metric}", *cells)
    return table


def run_recipe(
    cfg: RunConfig | None,
    argv: list[str],
    reporter: Reporter,
    resume: str | None = None,
    overrides: list[str] = (),
) -> RunDir:
    if cfg is not None and cfg.eval.suite:
        # a bad suite or scenario name, or unseen tasks the data trains on, fail before training
        run_suite_plan(cfg, cfg.eval.suite, cfg.eval.scenarios, cfg.eval.max_instances)
    cfg, run, checkpoint = start_or_resume(cfg, argv, resume, reporter, overrides)
    reporter.log(f"Run folder: {run.path}")
    with discard_if_it_fails(run, fresh=checkpoint is None):
        result = train_run(cfg, run, reporter, resume=checkpoint)
    gc.collect()
    if cfg.eval.heldout or cfg.eval.multiple_choice or cfg.eval.suite:
        trained = result.steps > 0  # an untrained adapter is not evaluated as the tuned model
        if not trained:
            reporter.print("Not evaluating the untrained adapter as 'tuned'.", style="bold red")
        results = evaluate_run(cfg, run, reporter, tuned=trained)
        reporter.print(eval_table(results))
    reporter.print(f"\nRun folder: [bold]{run.path}[/bold]")
    reporter.print(f"Serve it:   daytune serve --run {run.path}")
    return run


# -- `daytune eval`: a suite, a recipe's eval section, lm-eval tasks ------------------------------------------------


@dataclass
class SuiteRequest:
    """What `daytune eval` scores: a suite (or some of its scenarios) on its data, with bootstrap CIs."""

    suite: str = "quick"
    scenarios: list[str] | None = None
    max_instances: int | None = None
    data_root: str | None = None
    bootstrap: int = 1000
    batch_size: int = 8  # requests per forward pass of a local model
    plan: list | None = None  # the suite's plan for a run (run_suite_plan: its held-out tasks)
    tasks: list[str] | None = None  # SNI tasks to score (default: the run's held-out tasks, or the suite's)
    device: str = "auto"  # where a local model runs (auto: the GPU when there is one)
    subjects: list[str] | None = None  # MMLU subjects / BBQ categories instead of the suite's


def evaluate_suite(
    source: ModelSource | None,
    req: SuiteRequest,
    out: Path,
    reporter: Reporter,
    with_base: bool = False,
    lm=None,
) -> dict:
    """One model on a suite -> out/results.{json,md}; or, `with_base` and a trained folder, the base model and
    then the tuned one (one in memory at a time) -> out/base/, out/tuned/ and their comparison
    out/compare.{json,md}. `lm`: a model to score instead of loading `source` (a server). A run's evaluation
    joins its lineage (and W&B/MLflow when its recipe tracks them)."""
    from daytune.eval.lm import LocalLM
    from daytune.eval.scenarios import DataRoot
    from daytune.eval.suites import suite_data_root

    DataRoot(suite_data_root(req.suite, req.data_root)).path("")  # a missing data root fails early
    if source is not None and source.run_dir is not None and req.plan is None:  # the run's held-out tasks
        run_cfg = load_run_config(source.run_dir / "config.yaml")
        req.plan = run_suite_plan(
            run_cfg, req.suite, req.scenarios, req.max_instances, req.tasks, req.subjects
        )
    elif req.plan is None and req.tasks:
        from daytune.eval.suites import suite_plan, with_tasks

        req.plan = with_tasks(
            suite_plan(req.suite, req.scenarios, req.max_instances, req.subjects), req.tasks
        )
    if lm is None and not (with_base and source.trained):
        lm = LocalLM.load(source.model, source.trained, req.batch_size, req.device, log=reporter.log)
    DataRoot(suite_data_root(req.suite, req.data_root)).path("")  # a missing data root fails early
    if lm is None:
        results = _suite_pair(source, req, out, reporter)
    else:
        run = source is not None and source.run_dir is not None
        results = {"tuned" if run else "model": _suite_one(lm, "model", req, out, reporter)}
    if source is not None and source.run_dir is not None:
        cfg = load_run_config(source.run_dir / "config.yaml")
        record_eval(RunDir(source.run_dir), cfg, results, out, source.model, source.trained)
    return results


def _suite_one(lm, label: str, req: SuiteRequest, out: Path, reporter: Reporter) -> dict:
    """Score `lm`; results go to out/ (label "model") or out/<label>/ (base, tuned), the table to the reporter."""
    from daytune.eval.report import markdown_table, write_results
    from daytune.eval.suites import run_suite

    reporter.log(f"Evaluating {label} on suite '{req.suite}'...")
    res = run_suite(
        lm,
        req.suite,
        req.data_root,
        req.scenarios,
        req.max_instances,
        req.bootstrap,
        reporter.log,
        req.plan,
        req.subjects,
    )
    paired = label in ("base", "tuned")
    res["title"] = label if paired else lm.name
    j, m = write_results(res, out / label if paired else out)
    reporter.print(markdown_table(res), markup=False)
    reporter.print(f"Results: {j} and {m}")
    return res


def _suite_pair(source: ModelSource, req: SuiteRequest, out: Path, reporter: Reporter) -> dict:
    """The base model first, then the trained one (one in memory at a time), then tuned vs base."""
    from daytune.eval.lm import LocalLM
    from daytune.eval.report import compare, compare_markdown

    def load(trained):
        return LocalLM.load(source.model, trained, req.batch_size, req.device, log=reporter.log)

    base = _suite_one(load(None), "base", req, out, reporter)
    tuned_lm = load(source.trained)
    tuned = _suite_one(tuned_lm, "tuned", req, out, reporter)
    rows = compare(base, tuned, iters=req.bootstrap)
    text = compare_markdown(rows, "base", "tuned")
    write_json_atomic(out / "compare.json", {"a": "base", "b": "tuned", "rows": rows})
    write_text_atomic(out / "compare.md", text)
    reporter.print(text, markup=False)
    return {"base": base, "tuned": tuned}


def evaluate_recipe(
    cfg: RunConfig, source: ModelSource, out: Path, reporter: Reporter, device: str | None = None
) -> dict:
    """The recipe's eval section (held-out loss, multiple-choice accuracy), base vs tuned, as `daytune run`
    reports it besides the suite -> `out` (a JSON file); a run's evaluation joins its lineage. `device`:
    where (default: the recipe's train.device)."""
    if not (cfg.eval.heldout or cfg.eval.multiple_choice):
        raise ConfigError(
            "nothing to evaluate: set eval.heldout and/or eval.multiple_choice (--recipe or --set)"
        )
    results = evaluate_pair(cfg, source.model, source.trained, reporter, device=device)
    trained = str(source.trained) if source.trained else None
    write_json_atomic(out, {"model": source.model, "trained": trained, "results": results})
    if source.run_dir is not None:  # lineage; W&B/MLflow when configured
        record_eval(RunDir(source.run_dir), cfg, results, out, source.model, source.trained)
    return results


def evaluate_harness(
    source: ModelSource,
    tasks: list[str],
    out: Path,
    reporter: Reporter,
    data_root: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> dict:
    """lm-evaluation-harness tasks, offline, on a local model -> out/harness.json; returns each task's metrics."""
    from daytune.eval.harness import harness_summary, run_harness
    from daytune.eval.lm import LocalLM
    from daytune.eval.scenarios import DataRoot, default_data_root

    lm = LocalLM.load(source.model, source.trained, batch_size, device, log=reporter.log)
    data = DataRoot(Path(data_root).expanduser() if data_root else default_data_root())
    res = run_harness(lm, tasks, data, out / "tasks", limit=limit, num_fewshot=num_fewshot)
    summary = harness_summary(res)
    write_json_atomic(
        out / "harness.json", {"model": lm.info(), "tasks": tasks, "limit": limit, "results": summary}
    )
    return summary
