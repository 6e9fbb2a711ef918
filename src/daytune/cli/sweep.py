"""`daytune sweep SWEEP.yaml`: a budget-aware hyperparameter search (Optuna) whose trials are daytune runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daytune.errors import DaytuneError

EPILOG = """examples:
  daytune sweep examples/instruct-mix-sweep.yaml               search inside the sweep's budget; report + best.yaml
  daytune sweep examples/instruct-mix-sweep.yaml --workers 2   two processes share the study (each its share of cores)
  daytune sweep sweeps/<id>                                    the sweep's table as it stands
  daytune sweep sweeps/<id> --join                             one more worker for a running sweep (this machine)
  daytune sweep SWEEP.yaml --storage postgresql://host/db      a study other machines can join:
  daytune sweep SWEEP.yaml --storage postgresql://host/db --join     ... run this on each of them
  daytune sweep sweeps/<id> --retrain [--budget 24h]           the best trial's recipe, trained for the full budget
  daytune sweep sweeps/<id> --report                           rewrite report.html from the study
"""


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "sweep",
        help="search recipe fields with Optuna inside one wall-clock budget; each trial a daytune run",
        description="Start a sweep from a sweep file (a base recipe, a search space, an objective suite, a test "
        "suite, budgets; see examples/instruct-mix-sweep.yaml), join one, or act on a sweep folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("target", help="a sweep file (SWEEP.yaml) or a sweep folder (sweeps/<id>)")
    sp.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    sp.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<sweep folder>/study.db)")
    sp.add_argument("--join", action="store_true", help="join the running sweep's study as another worker")
    sp.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep-file field"
    )
    sp.add_argument(
        "--budget", help="the whole sweep's budget (same as --set budget=); with --retrain: its budget"
    )
    sp.add_argument("--retrain", action="store_true", help="train the best trial's recipe (best.yaml)")
    sp.add_argument("--report", action="store_true", help="rewrite the sweep folder's report.html")
    sp.add_argument("--threads", type=int, help="torch threads of each trial in this process")
    sp.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)


def cmd_sweep(args, reporter) -> int:
    import time

    started = time.time()  # the sweep's budget counts from here, its imports and checks included
    from daytune.sweep import join_sweep, start_sweep

    target = Path(args.target)
    if target.is_dir():
        return _folder(args, target, reporter)
    if args.retrain or args.report:
        raise DaytuneError(f"--retrain and --report act on a sweep folder; {target} is not one")
    overrides = list(args.set) + ([f"budget={args.budget}"] if args.budget else [])
    if args.join:
        join_sweep(
            str(target), args.storage, reporter, args.threads, args.worker_index, overrides, args.workers
        )
        return 0
    argv = ["daytune", *sys.argv[1:]]
    start_sweep(str(target), overrides, args.workers, args.storage, reporter, argv, started)
    return 0


def _folder(args, folder: Path, reporter) -> int:
    from daytune.sweep import join_sweep, retrain
    from daytune.sweep.runner import read_state
    from daytune.sweep.summary import text, write_report

    state = read_state(folder)
    if args.join:
        join_sweep(
            str(folder), args.storage, reporter, args.threads, args.worker_index, list(args.set), args.workers
        )
        return 0
    if args.retrain:
        retrain(folder, args.budget, reporter)
        return 0
    if args.report:
        reporter.print(f"Report: {write_report(folder, state)}")
        return 0
    reporter.print(text(state), markup=False)
    return 0
