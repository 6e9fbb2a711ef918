"""The `daytune` command. Sub-commands map to stages; errors print as one clear line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from daytune import __version__
from daytune.errors import DaytuneError

EPILOG = """examples:
  daytune data prepare examples/data-mix.yaml --out data/mix   build a cleaned, decontaminated mix with its card
  daytune run examples/quickstart.yaml                 data -> train (3 min) -> eval, base vs tuned
  daytune run examples/quickstart.yaml --budget 30s    the same, shorter
  daytune train examples/quickstart.yaml --resume auto continue the newest unfinished run of this recipe
  daytune eval --run runs/<run-id> --with-base         evaluation suite: the run's adapter vs the base model
  daytune serve --run runs/<run-id> --port 8080        serve it through the competition API
  daytune export runs/<run-id> --merge --out merged/   a plain transformers model folder
  daytune submit runs/<run-id> --out submission/       a Dockerfile folder for the competition
  daytune plan --model llama-2-7b --method qlora --seq-len 2048 --gpu rtx4090-24gb --budget 24h
                                                       will it fit, how fast, how much data a day buys
  daytune runs list                                    every run under ./runs: model, method, data, time, loss, eval
  daytune runs compare RUN1 RUN2 --out report.html     loss curves, throughput, memory, config diff, eval CIs
"""


EVAL_EPILOG = """examples:
  daytune eval --model smollm2-135m --suite quick              HELM-style scenarios -> results.json + results.md
  daytune eval --run runs/<run-id> --with-base                 the run's adapter, and the base model, compared
  daytune eval --http http://localhost:8080 --suite quick      a running submission server, as HELM calls it
  daytune eval compare eval/A eval/B                           per-scenario deltas, paired-bootstrap CIs
  daytune eval --model smollm2-135m --harness wikitext,arithmetic_2da --limit 50   lm-eval's own tasks, offline
  daytune eval --run runs/<run-id> --recipe runs/<run-id>/config.yaml   the recipe's held-out loss + MC accuracy
