"""`daytune run`: data -> train -> eval (base and tuned) in one command, everything written to one run folder."""

from __future__ import annotations

import gc
from pathlib import Path

from rich.table import Table

from daytune.config import RunConfig, dump_yaml, load_run_config
from daytune.errors import RunError
from daytune.progress import Reporter
from daytune.track import RunDir
from daytune.train.loop import find_resume_checkpoint, train


def start_or_resume(
    cfg: RunConfig | None, argv: list[str], resume: str | None, reporter: Reporter, overrides: list[str] = ()
) -> tuple[RunConfig, RunDir, Path | None]:
    """A new run folder, or (with --resume) the existing one and its newest checkpoint."""
    if resume is None:
        return cfg, _new_run(cfg, argv), None
    if resume == "auto":
        if cfg is None:
            raise RunError("--resume auto needs the recipe, to know which runs to look at")
        run = find_latest_unfinished(Path(cfg.out_dir), cfg.name)
    else:
        run = RunDir.open(resume)
    saved = load_run_config(run.path / "config.yaml", overrides)
    run.note_resume(argv)
    saved.out_dir = str(run.path.parent)
    return saved, run, find_resume_checkpoint(run)


def _new_run(cfg: RunConfig, argv: list[str]) -> RunDir:
    """Create the run folder; under a multi-process launch, the main process creates it and tells the others."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        run = RunDir.create(cfg.out_dir, cfg.name)
        run.write_start(dump_yaml(cfg), argv)
        return run
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from daytune.train.precision import pick_device

    state = PartialState(cpu=pick_device(cfg.train.device).type == "cpu")  # the same state train() will use
    holder = [None]
    if state.is_main_process:
        run = RunDir.create(cfg.out_dir, cfg.name)
        run.write_start(dump_yaml(cfg), argv)
        holder = [str(run.path)]
    broadcast_object_list(holder, from_process=0)
    return RunDir(holder[0])


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


def evaluate_pair(cfg: RunConfig, model_ref: str, trained: Path | None, reporter: Reporter) -> dict:
    """Evaluate the base model (unless eval.base is false) and, given a trained adapter or model folder, the tuned
    one, loaded back from disk (which also proves it loads)."""
    import torch

    from daytune.eval import evaluate
    from daytune.models import load_model, load_tokenizer, resolve_model
    from daytune.train.methods import load_trained

    path = resolve_model(model_ref, log=reporter.log)
    tokenizer = load_tokenizer(path)
    results = {}
    with torch.no_grad():
        if trained is None or cfg.eval.base:
            reporter.log("Evaluating the base model...")
            results["base"] = evaluate(load_model(path), tokenizer, cfg.eval, cfg.data)
            gc.collect()
        if trained is not None:
            reporter.log("Evaluating the tuned model...")
            results["tuned"] = evaluate(load_trained(path, trained), tokenizer, cfg.eval, cfg.data)
    return results


def evaluate_run(cfg: RunConfig, run: RunDir, reporter: Reporter) -> dict:
    from daytune.track import record_eval

    results = evaluate_pair(cfg, cfg.model, run.trained, reporter)
    run.update_summary(eval=results)
    record_eval(run, cfg, results, None, cfg.model, run.trained)  # lineage; W&B/MLflow when configured
    return results


def eval_table(results: dict) -> Table:
    table = Table(title="evaluation")
    cols = [c for c in ("base", "tuned") if c in results]
    table.add_column("metric")
    for c in cols:
        table.add_column(c, justify="right")
    if len(cols) == 2:
        table.add_column("Δ", justify="right")
    rows = [
        ("held-out loss (lower is better)", ("heldout", "loss")),
        ("held-out perplexity", ("heldout", "perplexity")),
        ("multiple-choice accuracy", ("multiple_choice", "accuracy")),
    ]
    for label, (section, key) in rows:
        values = [results[c].get(section, {}).get(key) for c in cols]
        if all(v is None for v in values):
            continue
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        if len(cols) == 2 and None not in values:
            cells.append(f"{values[1] - values[0]:+.4f}")
        table.add_row(label, *cells)
    return table


def run_recipe(
    cfg: RunConfig | None,
    argv: list[str],
    reporter: Reporter,
    resume: str | None = None,
    overrides: list[str] = (),
) -> RunDir:
    cfg, run, checkpoint = start_or_resume(cfg, argv, resume, reporter, overrides)
    reporter.log(f"Run folder: {run.path}")
    train(cfg, run, reporter, resume=checkpoint)
    gc.collect()
    if cfg.eval.heldout or cfg.eval.multiple_choice:
        results = evaluate_run(cfg, run, reporter)
        reporter.print(eval_table(results))
    reporter.print(f"\nRun folder: [bold]{run.path}[/bold]")
    reporter.print(f"Serve it:   daytune serve --run {run.path}")
    return run
