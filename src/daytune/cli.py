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
  daytune plan --model llama-2-7b --method qlora --seq-len 2048 --gpu rtx4090-24gb --budget 24h
                                                       will it fit, how fast, how much data a day buys
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
    src.add_argument("--run", help="a run folder: its model, adapter and recipe")
    src.add_argument("--model", help="model reference: smollm2-135m, a HF folder, a .gguf file or a hub id")
    sp.add_argument("--adapter", help="a PEFT adapter folder (with --model)")
    sp.add_argument("--recipe", help="recipe YAML whose data/eval sections to use (default: the run's own)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    sp.add_argument("--out", help="results JSON path (default: <run>/eval.json or ./eval.json)")

    _serve_parser(sub)
    _submit_parser(sub)
    _plan_parser(sub)

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
    from daytune.track import RunDir

    if args.run:
        run = RunDir.open(args.run)
        cfg = load_run_config(args.recipe or run.path / "config.yaml", args.set)
        model_ref, trained = cfg.model, run.trained
        out = Path(args.out or run.path / "eval.json")
    else:
        cfg = load_run_config(args.recipe, args.set)
        model_ref, trained = args.model, Path(args.adapter) if args.adapter else None
        out = Path(args.out or "eval.json")
    if not (cfg.eval.heldout or cfg.eval.multiple_choice):
        raise DaytuneError(
            "nothing to evaluate: set eval.heldout and/or eval.multiple_choice (--recipe or --set)"
        )
    results = evaluate_pair(cfg, model_ref, trained, reporter)
    write_json_atomic(
        out, {"model": model_ref, "trained": str(trained) if trained else None, "results": results}
    )
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
    src.add_argument("--run", help="a run folder: serve its model with its adapter merged")
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
    from daytune.track import RunDir

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
        run = RunDir.open(args.run)
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
    sp.add_argument("--data", help="a training JSONL or dataset folder: epochs, padding and label positions")
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

    from daytune.budget import parse_duration
    from daytune.config import RunConfig, load_run_config
    from daytune.plan import dataset as plan_data
    from daytune.plan import setup_from_config
    from daytune.plan.devices import GPUS, get_device
    from daytune.plan.models import REGISTRY, resolve_arch
    from daytune.plan.search import make_plan, render

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
        raise DaytuneError("daytune plan: give --model NAME (see daytune plan --list) or --recipe RECIPE")
    arch = resolve_arch(model_ref)
    device = get_device(args.device)
    precision = cfg.train.precision
    if precision == "auto":
        fast_bf16 = device.peak.get("bf16", 0) >= device.peak.get("fp32", 0) / 1.5
        precision = "bf16-true" if device.kind == "cuda" or fast_bf16 else "32-true"
    if precision == "16-mixed" and device.kind == "cpu":
        raise DaytuneError("--precision 16-mixed needs a GPU; use 32-true or bf16-true on cpu")
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
            raise DaytuneError(
                f"--micro-batch: expected a positive integer or auto, got {raw_mb!r}"
            ) from None
        if mb < 1:
            raise DaytuneError(f"--micro-batch: must be at least 1, got {mb}")
    setup = setup_from_config(cfg, precision, device.kind, micro_batch=1 if auto else mb)
    budget = parse_duration(args.budget, "--budget") if args.budget else None
    data = None
    if args.data:
        tokenizer_dir = _local_tokenizer(model_ref)
        data = plan_data.measure(args.data, tokenizer_dir, cfg.data.template, cfg.data.max_seq_len)
    try:
        plan = make_plan(arch, setup, device, micro_batch_auto=auto, budget_seconds=budget, data=data)
    except ValueError as e:  # an unknown module name in lora targets
        raise DaytuneError(str(e)) from None
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
