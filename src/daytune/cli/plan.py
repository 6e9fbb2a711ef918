"""`daytune plan` (memory, fit, speed and what a budget buys, before training) and `daytune models`."""

from __future__ import annotations

from daytune.errors import ConfigError


def add_plan_parser(sub) -> None:
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


def add_models_parser(sub) -> None:
    sub.add_parser("models", help="list the models daytune knows by name and the local model cache")


def _overrides(args) -> list[str]:
    """The planner's flags as recipe overrides (--set first)."""
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
    return overrides


def _micro_batch(args, cfg) -> tuple[bool, int]:
    """(auto, rows): --micro-batch, else the recipe's, else auto."""
    raw = (
        args.micro_batch
        if args.micro_batch is not None
        else ("auto" if not args.recipe else cfg.train.micro_batch)
    )
    if str(raw).strip().lower() == "auto":
        return True, 1
    try:
        mb = int(raw)
    except ValueError:
        raise ConfigError(f"--micro-batch: expected a positive integer or auto, got {raw!r}") from None
    if mb < 1:
        raise ConfigError(f"--micro-batch: must be at least 1, got {mb}")
    return False, mb


def _print_known(reporter) -> None:
    from daytune.hardware import GPUS
    from daytune.models import list_models

    for row in list_models():
        reporter.print(row.line(), markup=False)
    reporter.print("devices: " + ", ".join([*GPUS, "cpu (this machine, measured)"]))


def cmd_plan(args, reporter) -> int:
    import json

    from daytune.config import RunConfig, load_run_config
    from daytune.hardware import get_device, planned_precision
    from daytune.models.load import local_tokenizer_dir
    from daytune.plan import dataset as plan_data
    from daytune.plan import setup_from_config
    from daytune.plan.models import resolve_arch
    from daytune.plan.search import make_plan, render
    from daytune.units import parse_duration

    if args.list:
        _print_known(reporter)
        return 0
    overrides = _overrides(args)
    cfg = load_run_config(args.recipe, overrides) if args.recipe or overrides else RunConfig()
    model_ref = args.model or (cfg.model if args.recipe else None)
    if not model_ref:
        raise ConfigError("daytune plan: give --model NAME (see daytune plan --list) or --recipe RECIPE")
    arch = resolve_arch(model_ref)
    device = get_device(args.device)
    precision = planned_precision(cfg.train.precision, device)  # the rule training applies, on this device
    auto, mb = _micro_batch(args, cfg)
    setup = setup_from_config(cfg, precision, device.kind, micro_batch=mb)
    budget = parse_duration(args.budget, "--budget") if args.budget else None
    data = None
    data_path = args.data or (cfg.data.train if args.recipe else None)  # a recipe's own training data
    if data_path:
        data = plan_data.measure(
            data_path,
            local_tokenizer_dir(model_ref),
            cfg.data.template,
            cfg.data.max_seq_len,
            cfg.data.system_prompt,
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


def cmd_models(args, reporter) -> int:
    """The one registry of named models (also `daytune plan --list`), then the local cache."""
    from daytune.models import list_models
    from daytune.models.load import cached_models

    for row in list_models():
        reporter.print(row.line(), markup=False)
    cache, cached = cached_models()
    reporter.print(f"\ncache: {cache}" + ("".join(f"\n  {c}" for c in cached) if cached else " (empty)"))
    return 0
