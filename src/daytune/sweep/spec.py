"""The sweep file (see examples/instruct-mix-sweep.yaml): a base recipe, a search space over its fields, an
objective, a test suite that is only reported, and the budgets. Everything is checked before anything is written:
a field that does not exist, an empty range, a value the recipe would refuse, an unknown suite or metric, a sweep
budget that cannot hold one trial: each is an error naming the field.

Space keys are recipe fields (`train.lr`, `train.lora.r`, `train.method`, `data.max_seq_len`, ...) or, with the
prefix `data_recipe.`, fields of the data recipe that `data.prepare` names (`data_recipe.sources.1.weight`: mix
weights). A field is `{low, high}` (optionally `log: true`, `step`; integers when the field is an integer field) or
`{choices: [...]}`.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daytune.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    load_run_config,
    read_yaml_mapping,
)
from daytune.errors import ConfigError
from daytune.units import parse_duration, parse_interval

DATA_PREFIX = "data_recipe."
VAL_LOSS = "val_loss"  # an objective without a suite: the trials' best validation loss
SETUP_SECONDS = 15.0  # a trial's least cost besides training: run folder, records, evaluation, the study
PRUNERS = ("hyperband", "successive_halving", "median", "none")
SAMPLERS = ("tpe", "random")


@dataclass
class SuiteSpec:
    """A suite a trial's tuned model is scored on; its value is the mean of `metric` over the scenarios that
    have it (each scenario's main metric when `metric` is not set)."""

    suite: str = VAL_LOSS  # val_loss (objective only), or a suite: quick, unseen, competition-open, full
    metric: str | None = None
    scenarios: list[str] | None = None
    max_instances: int | None = None
    data_root: str | None = None
    # maximize | minimize; default: the metric's own (lower loss, higher accuracy)
    direction: str | None = None
    # SNI tasks of the suite's sni scenario (default: the suite's own). The data stage holds them out: validation
    # tasks for the objective, other unseen tasks for the test, so the sweep never tunes on its test tasks.
    tasks: list[str] | None = None

    def sni_tasks(self) -> list[str]:
        """The SNI tasks this suite scores ([] without an SNI scenario)."""
        from daytune.eval.suites import sni_tasks, suite_plan, with_tasks

        if self.suite == VAL_LOSS:
            return []
        return sni_tasks(with_tasks(suite_plan(self.suite, self.scenarios), self.tasks))


@dataclass
class PrunerSpec:
    """Stops bad trials early from their intermediate validation losses (train.eval_every)."""

    kind: str = "hyperband"  # hyperband | successive_halving | median | none
    min_resource: int = 1  # optimizer steps before a trial can be pruned
    reduction_factor: int = 3
    eval_every: int | str | None = None  # train.eval_every of every trial (default: the recipe's)


@dataclass
class RetrainSpec:
    budget: str | None = None  # the best trial's recipe, retrained for this budget (default: the recipe's)
    run: bool = False  # retrain as soon as the sweep ends (else: print the command)


@dataclass
class SweepSpec:
    name: str = "sweep"
    recipe: str = ""  # the base run recipe (relative to this file)
    set: list[str] = field(default_factory=list)  # overrides applied to the recipe for every trial
    budget: str = ""  # the whole sweep, wall clock: it ends inside it
    trial_budget: str | None = None  # each trial's train.budget (default: the recipe's)
    trials: int | None = None  # at most this many trials (default: as many as the budget holds)
    seed: int = 0
    sampler: str = "tpe"
    objective: SuiteSpec = field(default_factory=SuiteSpec)
    test: SuiteSpec | None = None  # reported for every trial, never optimised
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    retrain: RetrainSpec = field(default_factory=RetrainSpec)
    storage: str | None = None  # an Optuna storage URL; default: sqlite:///<sweep folder>/study.db
    out_dir: str = "sweeps"  # where sweep folders are created (relative to the current directory)
    space: dict[str, dict] = field(default_factory=dict)
    file: str = ""  # where it was read from (set by load_sweep)

    def direction(self) -> str:
        return objective_direction(self.objective)

    def budget_seconds(self) -> float:
        return parse_duration(self.budget, "budget")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Dim:
    """One searched field, as Optuna suggests it."""

    key: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high
        )

    def probes(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def _field(cfg_obj: Any, dotted: str) -> tuple[Any, Any]:
    """The value a dotted field has in a config object and its type hint (KeyError: no such field)."""
    obj, hint = cfg_obj, None
    for part in dotted.split("."):
        if isinstance(obj, list):
            obj, hint = obj[int(part)], None
        elif hasattr(obj, "__dataclass_fields__") and part in obj.__dataclass_fields__:
            hint = typing.get_type_hints(type(obj))[part]
            obj = getattr(obj, part)
        else:
            raise KeyError(part)
    return obj, hint


def _is_int_field(value: Any, hint: Any) -> bool:
    """An integer field: its type admits int but not float (int | None, int | str), else its value is an int."""
    args = set(typing.get_args(hint)) or ({hint} if hint is not None else set())
    if args:
        return int in args and float not in args
    return isinstance(value, int) and not isinstance(value, bool)


def parse_dim(key: str, body: Any, integer: bool) -> Dim:
    """A space entry; `integer`: the field holds integers (its range is one of integers)."""
    where = f"space.{key}"
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected {{low: ..., high: ...}} or {{choices: [...]}}, got {body!r}")
    unknown = set(body) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use low, high, log, step or choices"
        )
    if "choices" in body:
        choices = body["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: empty: list at least one value")
        if len(body) > 1:
            raise ConfigError(f"{where}: give choices, or low/high, not both")
        hashable = [json.dumps(c) if isinstance(c, (list, dict)) else c for c in choices]
        return Dim(key, "categorical", choices=tuple(hashable))
    if "low" not in body or "high" not in body:
        raise ConfigError(f"{where}: give both low and high (or choices)")
    low, high, log, step = body["low"], body["high"], bool(body.get("log", False)), body.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
            raise ConfigError(f"{where}.{name}: expected a number, got {v!r}")
    if not low < high:
        raise ConfigError(f"{where}: empty range: low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got {low}")
    if step is not None and (step <= 0 or step > high - low):
        raise ConfigError(f"{where}.step: must be within (0, high - low], got {step}")
    if log and step is not None:
        raise ConfigError(f"{where}: log and step cannot be combined (Optuna's rule)")
    if integer:
        if not all(float(v).is_integer() for v in (low, high, step or 1)):
            raise ConfigError(f"{where}: {key} is an integer field: low, high and step must be integers")
        return Dim(key, "int", int(low), int(high), log, int(step) if step else None)
    return Dim(key, "float", float(low), float(high), log, float(step) if step else None)


