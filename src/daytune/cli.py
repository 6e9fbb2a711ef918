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
  daytune run examples/quickstart.yaml                 data -> train (3 min) -> eval, base vs tuned
  daytune run examples/quickstart.yaml --budget 30s    the same, shorter
  daytune train examples/quickstart.yaml --resume auto continue the newest unfinished run of this recipe
  daytune eval --run runs/<run-id>                     evaluate a run's adapter (and the base model)
  daytune serve --run runs/<run-id> --port 8080        serve it through the competition API
  daytune export runs/<run-id> --merge --out merged/   a plain transformers model folder
  daytune submit runs/<run-id> --out submission/       a Dockerfile folder for the competition
  daytune runs list                                    every run under ./runs: model, method, data, time, loss, eval
  daytune runs compare RUN1 RUN2 --out report.html     loss curves, throughput, memory, config diff, eval CIs
"""


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

    sp = sub.add_parser("eval", help="held-out loss and multiple-choice accuracy, base vs tuned")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder or run id: its model, adapter and recipe")
    src.add_argument(
        "--model",
        help="model reference: smollm2-135m, a HF folder, a .gguf file, a hub id, or a W&B model artifact "
        "wandb:ENTITY/PROJECT/NAME:VERSION (base model and adapter, as `daytune train` logged them)",
    )
    sp.add_argument("--adapter", help="a PEFT adapter folder (with --model)")
    sp.add_argument("--recipe", help="recipe YAML whose data/eval sections to use (default: the run's own)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    sp.add_argument("--out", help="results JSON path (default: <run>/eval.json or ./eval.json)")

    _serve_parser(sub)
    _submit_parser(sub)
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
    return p


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
    sp.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"sequences decoded together; 1 = one at a time ({d.max_batch})",
    )
    sp.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"waiting sequences before answering 503 ({d.max_queue})",
    )
    sp.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=d.max_prefill_tokens,
        help="padded prompt tokens per prefill step",
    )
    sp.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help=f"cap on max_new_tokens ({d.max_new_tokens})",
    )
    sp.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds before a request gets HTTP 504",
    )
    sp.add_argument(
        "--shutdown-grace",
        type=float,
        default=d.shutdown_grace,
        help="seconds in-flight requests get on SIGTERM",
    )


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


def _cmd_export(args, reporter) -> int:
    from daytune.train.export import export_run

    out = export_run(args.run, args.out, merge=args.merge, dtype=args.dtype, log=reporter.log)
    kind = "merged model" if args.merge or not (out / "adapter_config.json").is_file() else "PEFT adapter"
    reporter.print(f"Exported {kind} to {out}")
    return 0


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
        "runs": lambda: _cmd_runs(args, reporter),
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
