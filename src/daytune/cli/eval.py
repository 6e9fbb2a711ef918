"""`daytune eval`: a suite, lm-eval tasks or a recipe's eval section on a model, a run or a server; `eval compare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from daytune.errors import ConfigError, DaytuneError

EVAL_EPILOG = """examples:
  daytune eval --model smollm2-135m --suite quick              HELM-style scenarios -> results.json + results.md
  daytune eval --run runs/<run-id> --with-base                 the run's adapter, and the base model, compared
  daytune eval --http http://localhost:8080 --suite quick      a running submission server, as HELM calls it
  daytune eval compare eval/A eval/B                           per-scenario deltas, paired-bootstrap CIs
  daytune eval --model smollm2-135m --harness wikitext,arithmetic_2da --limit 50   lm-eval's own tasks, offline
  daytune eval --run runs/<run-id> --recipe runs/<run-id>/config.yaml   the recipe's held-out loss + MC accuracy
"""


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "eval",
        help="evaluation suites (HELM scenarios), lm-eval tasks, or a recipe's held-out loss; compare results",
        description="Evaluate a model, an adapter, a run or a running server on HELM-style scenarios; "
        "'daytune eval compare A B' compares two results files.",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument(
        "compare", nargs="*", metavar="compare A B", help="compare two results.json files or folders"
    )
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run folder or run id: its model and adapter")
    src.add_argument(
        "--model",
        help="model reference: smollm2-135m, a HF folder, a .gguf file, a hub id, or a W&B model artifact "
        "wandb:ENTITY/PROJECT/NAME:VERSION (its base model and adapter, as daytune logged them)",
    )
    src.add_argument(
        "--http",
        nargs="?",
        const="",
        metavar="URL",
        help="a server speaking the competition API (default $HELM_HTTP_MODEL_BASE_URL or http://localhost:8080)",
    )
    sp.add_argument("--adapter", help="a PEFT adapter folder (with --model)")
    sp.add_argument(
        "--with-base", action="store_true", help="with an adapter: also evaluate the base model, and compare"
    )
    sp.add_argument(
        "--suite",
        default="quick",
        help="quick (default), competition-open, full, unseen (held-out SNI tasks) or neurips-open (the open "
        "run entries exactly as helm-run builds and scores them)",
    )
    sp.add_argument(
        "--scenarios", help="only these scenarios, comma-separated (mmlu,truthfulqa,bbq,gsm8k,xsum,...)"
    )
    sp.add_argument(
        "--subjects",
        help="MMLU subjects (or BBQ categories) instead of the suite's, comma-separated; 'all' for every MMLU "
        "subject",
    )
    sp.add_argument(
        "--tasks",
        help="Super-NaturalInstructions tasks for the unseen suite's sni scenario, comma-separated (default: the "
        "run's held-out tasks, else the suite's ten); a task the run trained on is refused",
    )
    sp.add_argument(
        "--max-instances", type=int, help="cap the instances of every scenario (MMLU: per subject)"
    )
    sp.add_argument(
        "--data-root",
        help="datasets folder (default: quick, the shipped samples; others, $DAYTUNE_EVAL_DATA or "
        "<repo>/../shared/data)",
    )
    sp.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (local model)")
    sp.add_argument(
        "--device",
        help="where a local model runs: auto (the GPU when there is one; default), cpu, cuda, cuda:N; weights in "
        "bf16 on GPUs (fp16 before Ampere), fp32 on CPUs. With --recipe, the default is its train.device",
    )
    sp.add_argument("--concurrency", type=int, default=4, help="requests in flight (--http)")
    sp.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    sp.add_argument(
        "--harness", metavar="TASKS", help="run lm-evaluation-harness tasks offline instead of a suite"
    )
    sp.add_argument("--limit", type=int, help="--harness: instances per task")
    sp.add_argument("--num-fewshot", type=int, help="--harness: shots (default: each task's own)")
    sp.add_argument(
        "--recipe", help="evaluate the recipe's eval section instead (held-out loss, MC accuracy)"
    )
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    sp.add_argument("--out", help="output folder (default: <run>/eval/<time>-<suite> or eval/<time>-<suite>)")


def cmd_eval(args, reporter) -> int:
    if args.compare:
        return _compare(args, reporter)
    if not (args.run or args.model or args.http is not None):
        raise DaytuneError("daytune eval: give --model, --run or --http (or: daytune eval compare A B)")
    if args.recipe:
        return _recipe(args, reporter)
    return _suite(args, reporter)


def _compare(args, reporter) -> int:
    from daytune.eval.report import compare, compare_markdown, load_results
    from daytune.fileio import write_json_atomic, write_text_atomic

    if len(args.compare) != 3 or args.compare[0] != "compare":
        raise DaytuneError("usage: daytune eval compare A B (two results.json files or folders)")
    a, b = load_results(args.compare[1]), load_results(args.compare[2])
    rows = compare(a, b, iters=args.bootstrap)
    if not rows:
        raise DaytuneError(f"{a['_path']} and {b['_path']} share no scenario metric to compare")
    text = compare_markdown(rows, a["_path"], b["_path"])
    reporter.print(text, markup=False)
    if args.out:
        out = Path(args.out)
        write_json_atomic(out / "compare.json", {"a": a["_path"], "b": b["_path"], "rows": rows})
        write_text_atomic(out / "compare.md", text)
        reporter.print(f"Comparison: {out / 'compare.md'}")
    return 0


def _source(args, reporter):
    from daytune.track.runs import model_source

    return model_source(args.run, args.model, args.adapter, log=reporter.log)


def _out_dir(given: str | None, run_dir: Path | None, label: str) -> Path:
    """--out, else <run>/eval/<time>-<label> or eval/<time>-<label>; results are never overwritten."""
    import time

    if given:
        out = Path(given)
    else:
        out = (run_dir / "eval" if run_dir else Path("eval")) / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    for name in ("results.json", "base", "tuned", "harness.json"):
        if (out / name).exists():
            raise DaytuneError(f"{out / name} exists; results are never overwritten: pass another --out")
    return out


def _suite(args, reporter) -> int:
    from daytune.eval.suites import suite_plan
    from daytune.pipeline import SuiteRequest, evaluate_suite

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    tasks = [s.strip() for s in args.tasks.split(",") if s.strip()] if args.tasks else None
    if tasks and not args.harness:
        _check_tasks(args.suite, scenarios, tasks, args.data_root)
    if not args.harness:
        suite_plan(
            args.suite, scenarios, args.max_instances, subjects
        )  # bad names fail before loading a model
    source = None if args.http is not None else _source(args, reporter)
    out = _out_dir(args.out, source.run_dir if source else None, "harness" if args.harness else args.suite)
    if args.harness:
        return _harness(args, reporter, source, out)
    lm = None
    if source is None:
        from daytune.eval.lm import HttpLM

        lm = HttpLM(args.http or None, concurrency=args.concurrency)
    req = SuiteRequest(
        args.suite,
        scenarios,
        args.max_instances,
        args.data_root,
        args.bootstrap,
        args.batch_size,
        device=args.device or "auto",
        subjects=subjects,
        tasks=tasks,
    )
    evaluate_suite(source, req, out, reporter, with_base=args.with_base, lm=lm)
    return 0


def _check_tasks(suite: str, scenarios, tasks: list[str], data_root) -> None:
    """--tasks needs the sni scenario in the plan, and task files that exist: both fail before a model loads."""
    from daytune.eval.scenarios import DataRoot
    from daytune.eval.suites import sni_tasks, suite_data_root, suite_plan

    if not sni_tasks(suite_plan(suite, scenarios)):
        raise ConfigError(f"--tasks: suite {suite!r} has no sni scenario (use --suite unseen)")
    folder = DataRoot(suite_data_root(suite, data_root)).path("natural_instructions")
    missing = [t for t in tasks if not (folder / f"{t}.json").is_file()]
    if missing:
        raise ConfigError(f"--tasks: no task file in {folder} for {', '.join(missing)}")


def _harness(args, reporter, source, out: Path) -> int:
    from daytune.eval.report import harness_markdown
    from daytune.pipeline import evaluate_harness

    if source is None:
        raise DaytuneError("--harness runs on a local model (--model or --run), not --http")
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    summary = evaluate_harness(
        source,
        tasks,
        out,
        reporter,
        args.data_root,
        args.limit,
        args.num_fewshot,
        args.batch_size,
        args.device or "auto",
    )
    reporter.print(harness_markdown(summary), markup=False)
    reporter.print(f"Results: {out / 'harness.json'}")
    return 0


def _recipe(args, reporter) -> int:
    """The recipe's eval section (held-out loss, multiple-choice accuracy), base vs tuned."""
    from daytune.config import load_run_config
    from daytune.pipeline import eval_table, evaluate_recipe

    if args.http is not None:
        raise DaytuneError("--recipe evaluates a local model (--model or --run), not --http")
    source = _source(args, reporter)
    cfg = load_run_config(args.recipe, args.set)
    out = Path(args.out or (source.run_dir / "eval.json" if source.run_dir else "eval.json"))
    results = evaluate_recipe(cfg, source, out, reporter, args.device)
    reporter.print(eval_table(results))
    reporter.print(f"Results: {out}")
    return 0
