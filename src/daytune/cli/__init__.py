"""The `daytune` command. Sub-commands map to stages; errors print as one clear line and exit with code 2.

One module per command group (run.py: run, train; eval.py; serve.py: serve, submit, export; runs.py; plan.py: plan,
models; data.py; sweep.py); each handler parses its flags, makes one call into the pipeline or a stage, and prints."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from daytune import __version__
from daytune.cli import data, eval, plan, run, runs, serve, sweep
from daytune.errors import DaytuneError

EPILOG = """examples:
  daytune data prepare examples/data-mix.yaml --out data/mix   build a cleaned, decontaminated mix with its card
  daytune run examples/quickstart.yaml                 data -> train (3 min) -> eval, base vs tuned
  daytune run examples/quickstart.yaml --budget 30s    the same, shorter
  daytune train examples/quickstart.yaml --resume auto continue the newest unfinished run of this recipe
  daytune eval --run runs/<run-id> --with-base         evaluation suite: the run's adapter vs the base model
  daytune serve --run runs/<run-id> --port 8080        serve it through the competition API
  daytune export runs/<run-id> --merge --out merged/   a plain transformers model folder
  daytune export runs/<run-id> --format gguf --quant q4_k_m --out gguf/   one GGUF + Ollama Modelfile
  daytune submit runs/<run-id> --out submission/       a Dockerfile folder for the competition
  daytune plan --model llama-2-7b --method qlora --seq-len 2048 --gpu rtx4090-24gb --budget 24h
                                                       will it fit, how fast, how much data a day buys
  daytune runs list                                    every run under ./runs: model, method, data, time, loss, eval
  daytune runs compare RUN1 RUN2 --out report.html     loss curves, throughput, memory, config diff, eval CIs
  daytune sweep examples/instruct-mix-sweep.yaml       search the recipe inside a budget (Optuna); retrain the best
"""

HANDLERS = {
    "run": run.cmd_run,
    "train": run.cmd_train,
    "eval": eval.cmd_eval,
    "serve": serve.cmd_serve,
    "export": serve.cmd_export,
    "submit": serve.cmd_submit,
    "models": plan.cmd_models,
    "plan": plan.cmd_plan,
    "runs": runs.cmd_runs,
    "data": data.cmd_data,
    "sweep": sweep.cmd_sweep,
}


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
    run.add_parsers(sub)  # the order here is the order of `daytune --help`
    eval.add_parser(sub)
    serve.add_serve_parser(sub)
    serve.add_submit_parser(sub)
    plan.add_plan_parser(sub)
    runs.add_parser(sub)
    serve.add_export_parser(sub)
    plan.add_models_parser(sub)
    data.add_parser(sub)
    sweep.add_parser(sub)
    return p


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings drown daytune's own output; --debug keeps them."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # GGUF conversion draws its own bar; daytune prints its own line
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module="(transformers|peft|accelerate|torch|bitsandbytes)"
    )
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
    try:
        return HANDLERS[args.command](args, reporter)
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
