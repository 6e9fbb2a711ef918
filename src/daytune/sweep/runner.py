"""Running a sweep: an Optuna study whose trials are daytune runs, inside one wall-clock budget.

    daytune sweep SWEEP.yaml -> new sweep folder + study -> calibrate (prepare the base data, score the base model:
    how long an evaluation takes) -> enqueue the starting recipe -> workers ask for trials until the next one would
    not fit before the deadline -> summary (sweep.json), best.yaml (the retrain recipe), report.html

Each trial is a normal run (a folder under the recipe's out_dir, listed by `daytune runs list`): its parameters are
`--set` overrides of the base recipe, its train.budget is the sweep's trial_budget, its validation losses
(train.eval_every) go to the pruner, and its tuned model is scored on the objective suite and the test suite. A
trial starts only when its budget plus the evaluation time measured so far (with a margin) fits before the
deadline, so the sweep ends inside its budget; every trial keeps its saved model, the best one included.

Workers: `--workers N` starts N-1 more processes (`daytune sweep FOLDER --join`) that share the study through its
storage; on other machines `daytune sweep SWEEP.yaml --join --storage URL` (an RDB URL all of them reach, e.g.
postgresql://...) joins the same study. The deadline, the calibration and the spec live in the study's user
attributes, so every worker keeps the same promise.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from daytune.config import RunConfig, dump_yaml, load_run_config
from daytune.errors import ConfigError, DaytuneError, RunError
from daytune.fileio import write_json_atomic, write_text_atomic
from daytune.pipeline import (
    SuiteRequest,
    prepare_recipe_data,
    score_model,
    start_or_resume,
    train_run,
)
from daytune.progress import Reporter
from daytune.sweep import summary as summaries
from daytune.sweep.spec import VAL_LOSS, Dim, SuiteSpec, SweepSpec, load_sweep, split_params
from daytune.track import RunDir
from daytune.units import format_duration, parse_duration

SPEC_FILE = "sweep.yaml"
STATE_FILE = "sweep.json"
MARGIN = 8.0  # seconds a trial needs besides training and evaluation: run folder, records, the study's writes
FINISH = 6.0  # seconds kept for the end: the summary, the retrain recipe, the report
EVAL_SLACK = 1.5  # a tuned model's evaluation may take longer than the base model's (longer answers)
MAX_FAILURES = 3  # consecutive failed trials stop a worker: the same error would repeat


@dataclass
class Sweep:
    spec: SweepSpec
    dims: list[Dim]
    cfg: RunConfig  # the base recipe (with the spec's `set`)
    folder: Path  # this machine's sweep folder
    storage: str
    threads: int | None = None  # torch threads of each trial on this worker

    @property
    def trial_budget(self) -> float:
        return parse_duration(self.spec.trial_budget or self.cfg.train.budget, "trial_budget")

    def suites(self) -> dict[str, SuiteSpec]:
        out = {"objective": self.spec.objective} if self.spec.objective.suite != VAL_LOSS else {}
        return out | ({"test": self.spec.test} if self.spec.test is not None else {})


def _storage(url: str):
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    from sqlalchemy.exc import IntegrityError

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120
            )
        except (
            IntegrityError
        ):  # two processes created the schema at once: the other one won, so it exists now
            if attempt == 4:
                raise
            time.sleep(0.5)


def _sampler(spec: SweepSpec, worker: int):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed + worker)
    startup = min(10, max(2, (spec.trials or 9) // 3))
    return optuna.samplers.TPESampler(seed=spec.seed + worker, n_startup_trials=startup, constant_liar=True)


def _pruner(spec: SweepSpec):
    import optuna

    p = spec.pruner
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=p.min_resource)
    return optuna.pruners.NopPruner()


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # daytune prints each trial's outcome itself


# ---- starting and joining ------------------------------------------------------------------------------------
def start_sweep(
    path: str,
    overrides: list[str],
    workers: int,
    storage: str | None,
    reporter: Reporter,
    argv: list[str],
    started: float | None = None,
) -> Path:
    """`daytune sweep SWEEP.yaml`: everything checked before anything is written; returns the sweep folder.
    The budget counts from `started` (the command's start), else from now."""
    t0 = started or time.time()
    spec, dims, cfg = load_sweep(path, overrides)
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {workers}")
    spec.storage = storage or spec.storage
    import optuna

    _quiet_optuna()
    folder = RunDir.create(spec.out_dir, spec.name).path  # a fresh folder: nothing is ever written over
    url = spec.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    write_text_atomic(folder / SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
    try:
        study = optuna.create_study(
            study_name=spec.name,
            storage=_storage(url),
            direction=spec.direction(),
            sampler=_sampler(spec, 0),
            pruner=_pruner(spec),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(
            f"storage {url} already has a study named '{spec.name}': join it with --join, or give this sweep "
            "another name (name:)"
        ) from None
    threads = _threads(workers)
    sw = Sweep(spec, dims, cfg, folder, url, threads)
    study.set_user_attr("sweep", _shared_state(sw, t0, argv))
    _write_state(sw, study)
    reporter.print(f"Sweep folder: [bold]{folder}[/bold]  (study '{spec.name}' in {url})")
    reporter.print(
        f"Budget {format_duration(spec.budget_seconds())}, ends by {time.strftime('%H:%M:%S', time.localtime(t0 + spec.budget_seconds()))}."
    )
    calibrate(sw, study, reporter)
    enqueue_starting_recipe(sw, study, reporter)
    procs = [_spawn_worker(sw, i) for i in range(1, workers)]
    if procs:
        reporter.print(f"{len(procs)} more worker process(es): logs in {folder}/worker-*.log")
    try:
        work(sw, study, reporter, worker=0)
    except (
        KeyboardInterrupt
    ):  # the running trial saved its model; the table and best.yaml say where things stand
        reporter.print(summaries.text(_write_state(sw, study)), markup=False)
        raise
    finally:
        for p in procs:
            p.wait()
    return finish(sw, study, reporter)


def _threads(workers: int) -> int | None:
    """Each worker process gets its share of the cores (one process alone keeps torch's default)."""
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def _shared_state(sw: Sweep, t0: float, argv: list[str]) -> dict:
    return {
        "spec": sw.spec.to_dict(),
        "started": t0,
        "deadline": t0 + sw.spec.budget_seconds(),
        "folder": str(sw.folder.resolve()),
        "storage": sw.storage,
        "host": socket.gethostname(),
        "command": argv,
    }


def _spawn_worker(sw: Sweep, index: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "daytune",
        "--quiet",
        "sweep",
        str(sw.folder),
        "--join",
        "--worker-index",
        str(index),
    ]
    if sw.threads:
        cmd += ["--threads", str(sw.threads)]
    import daytune

    env = dict(os.environ)  # the child imports the same daytune as this process
    src = str(Path(daytune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    log = open(sw.folder / f"worker-{index}.log", "w", encoding="utf-8")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def join_sweep(
    target: str,
    storage: str | None,
    reporter: Reporter,
    threads: int | None,
    worker: int,
    overrides: list[str],
    workers: int = 1,
) -> Path:
    """More workers for a running sweep: its folder (this machine), or its file and a shared --storage (another
    machine, which gets a folder of its own for its data and logs)."""
    import optuna

    _quiet_optuna()
    path = Path(target)
    if path.is_dir():
        state = read_state(path)
        spec, dims, cfg = load_sweep(path / SPEC_FILE, overrides)
        url, folder = storage or state["storage"], path
    else:
        spec, dims, cfg = load_sweep(path, overrides)
        url = storage or spec.storage
        if not url:
            raise ConfigError(
                "--join: give the study's storage (--storage URL, or storage: in the sweep file)"
            )
        folder = RunDir.create(spec.out_dir, f"{spec.name}-worker").path
    try:
        study = optuna.load_study(
            study_name=spec.name, storage=_storage(url), sampler=_sampler(spec, worker), pruner=_pruner(spec)
        )
    except KeyError:
        raise ConfigError(
            f"--join: no study named '{spec.name}' in {url}; start it first (daytune sweep {target})"
        ) from None
    sw = Sweep(spec, dims, cfg, folder, url, threads or _threads(workers))
    if not path.is_dir():  # this machine's own sweep folder: its extra workers join through it
        write_text_atomic(folder / SPEC_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))
        _write_state(sw, study)
    if "eval_seconds" not in study.user_attrs:
        _wait_for_calibration(study, reporter)
    reporter.log(
        f"Joined study '{spec.name}' in {url} as worker {worker} ({socket.gethostname()}:{os.getpid()})."
    )
    procs = [_spawn_worker(sw, worker + i) for i in range(1, workers)]
    try:
        work(sw, study, reporter, worker)
    finally:
        for p in procs:
            p.wait()
    return folder


def _wait_for_calibration(study, reporter: Reporter) -> None:
    """The starting process measures evaluation before trials begin; a joiner waits for that number."""
    deadline = study.user_attrs["sweep"]["deadline"]
    while time.time() < deadline:
        time.sleep(2)
        if "eval_seconds" in study.user_attrs:
            return
    raise RunError("--join: the sweep's deadline passed before its calibration finished")


def read_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: not a sweep folder (no {STATE_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


# ---- calibration ---------------------------------------------------------------------------------------------
def calibrate(sw: Sweep, study, reporter: Reporter) -> None:
    """Prepare the base recipe's data and score the base model on the objective and test suites: the reference
    values, and the time one evaluation takes, which every trial keeps in reserve."""
    t = time.time()
    cfg = _with_data(sw, copy.deepcopy(sw.cfg), [], reporter)  # sw.cfg stays the recipe as written
    data_seconds = time.time() - t
    t = time.time()
    base = {}
    if sw.suites():
        reporter.log("Scoring the base model (the evaluation every trial will get)...")
        base = score_model(cfg, None, _requests(sw, cfg), sw.folder / "base", reporter)
    eval_seconds = time.time() - t
    study.set_user_attr("data_seconds", data_seconds)
    study.set_user_attr("eval_seconds", eval_seconds)
    study.set_user_attr(
        "base", {k: summaries.suite_value(v, _suite_of(sw, k).metric) for k, v in base.items()}
    )
    left = _deadline(study) - time.time()
    need = _need(sw, study)
    if left < need:
        raise ConfigError(
            f"{sw.spec.file}: budget: {sw.spec.budget} cannot hold one trial's setup: {format_duration(left)} are "
            f"left after preparing the data ({data_seconds:.0f}s) and scoring the base model ({eval_seconds:.0f}s), "
            f"and a trial needs {format_duration(need)} (trial_budget {format_duration(sw.trial_budget)} + its "
            "evaluation + setup)"
        )


def _suite_of(sw: Sweep, label: str) -> SuiteSpec:
    return sw.suites()[label]


def _requests(sw: Sweep, cfg: RunConfig) -> dict[str, SuiteRequest]:
    return {
        label: SuiteRequest(
            s.suite,
            s.scenarios,
            s.max_instances,
            s.data_root,
            batch_size=cfg.eval.batch_size,
            tasks=s.sni_tasks() or None,
        )
        for label, s in sw.suites().items()
    }


def _data_key(sw: Sweep, cfg: RunConfig, data_overrides: list[str]) -> str:
    facts = {
        "recipe": cfg.data.prepare,
        "overrides": sorted(data_overrides),
        "model": cfg.model,
        "template": cfg.data.template,
        "max_seq_len": cfg.data.max_seq_len,
        "system_prompt": cfg.data.system_prompt,
        "suites": sorted((s.suite, s.data_root or "", *s.sni_tasks()) for s in sw.suites().values()),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def _with_data(sw: Sweep, cfg: RunConfig, data_overrides: list[str], reporter: Reporter) -> RunConfig:
    """The config training on prepared data: the data recipe (with the trial's data overrides) prepared once per
    distinct configuration into <sweep>/data/<key>/ (workers take turns on a lock), shared by the trials."""
    if not cfg.data.prepare:
        return cfg
    folder = sw.folder / "data" / _data_key(sw, cfg, data_overrides)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "data_card.json").is_file():
            suites = [(s.suite, s.data_root, s.sni_tasks() or None) for s in sw.suites().values()]
            val = sw.spec.objective.sni_tasks()  # tuned on: held out, never scored as the test
            prepare_recipe_data(cfg, folder, reporter, suites, data_overrides, val)
    cfg.data.train, cfg.data.prepare, cfg.data.fingerprint = str(folder), None, None
    return cfg


# ---- the budget ------------------------------------------------------------------------------------------------
def _deadline(study) -> float:
    return study.user_attrs["sweep"]["deadline"]


def _need(sw: Sweep, study) -> float:
    """Seconds one more trial needs before the deadline: its training budget, its evaluation (the longest one
    measured, with slack), its data when the space searches the data recipe, the margins."""
    attrs = study.user_attrs
    # the trials' own evaluations once there are some; before that the base model's, with slack
    evals = attrs.get("trial_eval_seconds") or [attrs.get("eval_seconds", 0.0) * EVAL_SLACK]
    searches_data = any(d.key.startswith("data_recipe.") for d in sw.dims)
    data = attrs.get("data_seconds", 0.0) * EVAL_SLACK if searches_data else 0.0
    return sw.trial_budget + max(evals) * 1.25 + data + MARGIN + FINISH


def _trials_started(study) -> int:
    from optuna.trial import TrialState

    return len(
        study.get_trials(
            deepcopy=False,
            states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL),
        )
    )


def work(sw: Sweep, study, reporter: Reporter, worker: int) -> None:
    """Run trials until the budget or the trial count says stop."""
    failures = 0
    while True:
        if sw.spec.trials is not None and _trials_started(study) >= sw.spec.trials:
            reporter.log(f"worker {worker}: {sw.spec.trials} trials started: done.")
            return
        left = _deadline(study) - time.time()
        need = _need(sw, study)
        if left < need:
            reporter.log(
                f"worker {worker}: {format_duration(left)} left, a trial needs {format_duration(need)}: done."
            )
            return
        outcome: dict[str, Any] = {}
        study.optimize(
            lambda trial, out=outcome: objective(sw, trial, reporter, worker, out),
            n_trials=1,
            catch=(DaytuneError,),
        )
        failures = failures + 1 if outcome.get("failed") else 0
        if failures >= MAX_FAILURES:
            raise RunError(
                f"worker {worker}: {failures} trials failed in a row; the last: {outcome['failed']}"
            )


# ---- one trial -------------------------------------------------------------------------------------------------
def trial_config(sw: Sweep, run_overrides: list[str], number: int) -> RunConfig:
    spec = sw.spec
    extra = [f"name={spec.name}-t{number:03d}", f"train.budget={sw.trial_budget:g}s"]
    if spec.pruner.eval_every is not None:
        extra.append(f"train.eval_every={json.dumps(spec.pruner.eval_every)}")
    if sw.threads:
        extra.append(f"train.threads={sw.threads}")
    return load_run_config(spec.recipe, [*spec.set, *run_overrides, *extra])


def objective(sw: Sweep, trial, reporter: Reporter, worker: int, outcome: dict) -> float:
    import optuna

    params = {d.key: d.suggest(trial) for d in sw.dims}
    run_over, data_over = split_params(params)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("started", time.time())
    reporter.print(
        f"[bold]trial {trial.number}[/bold] (worker {worker}): "
        + ", ".join(f"{k}={v}" for k, v in params.items())
    )
    try:
        cfg = _with_data(sw, trial_config(sw, run_over, trial.number), data_over, reporter)
        cfg, run, _ = start_or_resume(
            cfg, ["daytune", "sweep", sw.spec.file, f"trial {trial.number}"], None, reporter
        )
        trial.set_user_attr("run_dir", str(run.path.resolve()))
        sign = (
            -1.0 if sw.spec.direction() == "maximize" else 1.0
        )  # the pruner compares in the study's direction

        def on_validation(step: int, val_loss: float) -> bool:
            trial.report(sign * val_loss, step)
            return trial.should_prune()

        result = train_run(cfg, run, reporter, on_validation=on_validation)
        trial.set_user_attr(
            "train",
            {
                k: getattr(result, k)
                for k in ("steps", "stopped_by", "elapsed_seconds", "best_val_loss", "final_loss")
            },
        )
        if result.stopped_by == "signal":  # Ctrl-C: the run saved its model; the trial fails, the sweep stops
            raise KeyboardInterrupt
        if result.stopped_by == "pruned":
            reporter.print(f"trial {trial.number}: pruned at step {result.steps}")
            raise optuna.TrialPruned(f"pruned at step {result.steps}")
        value = score_trial(sw, trial, cfg, run, result, reporter)
    except DaytuneError as e:
        outcome["failed"] = str(e)
        reporter.print(f"trial {trial.number} failed: {e}")
        raise
    finally:
        trial.set_user_attr("ended", time.time())
    summaries.write_best(sw, trial.study, reporter)
    return value


def score_trial(sw: Sweep, trial, cfg: RunConfig, run: RunDir, result, reporter: Reporter) -> float:
    """The tuned model on the objective and test suites (recorded in the run's summary too); the objective's
    value. A val_loss objective is the run's best validation loss."""
    t = time.time()
    scored = (
        score_model(cfg, run.trained, _requests(sw, cfg), run.path / "eval" / "sweep", reporter)
        if sw.suites()
        else {}
    )
    seconds = time.time() - t
    if scored:  # the run's summary shows them as any run's suite results (runs list, runs compare)
        tuned = {"suite": scored.get("objective") or scored["test"]}
        if "objective" in scored and "test" in scored:
            tuned["test_suite"] = scored["test"]
        run.update_summary(eval={"tuned": tuned})
        seen = list(trial.study.user_attrs.get("trial_eval_seconds", []))
        trial.study.set_user_attr("trial_eval_seconds", (seen + [seconds])[-20:])
    values = {k: summaries.suite_value(v, _suite_of(sw, k).metric) for k, v in scored.items()}
    trial.set_user_attr("scores", values)
    trial.set_user_attr("eval_seconds", seconds)
    if sw.spec.objective.suite == VAL_LOSS:  # the last validation: the closest to the model the run saved
        value = result.val_loss
        if value is None:
            raise RunError(
                f"trial {trial.number}: no validation loss: it made {result.steps} steps and validated at none "
                "(train.eval_every, and validation rows: data.val, data.val_fraction or a prepared val.jsonl)"
            )
        values["objective"] = value
    if values.get("objective") is None:
        raise RunError(
            f"trial {trial.number}: the objective suite produced no {sw.spec.objective.metric or 'main metric'} value"
        )
    reporter.print(
        f"trial {trial.number}: objective {values['objective']:.4f}"
        + (f", test {values['test']:.4f}" if values.get("test") is not None else "")
    )
    return float(values["objective"])


# ---- the end ---------------------------------------------------------------------------------------------------
def enqueue_starting_recipe(sw: Sweep, study, reporter: Reporter) -> None:
    """The first trial is the hand-written recipe itself (when its values lie in the space), so the sweep shows
    whether its best trial beats it."""
    from daytune.sweep.spec import starting_point

    params, outside = starting_point(sw.spec, sw.cfg, sw.dims)
    if outside:
        reporter.log(f"The recipe's {outside} lies outside the space: no trial of the starting recipe.")
        return
    study.enqueue_trial(params, user_attrs={"starting_recipe": True})


def finish(sw: Sweep, study, reporter: Reporter) -> Path:
    """The summary, the retrain recipe and the report; with retrain.run, the best trial retrained."""
    state = _write_state(sw, study, final=True)
    reporter.print(summaries.text(state), markup=False)
    report = summaries.write_report(sw.folder, state)
    reporter.print(f"Report: {report}")
    if state.get("best"):
        reporter.print(f"Retrain the best trial for the full budget: {state['retrain']['command']}")
        if sw.spec.retrain.run:
            retrain(sw.folder, None, reporter)
    return sw.folder


def _write_state(sw: Sweep, study, final: bool = False) -> dict:
    state = summaries.state(sw, study, final)
    write_json_atomic(sw.folder / STATE_FILE, state)
    return state


def retrain(folder: Path, budget: str | None, reporter: Reporter):
    """`daytune sweep FOLDER --retrain`: the best trial's recipe (best.yaml) as a normal run."""
    from daytune.pipeline import run_recipe

    recipe = folder / "best.yaml"
    if not recipe.is_file():
        raise RunError(f"{folder}: no best.yaml yet (no trial has finished)")
    overrides = [f"train.budget={budget}"] if budget else []
    cfg = load_run_config(recipe, overrides)
    return run_recipe(cfg, ["daytune", "sweep", str(folder), "--retrain", *overrides], reporter)


def best_recipe(sw: Sweep, run_dir: Path) -> str:
    """The best trial's own config (its data, its parameters) with the base recipe's eval section and the
    retrain budget: a recipe `daytune run` takes as it is."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    cfg["name"] = f"{sw.spec.name}-best"
    cfg["train"]["budget"] = sw.spec.retrain.budget or sw.cfg.train.budget
    cfg["train"]["threads"] = sw.cfg.train.threads
    cfg["eval"] = sw.cfg.to_dict()["eval"]
    cfg["out_dir"] = sw.cfg.out_dir
    return dump_yaml(load_run_config_dict(cfg))


def load_run_config_dict(data: dict) -> RunConfig:
    from daytune.config import from_dict

    return from_dict(RunConfig, data).validate()
