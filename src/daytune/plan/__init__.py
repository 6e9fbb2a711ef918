"""The planner: memory and time of a fine-tuning run before it starts, from architecture numbers alone.

models.py      a model reference -> its architecture (the cited registry is daytune.models.registry)
devices.py     GPUs with their published peaks; this CPU, measured
memory.py      the memory breakdown and peak of a training step
throughput.py  FLOPs per token and an efficiency measured on real runs -> tokens/s
dataset.py     what one epoch of a dataset costs
search.py      the whole plan: fit, largest micro-batch, what the budget buys, the fastest setup
"""

from __future__ import annotations

from daytune.plan.memory import Setup


def setup_from_config(cfg, precision: str, device_type: str, micro_batch: int | None = None) -> Setup:
    """The planner's view of a recipe (daytune.config.RunConfig) with its precision resolved."""
    tc = cfg.train
    mb = (
        micro_batch if micro_batch is not None else (tc.micro_batch if isinstance(tc.micro_batch, int) else 1)
    )
    return Setup(
        method=tc.method,
        precision=precision,
        seq_len=cfg.data.max_seq_len,
        micro_batch=mb,
        gradient_checkpointing=tc.gradient_checkpointing,
        optimizer=tc.optimizer,
        lora_r=tc.lora.r,
        lora_targets=tc.lora.targets,
        lora_dropout=tc.lora.dropout,
        double_quant=tc.quant.double_quant,
        freeze_top_k=tc.freeze.top_k,
        freeze_train_head=tc.freeze.train_head,
        virtual_tokens=tc.prompt.num_virtual_tokens,
        encoder_hidden=tc.prompt.encoder_hidden_size,
        adapter_len=tc.adapter.adapter_len,
        adapter_layers=tc.adapter.adapter_layers,
        ia3_targets=tc.ia3.targets,
        ia3_feedforward=tuple(tc.ia3.feedforward),
        packing=cfg.data.packing,
        device_type=device_type,
    )


__all__ = ["Setup", "setup_from_config", "write_run_plan"]


def write_run_plan(
    run, cfg, model_dir, torch_device, precision: str, examples, stats, log=None
) -> dict | None:
    """Write the planner's prediction for a training run to its plan.json: its memory breakdown and peak,
    tokens/s and what the budget buys, for this run's model, data, micro-batch and device. Architectures the
    planner does not know are skipped (the run goes on); returns the plan, or None."""
    import json
    from pathlib import Path

    from daytune.errors import ModelError
    from daytune.fileio import write_json_atomic
    from daytune.hardware import detect
    from daytune.models.arch import arch_from_config
    from daytune.plan.dataset import from_examples
    from daytune.plan.search import make_plan
    from daytune.units import parse_duration

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        arch = arch_from_config(config, Path(str(cfg.model)).name)
        device = detect(torch_device)
        setup = setup_from_config(cfg, precision, device.kind)
        data = from_examples(cfg.data.train, str(model_dir), examples, stats.truncated)
        data.seed, data.group_by_length = cfg.train.seed, cfg.data.group_by_length  # the run's batch plan
        budget = parse_duration(cfg.train.budget, "train.budget")
        plan = make_plan(arch, setup, device, budget_seconds=budget, data=data, search_checkpointing=False)
        out = plan.to_dict()
        write_json_atomic(Path(run.path) / "plan.json", out)
    except (OSError, ValueError, ModelError) as e:  # a prediction is a bonus: never stop a run for it
        if log:
            log(f"No plan.json: {e}")
        return None
    return out
