"""`daytune sweep`: spend the day's budget finding the recipe. An Optuna study (its storage a SQLite file in the
sweep folder, or any RDB URL several machines share) over recipe fields, each trial a normal daytune run, bad trials
pruned from their validation losses, the whole sweep inside one wall-clock budget. A sweep orchestrates runs, so it
sits above the pipeline: spec.py (the sweep file and its checks), runner.py (study, budget, workers, trials),
summary.py (sweep.json, best.yaml, the rank correlation, importances, the report)."""

from daytune.sweep.runner import join_sweep, retrain, start_sweep
from daytune.sweep.spec import load_sweep

__all__ = ["join_sweep", "load_sweep", "retrain", "start_sweep"]
