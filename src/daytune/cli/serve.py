"""`daytune serve` (the competition API), `daytune submit` (a Dockerfile folder) and `daytune export` (a plain
transformers or PEFT folder)."""

from __future__ import annotations

from daytune.errors import DaytuneError

LIMITS = (  # (option, type, help); defaults from ServeOptions
    ("max_batch", int, "sequences decoded together; 1 = one at a time"),
    ("max_queue", int, "waiting sequences before answering 503"),
    ("max_prefill_tokens", int, "padded prompt tokens per prefill step"),
    ("max_new_tokens", int, "cap on max_new_tokens"),
    (
        "prefix_cache_mb",
        int,
        "MB of recent prompts' KV caches reused by prompts sharing their prefix; 0 = off",
    ),
    ("request_timeout", float, "seconds before a request gets HTTP 504"),
    ("shutdown_grace", float, "seconds in-flight requests get on SIGTERM; unfinished ones then get 503"),
)


def add_serve_parser(sub) -> None:
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
    sp.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda, cuda:N; weights load straight onto it, in bf16 on "
        "GPUs (fp16 before Ampere), fp32 on CPUs, unless --dtype says otherwise",
    )
    sp.add_argument(
        "--dtype",
        default="auto",
        help="weights and activations: auto (bf16 on GPUs that have it, fp16 before Ampere, fp32 on CPUs), "
        "float32, bfloat16 (on a CPU with AMX: 1.6-1.9x the requests/s of fp32 measured on 2 cores with --threads "
        "1, weights packed once for oneDNN; logprobs then differ from fp32's by 0.03 on average), float16",
    )
    sp.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    sp.add_argument(
        "--engine",
        default="daytune",
        choices=("daytune", "vllm"),
        help="daytune (default: its own batched engine) or vllm (when installed: vLLM runs the model behind the "
        "same API; a run or adapter is merged into a cached folder first)",
    )
    sp.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --engine vllm: an EngineArgs field for vLLM, e.g. enforce_eager=true, max_model_len=4096 "
        "(repeatable)",
    )
    sp.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer TOKEN' on every endpoint but /health (or set ${TOKEN_ENV})",
    )
    for name, kind, text in LIMITS:
        default = getattr(d, name)
        sp.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({default})")


def add_submit_parser(sub) -> None:
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


def add_export_parser(sub) -> None:
    sp = sub.add_parser(
        "export",
        help="write a run's model as a transformers (or PEFT) folder, or as a GGUF for llama.cpp and Ollama",
        description="Export a run's model (or --model REF [--adapter DIR]). --format hf (default): a PEFT "
        "adapter copy, or with --merge a full transformers folder. --format gguf: the adapter merged, converted "
        "and quantized by llama.cpp's own tools (make llama-venv), with an Ollama Modelfile and a README.",
    )
    sp.add_argument("run", nargs="?", help="a run folder or run id")
    sp.add_argument("--model", help="instead of a run: a model reference (name, HF folder, .gguf, hub id)")
    sp.add_argument("--adapter", help="a PEFT adapter folder on top of --model")
    sp.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    sp.add_argument("--format", default="hf", choices=("hf", "gguf"), help="hf (default) or gguf")
    sp.add_argument(
        "--quant", default="q8_0", help="GGUF weights: f16, q8_0 (default) or q4_k_m (llama.cpp's quantizer)"
    )
    sp.add_argument(
        "--merge", action="store_true", help="fold the adapter into the base: a full HF model folder"
    )
    sp.add_argument(
        "--dtype",
        default="auto",
        help="weights dtype of a merged HF model: auto (what the weights came in: the base's dtype, a QLoRA run's "
        "compute dtype), float32, bfloat16, float16 (GGUF: see --quant)",
    )


def _options(args):
    """The server's limits from the flags, each checked."""
    from daytune.serve.options import ServeOptions

    for name in ("max_batch", "max_queue", "max_prefill_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise DaytuneError(
                f"--{name.replace('_', '-')}: must be a positive number, got {getattr(args, name)}"
            )
    if args.prefix_cache_mb < 0:
        raise DaytuneError(f"--prefix-cache-mb: must be 0 (off) or more, got {args.prefix_cache_mb}")
    if not 1 <= args.port <= 65535:
        raise DaytuneError(f"--port: must be between 1 and 65535, got {args.port}")
    if args.request_timeout <= 0:
        raise DaytuneError(f"--request-timeout: must be positive, got {args.request_timeout}")
    if args.shutdown_grace < 0:
        raise DaytuneError(f"--shutdown-grace: must be 0 or more, got {args.shutdown_grace}")
    if args.threads is not None and args.threads < 1:
        raise DaytuneError(f"--threads: must be at least 1, got {args.threads}")
    return ServeOptions(
        host=args.host,
        port=args.port,
        token=args.token,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_new_tokens=args.max_new_tokens,
        prefix_cache_mb=args.prefix_cache_mb,
        request_timeout=args.request_timeout,
        shutdown_grace=args.shutdown_grace,
    )