def value_text(value: Any) -> str:
    """A value as a --set override reads it back (YAML; JSON for lists and mappings)."""
    if isinstance(value, str) and value.startswith(("[", "{")):
        return value  # a list or mapping choice, kept as its JSON text
    return repr(value) if isinstance(value, float) else json.dumps(value)


def split_params(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Trial parameters as overrides: (run recipe, data recipe)."""
    run = [f"{k}={value_text(v)}" for k, v in params.items() if not k.startswith(DATA_PREFIX)]
    data = [
        f"{k[len(DATA_PREFIX) :]}={value_text(v)}" for k, v in params.items() if k.startswith(DATA_PREFIX)
    ]
    return run, data


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepSpec, list[Dim], RunConfig]:
    """Read and check a sweep file; returns the spec (paths resolved), its dimensions and the base recipe."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", "(name, recipe, budget, objective, space, ...)")
    apply_overrides(data, overrides)
    try:
        space = data.pop("space", None) or {}
        if not isinstance(space, dict) or not space:
            raise ConfigError(
                "space: list at least one field to search, e.g. train.lr: {low: 1e-5, high: 1e-3}"
            )
        spec = from_dict(SweepSpec, data)
        spec.space = space
        spec.file = str(path.resolve())
        dims, cfg = check(spec, path.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec, dims, cfg


def check(spec: SweepSpec, base: Path) -> tuple[list[Dim], RunConfig]:
    """Validate the spec against its recipe; resolve its paths."""
    if not spec.recipe:
        raise ConfigError("recipe: name the base run recipe (a YAML file)")
    recipe = Path(spec.recipe).expanduser()
    spec.recipe = str(recipe if recipe.is_absolute() else (base / recipe).resolve())
    for s in (spec.objective, spec.test):
        if s is not None and s.data_root and not Path(s.data_root).is_absolute():
            s.data_root = str((base / s.data_root).resolve())
    cfg = load_run_config(spec.recipe, spec.set)
    if spec.sampler not in SAMPLERS:
        raise ConfigError(f"sampler: {spec.sampler!r} is not one of {', '.join(SAMPLERS)}")
    if spec.pruner.kind not in PRUNERS:
        raise ConfigError(f"pruner.kind: {spec.pruner.kind!r} is not one of {', '.join(PRUNERS)}")
    if spec.pruner.min_resource < 1 or spec.pruner.reduction_factor < 2:
        raise ConfigError("pruner: min_resource must be at least 1 and reduction_factor at least 2")
    if spec.trials is not None and spec.trials < 1:
        raise ConfigError(f"trials: must be at least 1, got {spec.trials}")
    check_budgets(spec, cfg)
    eval_every = spec.pruner.eval_every if spec.pruner.eval_every is not None else cfg.train.eval_every
    if eval_every is not None:
        parse_interval(eval_every, "pruner.eval_every")
    elif spec.pruner.kind != "none" or spec.objective.suite == VAL_LOSS:
        raise ConfigError(
            "pruner.eval_every: the pruner (and a val_loss objective) needs intermediate validation losses: set "
            "pruner.eval_every (steps, or a duration like 30s) or train.eval_every in the recipe"
        )
    check_suite("objective", spec.objective, allow_val_loss=True)
    if spec.test is not None:
        check_suite("test", spec.test, allow_val_loss=False)
        shared = set(spec.objective.sni_tasks()) & set(spec.test.sni_tasks())
        if shared:
            raise ConfigError(
                f"test.tasks: the objective scores {', '.join(sorted(shared))} too: a sweep must not tune on its "
                "test tasks; give objective.tasks (validation tasks) or test.tasks another set"
            )
    dims = [check_dim(spec, cfg, key, body) for key, body in spec.space.items()]
    return dims, cfg


def check_budgets(spec: SweepSpec, cfg: RunConfig) -> None:
    total = parse_duration(spec.budget, "budget") if spec.budget else None
    if total is None:
        raise ConfigError("budget: give the whole sweep's wall-clock budget, e.g. budget: 30m")
    trial = parse_duration(spec.trial_budget, "trial_budget") if spec.trial_budget else None
    trial = trial or parse_duration(cfg.train.budget, "train.budget")
    if trial is None:
        raise ConfigError(
            "trial_budget: give each trial a training budget (or train.budget in the recipe): the sweep keeps its "
            "budget by bounding every trial"
        )
    if total <= trial + SETUP_SECONDS:
        raise ConfigError(
            f"budget: {spec.budget} is smaller than one trial's setup: a trial trains for {trial:g}s "
            f"(trial_budget), then it is evaluated and recorded (at least {SETUP_SECONDS:g}s more); give the sweep "
            "more time or its trials less"
        )
    if spec.retrain.budget is not None:
        parse_duration(spec.retrain.budget, "retrain.budget")


def check_suite(where: str, s: SuiteSpec, allow_val_loss: bool) -> None:
    from daytune.eval.scenarios import SCENARIOS
    from daytune.eval.suites import suite_plan

    if s.direction not in (None, "maximize", "minimize"):
        raise ConfigError(f"{where}.direction: {s.direction!r} is not one of maximize, minimize")
    if s.suite == VAL_LOSS:
        if not allow_val_loss:
            raise ConfigError(
                f"{where}.suite: val_loss is the training data's own loss; name a suite to test on"
            )
        if s.metric not in (None, VAL_LOSS):
            raise ConfigError(f"{where}.metric: the val_loss objective has no metric, got {s.metric!r}")
        return
    try:
        plan = suite_plan(s.suite, s.scenarios, s.max_instances)
    except ConfigError as e:
        raise ConfigError(
            f"{where}.suite: {str(e).replace('--suite ', '').replace('--scenarios', 'scenarios')}"
        ) from None
    if s.tasks:
        from daytune.eval.suites import suite_data_root

        if "sni" not in [n for n, _ in plan]:
            raise ConfigError(f"{where}.tasks: suite {s.suite} has no SNI scenario to give tasks to")
        root = suite_data_root(s.suite, s.data_root) / "natural_instructions"
        for i, t in enumerate(s.tasks):
            if not (root / f"{t}.json").is_file():
                raise ConfigError(f"{where}.tasks[{i}]: unknown task '{t}' (no {t}.json in {root})")
    if s.metric is not None:
        have = [n for n, _ in plan if s.metric in SCENARIOS[n].metrics]
        if not have:
            known = sorted({m for n, _ in plan for m in SCENARIOS[n].metrics})
            raise ConfigError(
                f"{where}.metric: no scenario of suite {s.suite} has {s.metric!r} (known: {', '.join(known)})"
            )


def objective_direction(s: SuiteSpec) -> str:
    from daytune.eval.scenarios import SCENARIOS
    from daytune.eval.suites import suite_plan

    if s.direction:
        return s.direction
    if s.suite == VAL_LOSS:
        return "minimize"
    names = [n for n, _ in suite_plan(s.suite, s.scenarios)]
    metric = s.metric or SCENARIOS[names[0]].main_metric
    spec = next((SCENARIOS[n].metrics[metric] for n in names if metric in SCENARIOS[n].metrics), None)
    return "minimize" if spec is not None and spec.higher_is_better is False else "maximize"


def check_dim(spec: SweepSpec, cfg: RunConfig, key: str, body: Any) -> Dim:
    """One space entry: its field must exist (in the run recipe or, prefixed data_recipe., the data recipe) and
    every probe value (low, high, each choice) must pass the recipe's own validation."""
    from daytune.data.recipe import load_data_recipe

    where = f"space.{key}"
    target: Any = cfg
    field_key = key
    if key.startswith(DATA_PREFIX):
        if not cfg.data.prepare:
            raise ConfigError(
                f"{where}: the recipe has no data.prepare, so there is no data recipe to search"
            )
        target, field_key = load_data_recipe(cfg.data.prepare), key[len(DATA_PREFIX) :]
    try:
        current, hint = _field(target, field_key)
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"{where}: no such field in {'the data recipe' if target is not cfg else 'the recipe'} ({field_key})"
        ) from None
    if hasattr(current, "__dataclass_fields__"):
        raise ConfigError(f"{where}: {field_key} is a section; search one of its fields")
    dim = parse_dim(key, body, _is_int_field(current, hint))
    for value in dim.probes():
        run, data = split_params({key: value})
        try:
            if data:
                load_data_recipe(cfg.data.prepare, data)
            else:
                load_run_config(spec.recipe, [*spec.set, *run])
        except ConfigError as e:
            raise ConfigError(f"{where}: the value {value!r} is refused: {e}") from None
    return dim