"""


def _eval_parser(sub) -> None:
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
    sp.add_argument("--suite", default="quick", help="quick (default), competition-open or full")
    sp.add_argument(
        "--scenarios", help="only these scenarios, comma-separated (mmlu,truthfulqa,bbq,gsm8k,xsum,...)"
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="daytune",
        description="One LLM, one GPU, one day: fine-tune, evaluate and serve.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"daytune {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars; a status line every 15 s")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def recipe_args(sp, required=True):
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

    sp = sub.add_parser("run", help="data -> train -> eval (base and tuned) from one recipe")
    recipe_args(sp)
    sp = sub.add_parser("train", help="train only (LoRA) from a recipe")
    recipe_args(sp, required=False)

    _eval_parser(sub)

    _serve_parser(sub)
    _submit_parser(sub)
    _plan_parser(sub)
    _runs_parser(sub)

    sp = sub.add_parser("export", help="write a run's model as a plain transformers (or PEFT) folder")
    sp.add_argument("run", help="a run folder")
    sp.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    sp.add_argument(
        "--merge", action="store_true", help="fold the adapter into the base: a full HF model folder"
    )
    sp.add_argument(
        "--dtype", default="float32", help="weights dtype of a merged model: float32, bfloat16, float16"
    )

    sub.add_parser("models", help="list the models daytune knows by name and the local model cache")
    _add_data_parser(sub)
    return p


def _add_data_parser(sub) -> None:
    sp = sub.add_parser("data", help="data sources, mixing recipes, cleaning and data cards")
    data = sp.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    dp = data.add_parser("sources", help="the sources daytune knows, with licence and provenance")
    dp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dp = data.add_parser(
        "prepare",
        help="load, filter, deduplicate and decontaminate a data recipe into a dataset folder with its card",
    )
    dp.add_argument("recipe", help="data recipe YAML (see examples/data-mix.yaml)")
    dp.add_argument("--out", required=True, help="the folder to write (train.jsonl, val.jsonl, data_card.*)")
    dp.add_argument("--force", action="store_true", help="replace --out if it exists (swapped in atomically)")
    dp.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (repeatable)"
    )
    dp = data.add_parser(
        "inspect", help="print a dataset's card and sample rows as the model sees them, loss mask visible"
    )
    dp.add_argument("folder", help="a folder written by `daytune data prepare`")
    dp.add_argument("-n", "--samples", type=int, default=3, help="how many training rows to show (default 3)")
    dp.add_argument("--source", help="show rows of this source only")
    dp.add_argument("--seed", type=int, default=0, help="which rows to sample")
    dp.add_argument("--model", help="render with this model's tokenizer (default: the one in the card)")
    dp.add_argument("--template", choices=["chat", "alpaca"], help="default: the card's template")
    dp.add_argument("--no-card", action="store_true", help="samples only")


def _recipe(args):
    from daytune.config import load_run_config

    overrides = list(args.set) + ([f"train.budget={args.budget}"] if getattr(args, "budget", None) else [])
    if args.recipe is None:
        return None, overrides
    return load_run_config(args.recipe, overrides), overrides


def _cmd_run(args, reporter, train_only=False) -> int:
    from daytune.pipeline import run_recipe, start_or_resume
    from daytune.train.loop import train

    cfg, overrides = _recipe(args)
    if cfg is None and not args.resume:
        raise DaytuneError("give a recipe YAML, or --resume RUN_DIR")
    argv = ["daytune", *sys.argv[1:]]
    if train_only:
        cfg, run, checkpoint = start_or_resume(cfg, argv, args.resume, reporter, overrides)
        reporter.log(f"Run folder: {run.path}")
        train(cfg, run, reporter, resume=checkpoint)
        reporter.print(f"Run folder: {run.path}")
        return 0
    run_recipe(cfg, argv, reporter, resume=args.resume, overrides=overrides)
    return 0


def _cmd_eval(args, reporter) -> int:
    if args.compare:
        return _cmd_eval_compare(args, reporter)
    if not (args.run or args.model or args.http is not None):
        raise DaytuneError("daytune eval: give --model, --run or --http (or: daytune eval compare A B)")
    if args.recipe:
        return _cmd_eval_recipe(args, reporter)
    return _cmd_eval_suite(args, reporter)


def _cmd_eval_compare(args, reporter) -> int:
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


def _eval_out_dir(args, run_path: Path | None, label: str) -> Path:
    import time as _time

    if args.out:
        out = Path(args.out)
    else:
        stamp = _time.strftime("%Y%m%d-%H%M%S")
        out = (run_path / "eval" if run_path else Path("eval")) / f"{stamp}-{label}"
    for name in ("results.json", "base", "tuned", "harness.json"):
        if (out / name).exists():
            raise DaytuneError(f"{out / name} exists; results are never overwritten: pass another --out")
    return out


def _cmd_eval_suite(args, reporter) -> int:
    from daytune.eval.lm import HttpLM, LocalLM
    from daytune.eval.report import compare, compare_markdown, markdown_table, write_results
    from daytune.eval.scenarios import DataRoot
    from daytune.eval.suites import suite_data_root, suite_plan
    from daytune.fileio import write_json_atomic, write_text_atomic

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    if not args.harness:
        suite_plan(args.suite, scenarios, args.max_instances)  # bad names fail before loading a model
    run_path, model_ref, trained, run = None, args.model, args.adapter, None
    if args.run:
        from daytune.config import load_run_config
        from daytune.track.runs import resolve_run

        run = resolve_run(args.run)  # a folder or a run id
        run_path, model_ref, trained = run.path, load_run_config(run.path / "config.yaml").model, run.trained
        if not trained.is_dir():
            raise DaytuneError(f"{run.path}: no adapter/ or model/ yet (the run has not saved a model)")
    elif model_ref and model_ref.startswith("wandb:"):
        from daytune.track.artifacts import pull_wandb_model

        model_ref, trained = pull_wandb_model(model_ref, reporter.log)
    elif trained and not (Path(trained) / "adapter_config.json").is_file():
        raise DaytuneError(f"--adapter {trained}: not a PEFT adapter folder (no adapter_config.json)")
    out = _eval_out_dir(args, run_path, "harness" if args.harness else args.suite)
    if args.http is not None:
        lm = HttpLM(args.http or None, concurrency=args.concurrency)
    elif args.with_base and trained and not args.harness:
        lm = None  # loaded below, after the base model
    else:
        lm = LocalLM.load(model_ref, str(trained) if trained else None, args.batch_size, log=reporter.log)

    if args.harness:
        return _cmd_eval_harness(args, reporter, lm, out)

    def one(lm_, label: str) -> dict:
        from daytune.eval.suites import run_suite

        reporter.log(f"Evaluating {label} on suite '{args.suite}'...")
        res = run_suite(
            lm_, args.suite, args.data_root, scenarios, args.max_instances, args.bootstrap, reporter.log
        )
        res["title"] = label if label in ("base", "tuned") else lm_.name
        j, m = write_results(res, out / label if label in ("base", "tuned") else out)
        reporter.print(markdown_table(res), markup=False)
        reporter.print(f"Results: {j} and {m}")
        return res

    DataRoot(suite_data_root(args.suite, args.data_root)).path("")  # a missing data root fails early
    if lm is None:  # --with-base: the base model first, then the trained one (one in memory at a time)
        base = one(LocalLM.load(model_ref, None, args.batch_size, log=reporter.log), "base")
        tuned = one(LocalLM.load(model_ref, str(trained), args.batch_size, log=reporter.log), "tuned")
        rows = compare(base, tuned, iters=args.bootstrap)
        text = compare_markdown(rows, "base", "tuned")
        write_json_atomic(out / "compare.json", {"a": "base", "b": "tuned", "rows": rows})
        write_text_atomic(out / "compare.md", text)
        reporter.print(text, markup=False)
        results = {"base": base, "tuned": tuned}
    else:
        results = {"tuned" if run else "model": one(lm, "model")}
    if run is not None:  # lineage: run -> these results (and W&B/MLflow when the run's recipe tracks them)
        from daytune.track import record_eval

        record_eval(run, load_run_config(run.path / "config.yaml"), results, out, model_ref, trained)
    return 0


def _cmd_eval_harness(args, reporter, lm, out: Path) -> int:
    from daytune.eval.harness import harness_summary, run_harness
    from daytune.eval.lm import LocalLM
    from daytune.eval.scenarios import DataRoot, default_data_root
    from daytune.fileio import write_json_atomic

    if not isinstance(lm, LocalLM):
        raise DaytuneError("--harness runs on a local model (--model or --run), not --http")
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    data = DataRoot(Path(args.data_root).expanduser() if args.data_root else default_data_root())
    res = run_harness(lm, tasks, data, out / "tasks", limit=args.limit, num_fewshot=args.num_fewshot)
    summary = harness_summary(res)
    write_json_atomic(
        out / "harness.json", {"model": lm.info(), "tasks": tasks, "limit": args.limit, "results": summary}
    )
    lines = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in summary.items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {k} | {v:.4f} |")
    reporter.print("\n".join(lines), markup=False)
    reporter.print(f"Results: {out / 'harness.json'}")
    return 0


def _cmd_eval_recipe(args, reporter) -> int:
    """The recipe's eval section (held-out loss, multiple-choice accuracy), base vs tuned: what `daytune run`
    reports besides the suite."""
    from daytune.config import load_run_config
    from daytune.fileio import write_json_atomic
    from daytune.pipeline import eval_table, evaluate_pair
    from daytune.track import record_eval
    from daytune.track.runs import resolve_run

    run = None
    if args.run:
        run = resolve_run(args.run)
        cfg = load_run_config(args.recipe or run.path / "config.yaml", args.set)
        model_ref, trained = cfg.model, run.trained
        out = Path(args.out or run.path / "eval.json")
    else:
        cfg = load_run_config(args.recipe, args.set)
        model_ref, trained = args.model, Path(args.adapter) if args.adapter else None
        if model_ref.startswith("wandb:"):
            from daytune.track.artifacts import pull_wandb_model

            model_ref, trained = pull_wandb_model(model_ref, reporter.log)
        out = Path(args.out or "eval.json")
    if not (cfg.eval.heldout or cfg.eval.multiple_choice):
        raise DaytuneError(
            "nothing to evaluate: set eval.heldout and/or eval.multiple_choice (--recipe or --set)"
        )
    results = evaluate_pair(cfg, model_ref, trained, reporter)
    write_json_atomic(
        out, {"model": model_ref, "trained": str(trained) if trained else None, "results": results}
    )
    if run is not None:
        record_eval(run, cfg, results, out, model_ref, trained)  # lineage; W&B/MLflow when configured
    reporter.print(eval_table(results))
    reporter.print(f"Results: {out}")
    return 0


def _serve_parser(sub) -> None:
    from daytune.serve.options import TOKEN_ENV, ServeOptions

    d = ServeOptions()
    sp = sub.add_parser(
        "serve",
        help="serve a model through the competition HTTP API",
        description="Serve a model (adapter merged at load) through the NeurIPS LLM Efficiency Challenge API: "
        "POST /process, /tokenize, /decode and GET /health. Concurrent requests are batched.",
    )
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder or run id: serve its model with its adapter merged")
    src.add_argument("--model", help="model reference: smollm2-135m, a HF folder, a .gguf file or a hub id")
    sp.add_argument("--adapter", help="a PEFT adapter folder (with --model); merged at load")
    sp.add_argument("--run-id", help="the run id /health reports (with --model; --run sets it itself)")
    sp.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    sp.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every endpoint but /health (or set ${TOKEN_ENV})",
    )
    limits = (  # (option, type, help); defaults from ServeOptions
        ("max_batch", int, "sequences decoded together; 1 = one at a time"),
        ("max_queue", int, "waiting sequences before answering 503"),
        ("max_prefill_tokens", int, "padded prompt tokens per prefill step"),
        ("max_new_tokens", int, "cap on max_new_tokens"),
        ("request_timeout", float, "seconds before a request gets HTTP 504"),
        ("shutdown_grace", float, "seconds in-flight requests get on SIGTERM"),
    )
    for name, kind, text in limits:
        default = getattr(d, name)
        sp.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({default})")


def _cmd_serve(args, reporter) -> int:
    import uvicorn

    from daytune.config import load_run_config
    from daytune.serve.app import create_app
    from daytune.serve.model import ServeModel
    from daytune.serve.options import ServeOptions
    from daytune.track.runs import resolve_run

    for name in ("max_batch", "max_queue", "max_prefill_tokens", "max_new_tokens", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise DaytuneError(
                f"--{name.replace('_', '-')}: must be a positive number, got {getattr(args, name)}"
            )
    if args.request_timeout <= 0:
        raise DaytuneError(f"--request-timeout: must be positive, got {args.request_timeout}")
    if args.threads is not None:
        if args.threads < 1:
            raise DaytuneError(f"--threads: must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.run:
        run = resolve_run(args.run)
        if not run.trained.is_dir():
            raise DaytuneError(f"{run.path}: no adapter/ or model/ yet (the run has not saved a model)")
        cfg = load_run_config(run.path / "config.yaml")
        server = ServeModel(cfg.model, run.trained, device=args.device, run_id=run.run_id, log=reporter.log)
    else:
        if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
            raise DaytuneError(
                f"--adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)"
            )
        server = ServeModel(
            args.model, args.adapter, device=args.device, run_id=args.run_id, log=reporter.log
        )
    options = ServeOptions(
        host=args.host,
        port=args.port,
        token=args.token,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_new_tokens=args.max_new_tokens,
        request_timeout=args.request_timeout,
        shutdown_grace=args.shutdown_grace,
    )
    auth = "bearer token required" if options.token else "no token"
    reporter.print(f"Serving {server.info()} on http://{args.host}:{args.port} ({auth})")
    import signal

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found: make that
    # a no-op, so a graceful stop ends with exit code 0 rather than a kill by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        create_app(server, options),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=options.shutdown_grace,
    )
    reporter.print("Server stopped.")
    return 0


def _submit_parser(sub) -> None:
    sp = sub.add_parser(
        "submit",
        help="write a competition submission folder (Dockerfile serving on port 80) for a run",
        description="Write a self-contained submission folder for a run: a Dockerfile that installs pinned "
        "requirements, fetches the base model's weights at build time and runs `daytune serve` on port 80.",
    )
    sp.add_argument("run", help="the run folder (runs/<run-id>)")
    sp.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    sp.add_argument(
        "--base-model",
        help="where the image fetches the base model: a registered name or a hub id (default: the run's model)",
    )


def _cmd_submit(args, reporter) -> int:
    from daytune.serve.submit import write_submission

    out = write_submission(args.run, args.out, base_model=args.base_model, log=reporter.log)
    reporter.print(
        f"Submission folder: {out}\n  docker build -t my-submission {out} && docker run -p 8080:80 my-submission"
    )
    return 0


def _runs_parser(sub) -> None:
    sp = sub.add_parser(
        "runs",
        help="list, show, compare (HTML report) and diagnose recorded runs",
        description="Runs are folders under ./runs (or --runs-dir, or $DAYTUNE_RUNS); a run is named by its folder "
        "path or its id (the folder name, or any part of it that names one run).",
    )
    verbs = sp.add_subparsers(dest="runs_command", metavar="VERB", required=True)
    p = verbs.add_parser(
        "list", help="table: id, model, method, data fingerprint, time/budget, final loss, eval"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p = verbs.add_parser("show", help="one run: config, environment, results, lineage, doctor")
    p.add_argument("run", help="run id or folder")
    p = verbs.add_parser(
        "compare", help="one self-contained HTML report: curves, throughput, memory, config diff, eval CIs"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or folders (one or more)")
    p.add_argument("--out", required=True, help="the HTML file to write (e.g. report.html)")
    p = verbs.add_parser("doctor", help="the utilization doctor's findings and recommendations for a run")
    p.add_argument("run", help="run id or folder")
    for p in verbs.choices.values():
        p.add_argument("--runs-dir", help="where runs are (default: $DAYTUNE_RUNS or ./runs)")


def _cmd_runs(args, reporter) -> int:
    import json

    from rich.table import Table

    from daytune.track.doctor import diagnose, findings_json, format_findings
    from daytune.track.runs import list_runs, resolve_run, run_facts, runs_root

    if args.runs_command == "list":
        root = runs_root(args.runs_dir)
        facts = [run_facts(r) for r in list_runs(root)]
        if args.json:
            print(json.dumps(facts, indent=2))
            return 0
        if not facts:
            reporter.print(f"No runs under {root}.")
            return 0
        columns = [
            "id",
            "model",
            "method",
            "data",
            "time / budget",
            "steps",
            "final loss",
            "eval (tuned, Δ base)",
        ]
        rows = []
        for f in facts:
            loss = "-" if f["final_loss"] is None else f"{f['final_loss']:.4f}"
            model = (
                Path(str(f["model"])).name if "/" in str(f["model"]) else str(f["model"])
            )  # a folder: its name
            rows.append(
                [f["id"], model, f["method"], f["data"] or "-", f["duration"], f["steps"], loss, f["eval"]]
            )
        rows = [["-" if v is None else str(v) for v in row] for row in rows]
        if not sys.stdout.isatty():  # piped: plain aligned columns, never cut to a terminal width
            widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
            for r in [columns, *rows]:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            return 0
        table = Table(title=f"runs in {root}")
        for col in columns:
            right = col in ("steps", "final loss")
            table.add_column(col, justify="right" if right else "left", no_wrap=col != columns[-1])
        for row in rows:
            table.add_row(*row)
        reporter.print(table)
        return 0
    if args.runs_command == "compare":
        from daytune.track.report import write_report

        runs = [resolve_run(r, args.runs_dir) for r in args.runs]
        out = write_report(runs, args.out)
        reporter.print(
            f"Report: {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}; opens offline in any browser)"
        )
        return 0
    run = resolve_run(args.run, args.runs_dir)
    if args.runs_command == "doctor":
        from daytune.fileio import write_json_atomic

        findings = diagnose(run)
        if findings:
            write_json_atomic(run.path / "doctor.json", findings_json(findings))
        reporter.print(format_findings(findings), markup=False)
        return 0
    _show_run(run, reporter)
    return 0


def _show_run(run, reporter) -> None:
    from rich.markup import escape

    from daytune.track.doctor import Finding, diagnose, format_findings
    from daytune.track.runs import run_facts

    f = run_facts(run)
    summary, lineage = run.read_summary(), run.read_json("lineage.json")
    env, tracking = run.read_json("env.json"), run.read_json("tracking.json")
    train = summary.get("train", {})
    lines = [
        f"[bold]{escape(f['id'])}[/bold]  ({f['status']})",
        f"  folder     {run.path}",
        f"  model      {f['model']}  method {f['method']}",
        f"  data       {((lineage.get('dataset') or {}).get('train') or {}).get('path', '-')}  sha256 {f['data'] or '-'}",
        f"  time       {f['duration']}  steps {f['steps']}  stopped by {train.get('stopped_by', '-')}",
        f"  loss       final {f['final_loss']}  best val {train.get('best_val_loss')}",
        f"  speed      {train.get('tokens_per_s', '-')} tokens/s  padding {train.get('padding_waste', '-')}",
        f"  eval       {f['eval']}",
        f"  device     {env.get('device_name', '-')}  torch {env.get('torch', '-')}  cuda {env.get('cuda')}",
        f"  MFU peak   {tracking.get('peak_source', '-')}",
    ]
    command = (
        (run.path / "command.txt").read_text(encoding="utf-8").splitlines()
        if (run.path / "command.txt").is_file()
        else []
    )
    if command:
        lines.append(f"  command    {command[0]}")
    for name, ref in tracking.get("backends", {}).items():
        where = ref.get("url") or ref.get("dir") or ref.get("tracking_uri") or ""
        lines.append(f"  {name:<10} {'FAILED: ' + ref['error'] if ref.get('error') else where}")
    for out in lineage.get("outputs", []):
        refs = ", ".join(f"{k}: {v}" for k, v in (out.get("artifacts") or {}).items())
        lines.append(
            f"  output     {out['path']}/ (step {out.get('step')})" + (f"  [{refs}]" if refs else "")
        )
    kept = [c for c in lineage.get("checkpoints", []) if (run.path / c["path"]).is_dir()]
    lines.append(f"  checkpoints {len(lineage.get('checkpoints', []))} saved, {len(kept)} kept")
    for ev in lineage.get("evaluations", []):
        lines.append(f"  evaluated  {ev['time']} -> {ev['results']}")
    reporter.print(lines[0] + "\n" + escape("\n".join(lines[1:])))  # paths and commands hold [brackets]
    doctor = run.read_json("doctor.json")
    findings = [Finding(**x) for x in doctor.get("findings", [])] if doctor else diagnose(run)
    reporter.print(format_findings(findings), markup=False)


def _cmd_data(args, reporter) -> int:
    if args.data_command == "sources":
        import json
        from dataclasses import asdict

        from daytune.data.sources import SOURCES

        if args.json:
            print(json.dumps({name: asdict(src) for name, src in SOURCES.items()}, indent=2))
            return 0
        for src in SOURCES.values():
            p = src.provenance
            reporter.print(
                f"[bold]{src.name}[/bold]  {p.licence} · commercial use: {'yes' if p.commercial else 'no'} · "
                f"written by: {'LLM' if p.llm_generated else 'people'} · format: {src.format} · "
                f"hub: {src.hub_id or '-'}"
            )
            reporter.print(f"    {src.title}\n    cite: {p.citation}\n    {src.notes}".rstrip())
        reporter.print("\nYour own files: give format: and declare provenance: (see examples/data-mix.yaml).")
        return 0
    if args.data_command == "prepare":
        from daytune.data.prepare import prepare
        from daytune.data.recipe import load_data_recipe

        recipe = load_data_recipe(args.recipe, args.set)
        card = prepare(recipe, args.out, reporter=reporter, force=args.force, recipe_file=str(args.recipe))
        for w in card["warnings"]:
            reporter.print(f"warning: {w}")
        removed = sum(r["count"] for r in card["removed"])
        reporter.print(
            f"{card['files']['train.jsonl']['rows']} training and {card['files']['val.jsonl']['rows']} validation "
            f"rows in {args.out} ({removed} rows removed, see data_card.md); fingerprint {card['fingerprint']}"
        )
        reporter.print(f"Inspect it: daytune data inspect {args.out}")
        return 0
    from daytune.data.show import inspect_dataset

    inspect_dataset(
        args.folder,
        reporter,
        n=args.samples,
        source=args.source,
        seed=args.seed,
        model=args.model,
        template=args.template,
        show_card=not args.no_card,
    )
    return 0


def _cmd_export(args, reporter) -> int:
    from daytune.train.export import export_run

    out = export_run(args.run, args.out, merge=args.merge, dtype=args.dtype, log=reporter.log)
    kind = "merged model" if args.merge or not (out / "adapter_config.json").is_file() else "PEFT adapter"
    reporter.print(f"Exported {kind} to {out}")
    return 0


def _plan_parser(sub) -> None:
    sp = sub.add_parser(
        "plan",
        help="predict memory, fit, speed and what a budget buys, before training (no weights needed)",
        description="Predict a fine-tuning run before it starts: memory breakdown (weights, trainable parameters, "
        "gradients, optimizer states, activations with and without checkpointing, logits/loss buffers, "
        "framework overhead), whether it fits, the largest micro-batch that fits, predicted tokens/s, the tokens "
        "and epochs the budget buys, and the fastest setup that fits. Models: registered names (see "
        "`daytune plan --list`), a Hugging Face folder or any model reference daytune resolves (only "
        "config.json is read).",
    )
    sp.add_argument(
        "--model", help="a registered name (llama-2-7b, mistral-7b, qwen-14b, ...) or a model folder"
    )
    sp.add_argument("--recipe", help="take model, method and training settings from a recipe YAML")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    sp.add_argument("--method", help="lora, dora, qlora, full, freeze, adapter, prefix, prompt, ptuning, ia3")
    sp.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: the recipe's data.max_seq_len)"
    )
    sp.add_argument(
        "--micro-batch", default=None, help="rows per micro-batch, or auto: the largest that fits"
    )
    sp.add_argument(
        "--gpu", "--device", dest="device", default="cpu", help="a100-40gb, rtx4090-24gb, h100-80gb or cpu"
    )
    sp.add_argument("--budget", help="wall-clock budget, e.g. 24h: tokens and epochs it buys")
    sp.add_argument(
        "--data",
        help="a training JSONL or dataset folder: epochs, padding and label positions (default: the recipe's)",
    )
    sp.add_argument("--precision", help="auto (default), 32-true, bf16-true, bf16-mixed, 16-mixed")
    sp.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="recompute activations"
    )
    sp.add_argument("--optimizer", help="adamw, adamw_8bit, paged_adamw, paged_adamw_8bit")
    sp.add_argument("--packing", action="store_true", default=None, help="pack several examples per row")
    sp.add_argument("--lora-r", type=int, help="LoRA rank")
    sp.add_argument("--lora-targets", help="attention, all-linear, or comma-separated module names")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.add_argument("--list", action="store_true", help="list the models and devices the planner knows")


def _cmd_plan(args, reporter) -> int:
    import json

    from daytune.config import RunConfig, load_run_config
    from daytune.errors import ConfigError
    from daytune.hardware import GPUS, get_device, planned_precision
    from daytune.plan import dataset as plan_data
    from daytune.plan import setup_from_config
    from daytune.plan.models import REGISTRY, resolve_arch
    from daytune.plan.search import make_plan, render
    from daytune.units import parse_duration

    if args.list:
        for a in REGISTRY.values():
            tag = "" if a.challenge else "  (not a challenge model)"
            reporter.print(f"{a.name:14s} {a.total_params() / 1e9:6.2f}B  {a.summary()}  [{a.licence}]{tag}")
        reporter.print("devices: " + ", ".join([*GPUS, "cpu (this machine, measured)"]))
        return 0
    overrides = list(args.set)
    for flag, key in (("method", "train.method"), ("seq_len", "data.max_seq_len"), ("optimizer", "train.optimizer"),
                      ("lora_r", "train.lora.r"), ("lora_targets", "train.lora.targets")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            value = f"[{value}]" if flag == "lora_targets" and "," in str(value) else value
            overrides.append(f"{key}={value}")
    if args.gradient_checkpointing:
        overrides.append("train.gradient_checkpointing=true")
    if args.packing:
        overrides.append("data.packing=true")
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.recipe or overrides:
        cfg = load_run_config(args.recipe, overrides)
    else:
        cfg = RunConfig()
    model_ref = args.model or (cfg.model if args.recipe else None)
    if not model_ref:
        raise ConfigError("daytune plan: give --model NAME (see daytune plan --list) or --recipe RECIPE")
    arch = resolve_arch(model_ref)
    device = get_device(args.device)
    precision = planned_precision(cfg.train.precision, device)  # the rule training applies, on this device
    raw_mb = (
        args.micro_batch
        if args.micro_batch is not None
        else ("auto" if not args.recipe else cfg.train.micro_batch)
    )
    auto = str(raw_mb).strip().lower() == "auto"
    if not auto:
        try:
            mb = int(raw_mb)
        except ValueError:
            raise ConfigError(f"--micro-batch: expected a positive integer or auto, got {raw_mb!r}") from None
        if mb < 1:
            raise ConfigError(f"--micro-batch: must be at least 1, got {mb}")
    setup = setup_from_config(cfg, precision, device.kind, micro_batch=1 if auto else mb)
    budget = parse_duration(args.budget, "--budget") if args.budget else None
    data = None
    data_path = args.data or (cfg.data.train if args.recipe else None)  # a recipe's own training data
    if data_path:
        tokenizer_dir = _local_tokenizer(model_ref)
        data = plan_data.measure(
            data_path, tokenizer_dir, cfg.data.template, cfg.data.max_seq_len, cfg.data.system_prompt
        )
        # the batch plan training uses
        data.seed, data.group_by_length = cfg.train.seed, cfg.data.group_by_length
    try:
        plan = make_plan(arch, setup, device, micro_batch_auto=auto, budget_seconds=budget, data=data)
    except ValueError as e:  # an unknown module name in lora targets
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    reporter.print(render(plan))
    for note in plan.notes:
        reporter.print(f"note: {note}")
    return 0


def _local_tokenizer(model_ref: str):
    """The model's own tokenizer folder when it is on this machine (a folder, or the embedded model)."""
    from daytune.models.registry import KNOWN_MODELS

    path = Path(model_ref).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path
    if model_ref in KNOWN_MODELS:
        from daytune.models import resolve_model

        return resolve_model(model_ref, log=lambda *a: None)
    return None


