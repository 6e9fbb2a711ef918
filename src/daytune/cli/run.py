"""`daytune run` (data -> train -> eval) and `daytune train` (train only): a recipe through the pipeline."""

from __future__ import annotations

import sys

from daytune.errors import DaytuneError


def _recipe_args(sp, required: bool = True) -> None:
    sp.add_argument(
        "recipe", nargs=None if required else "?", help="recipe YAML (see examples/quickstart.yaml)"
    )
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)",
    )
    sp.add_argument(
        "--budget", help="wall-clock training budget, e.g. 30s, 3m, 24h (same as --set train.budget=)"
    )
    sp.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue a run from its newest checkpoint (auto: newest unfinished run of this recipe)",
    )


def add_parsers(sub) -> None:
    sp = sub.add_parser("run", help="data -> train -> eval (base and tuned) from one recipe")
    _recipe_args(sp)
    sp = sub.add_parser("train", help="train only (LoRA) from a recipe")
    _recipe_args(sp, required=False)


def _recipe(args):
    """The recipe with --set and --budget applied (None without one: --resume reads the run's), and the overrides."""
    from daytune.config import load_run_config

    overrides = list(args.set) + ([f"train.budget={args.budget}"] if getattr(args, "budget", None) else [])
    if args.recipe is None and not args.resume:
        raise DaytuneError("give a recipe YAML, or --resume RUN_DIR")
    if args.recipe is None:
        return None, overrides
    return load_run_config(args.recipe, overrides), overrides


def cmd_run(args, reporter) -> int:
    from daytune.pipeline import run_recipe

    cfg, overrides = _recipe(args)
    run_recipe(cfg, ["daytune", *sys.argv[1:]], reporter, resume=args.resume, overrides=overrides)
    return 0


def cmd_train(args, reporter) -> int:
    from daytune.pipeline import discard_if_it_fails, start_or_resume, train_run

    cfg, overrides = _recipe(args)
    cfg, run, checkpoint = start_or_resume(cfg, ["daytune", *sys.argv[1:]], args.resume, reporter, overrides)
    reporter.log(f"Run folder: {run.path}")
    with discard_if_it_fails(run, fresh=checkpoint is None):
        train_run(cfg, run, reporter, resume=checkpoint)
    reporter.print(f"Run folder: {run.path}")
    return 0