def cmd_serve(args, reporter) -> int:
    import signal

    from daytune.serve.app import Server, create_app, listen
    from daytune.serve.model import ServeModel
    from daytune.track.runs import model_source

    options = _options(args)
    from daytune.serve.model import serve_dtype

    serve_dtype(args.dtype)  # a bad --dtype fails before the port is taken or the model loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    source = model_source(args.run, args.model, args.adapter, log=reporter.log)
    if args.vllm_option and args.engine != "vllm":
        raise DaytuneError("--vllm-option: goes with --engine vllm")
    sock = listen(options.host, options.port)  # before the model loads: a port in use fails at once
    run_id = source.run_id or args.run_id
    if args.engine == "vllm":
        from daytune.serve.vllm_engine import VllmServeModel, parse_vllm_options

        extra = parse_vllm_options(args.vllm_option)
        if args.device not in ("auto", None):
            raise DaytuneError("--device: vLLM picks its own device (its build's); leave --device out")
        if args.dtype != "auto":
            extra.setdefault("dtype", args.dtype)  # vLLM's own dtype option; --vllm-option dtype=... wins
        folder = _vllm_folder(source, reporter.log)
        server = VllmServeModel(folder, options, run_id=run_id, vllm_options=extra, log=reporter.log)
    else:
        server = ServeModel(
            source.model,
            source.trained,
            device=args.device,
            run_id=run_id,
            log=reporter.log,
            dtype=args.dtype,
        )
    auth = "bearer token required" if options.token else "no token"
    reporter.print(f"Serving {server.info()} on http://{args.host}:{args.port} ({auth})")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found: make that
    # a no-op, so a graceful stop ends with exit code 0 rather than a kill by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uv = Server(create_app(server, options), options, log_level="warning")
    uv.run(sockets=[sock])
    if not uv.started:
        raise DaytuneError(f"the server on {args.host}:{args.port} did not start (see the messages above)")
    reporter.print("Server stopped.")
    return 0


def _vllm_folder(source, log) -> str:
    """What vLLM loads: the model reference itself, a full fine-tuned run's model folder, or an adapter merged
    into its base, written once under $DAYTUNE_HOME/merged (keyed by the base and the adapter's files)."""
    import hashlib
    from pathlib import Path

    from daytune.fileio import sha256_file
    from daytune.models.load import daytune_home
    from daytune.train.export import export_run

    trained = source.trained
    if trained is None:
        return source.model
    if not (trained / "adapter_config.json").is_file():
        return str(trained)  # a full model folder
    key = hashlib.sha256(source.model.encode())
    for f in sorted(p for p in Path(trained).iterdir() if p.is_file()):
        key.update(f.name.encode() + sha256_file(f).encode())
    out = daytune_home() / "merged" / f"{Path(trained).parent.name}-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        log(f"vLLM serves the merged model cached in {out}")
        return str(out)
    log(f"Merging {trained} into its base for vLLM (once; cached in {out})...")
    if source.run_dir is not None:
        return str(export_run(source.run_dir, out, merge=True, log=log))
    return str(export_run(None, out, merge=True, log=log, model=source.model, adapter=trained))


def cmd_submit(args, reporter) -> int:
    from daytune.serve.submit import write_submission

    out = write_submission(args.run, args.out, base_model=args.base_model, log=reporter.log)
    reporter.print(
        f"Submission folder: {out}\n  docker build -t my-submission {out} && docker run -p 8080:80 my-submission"
    )
    return 0


def cmd_export(args, reporter) -> int:
    from daytune.train.export import export_run

    if (args.run is None) == (args.model is None):
        raise DaytuneError("export: give a run folder (or run id) or --model REF, not both and not neither")
    if args.adapter and args.model is None:
        raise DaytuneError("--adapter: goes with --model (a run brings its own adapter)")
    out = export_run(
        args.run,
        args.out,
        merge=args.merge,
        dtype=args.dtype,
        log=reporter.log,
        model=args.model,
        adapter=args.adapter,
        format=args.format,
        quant=args.quant,
    )
    if args.format == "gguf":
        name = out.stem.lower()
        reporter.print(
            f"Exported GGUF ({args.quant}, {out.stat().st_size / 2**20:.1f} MiB) to {out}\n"
            f"  ollama create {name} -f {out.parent / 'Modelfile'} && ollama run {name}\n"
            f"  llama-cli -m {out} -cnv"
        )
        return 0
    kind = "merged model" if args.merge or not (out / "adapter_config.json").is_file() else "PEFT adapter"
    reporter.print(f"Exported {kind} to {out}")
    return 0