def _cmd_models(args, reporter) -> int:
    from daytune.models import KNOWN_MODELS
    from daytune.models.load import daytune_home

    for name, m in KNOWN_MODELS.items():
        reporter.print(f"{name:16s} {m.hub_id:40s} {m.licence:12s} {m.description}")
    cache = daytune_home() / "models"
    cached = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    reporter.print(f"\ncache: {cache}" + ("".join(f"\n  {c}" for c in cached) if cached else " (empty)"))
    return 0


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings drown daytune's own output; --debug keeps them."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault(
        "TQDM_DISABLE", "1"
    )  # GGUF conversion draws its own bar; daytune prints its own line
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module="(transformers|peft|accelerate|torch|bitsandbytes)"
    )
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernel notices


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from daytune.progress import Reporter

    if not args.debug:
        _quiet_libraries()
    reporter = Reporter(quiet=args.quiet or os.environ.get("DAYTUNE_QUIET") == "1")
    handlers = {
        "run": lambda: _cmd_run(args, reporter),
        "train": lambda: _cmd_run(args, reporter, train_only=True),
        "eval": lambda: _cmd_eval(args, reporter),
        "serve": lambda: _cmd_serve(args, reporter),
        "export": lambda: _cmd_export(args, reporter),
        "submit": lambda: _cmd_submit(args, reporter),
        "models": lambda: _cmd_models(args, reporter),
        "plan": lambda: _cmd_plan(args, reporter),
        "runs": lambda: _cmd_runs(args, reporter),
        "data": lambda: _cmd_data(args, reporter),
    }
    try:
        return handlers[args.command]()
    except DaytuneError as e:
        if args.debug:
            traceback.print_exc()
        print(f"daytune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daytune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: say so, keep the traceback behind --debug
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"daytune: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