def _recipe_field(spec: SweepSpec, cfg: RunConfig, key: str, value: Any = None, probe: bool = False) -> Any:
    """A field's value in the recipe as written (probe: with `value` applied and coerced as a trial would)."""
    from daytune.data.recipe import load_data_recipe

    run, data = split_params({key: value}) if probe else ([], [])
    if key.startswith(DATA_PREFIX):
        return _field(load_data_recipe(cfg.data.prepare, data), key[len(DATA_PREFIX) :])[0]
    return _field(load_run_config(spec.recipe, [*spec.set, *run]) if probe else cfg, key)[0]


def starting_point(spec: SweepSpec, cfg: RunConfig, dims: list[Dim]) -> tuple[dict[str, Any], str | None]:
    """The recipe's own values as trial parameters, or the first field whose value lies outside the space. A
    choice matches when the recipe reads the same with it (`targets: all-linear` is the list [all-linear])."""
    params: dict[str, Any] = {}
    for d in dims:
        current = _recipe_field(spec, cfg, d.key)
        if d.kind == "categorical":
            match = [c for c in d.choices if _recipe_field(spec, cfg, d.key, c, probe=True) == current]
            if not match:
                return {}, f"{d.key} ({current!r})"
            params[d.key] = match[0]
        elif d.contains(current):
            params[d.key] = current
        else:
            return {}, f"{d.key} ({current!r})"
    return params, None
