"""The training loop, in one file: read it top to bottom.

    setup (model + method, data, micro-batch, optimizer, batch plan) -> [the caller writes plan.json] -> fit:
    resume (optional) -> optimizer steps until max steps, epochs, the budget or early stopping end them, or a
    signal arrives -> final save (model or adapter) -> summary.

`setup` returns a `Session` (everything built, plus the `TrainState` that moves); `fit` reads top to bottom and
calls the small functions below it for each part of a step. The loss of an optimizer step is the sum of
response-token cross-entropy over all its micro-batches (on every process) divided by the number of response
tokens in them, so 4 micro-batches of 1 give the same update as 1 micro-batch of 4, and 2 processes the same as 1
process with twice the accumulation. The learning rate warms up over `warmup_steps`, then follows a cosine down to
`lr * min_lr_ratio` over the number of steps the run will make: the step limit, or, with a budget, the steps
predicted from measured step times to fit before the deadline, re-estimated every step, so the floor is reached at
the deadline however fast the machine turns out to be. Everything runs unchanged under `accelerate launch` (DDP,
FSDP, DeepSpeed): decisions taken on the main process (clock, signals) are shared with `agree`.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from daytune.budget import Budget
from daytune.config import RunConfig
from daytune.data import encode_records
from daytune.data.batching import BatchPlan, make_batch
from daytune.data.jsonl import read_records
from daytune.data.trainset import load_train_data
from daytune.engine.attention import use_varlen, varlen_available
from daytune.engine.loss import heldout_loss, response_loss
from daytune.errors import DataError, RunError
from daytune.hardware import (
    autocast_kind,
    compute_dtype,
    param_dtype,
    pick_device,
    resolve_precision,
    sync,
    use_device,
)
from daytune.models import load_tokenizer, resolve_model
from daytune.models.trained import QUANT_FILE, load_base_for_training, quantization_note
from daytune.progress import Reporter, budget_info
from daytune.track import RunDir, Tracker, peak_rss_mb
from daytune.track.doctor import format_findings
from daytune.train import methods
from daytune.train.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_best,
    load_checkpoint,
    rng_tensors,
    save_best,
    save_checkpoint,
    sharded_optimizer_dir,
)
from daytune.train.compile import compile_blocks, eager, graphs_compiled, wants_compile
from daytune.train.dropout import use_cpu_dropout
from daytune.train.kernels import apply_liger, fused_linear_ce, resolve_kernels
from daytune.train.memory import return_freed_memory
from daytune.train.probe import ProbeResult, resolve_micro_batch
from daytune.train.state import TrainResult, TrainState
from daytune.units import format_duration, parse_duration, parse_interval

COMPILE_WARMUP_STEPS = (
    3  # train.compile: at most this many steps that compiled are left out of the step times
)


@dataclass
class Session:
    """Everything `setup` builds and `fit` uses. During training only `state` (the counters a checkpoint
    saves), the budget, the model, the optimizer and the tracker change."""

    cfg: RunConfig
    run: RunDir
    reporter: Reporter  # quiet on every process but the main one
    resume: Path | None  # the checkpoint `fit` resumes from
    budget: Budget  # its clock started at the top of `setup`
    accelerator: Any
    world: int  # processes
    rank: int
    is_main: bool
    precision: str
    model_dir: Path
    tokenizer: Any
    examples: list
    val_examples: list
    stats: Any  # the encoding's counts (truncated examples)
    data_info: dict
    model: Any  # as accelerator.prepare wrapped it (DDP, FSDP, DeepSpeed)
    unwrapped: Any  # the model itself: what checkpoints and the final save read
    optimizer: Any
    params: list  # the parameters that train
    trainable_names: set[str]
    n_trainable: int
    n_total: int
    sharded: bool  # FSDP/DeepSpeed: weights are gathered by every process, optimizer states saved per process
    deepspeed: bool  # its engine steps, clips and keeps the optimizer state (saved through accelerate)
    varlen: bool  # packed rows attend by segments (CUDA, 16-bit) instead of through a mask
    probed: ProbeResult | None  # micro_batch auto: what was decided
    compiled: int  # decoder blocks compiled (train.compile), 0: eager
    kernels: str  # train.kernels as resolved: liger | none
    fused_ce: Any  # Liger's fused linear cross-entropy (train.kernels liger), None: the chunked PyTorch loss
    plan: BatchPlan
    targets: list[int]  # loss positions per example
    per_step: int  # micro-batches per optimizer step, all processes
    tracker: Tracker  # started by `fit`
    state: TrainState
    on_validation: Any = (
        None  # (step, val_loss) -> True to stop now ("pruned"): a sweep's pruner, main process
    )
    compile_steps: int = 0  # steps that compiled graphs, kept out of the budget's step times

    @property
    def device(self):
        return self.accelerator.device


def setup(
    cfg: RunConfig,
    run: RunDir,
    reporter: Reporter | None = None,
    resume: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Session:
    """Everything before the first step: device and precision, model + method, data, micro-batch (auto probes
    here, before the optimizer exists), optimizer, batch plan. The budget's clock starts now; every duration
    the budget decides on is read from `clock` (tests pass a fake one). Restoring `resume` is left to `fit`, so
    the random states it restores are the last word before the first step."""
    reporter = reporter or Reporter(quiet=True)
    tc = cfg.train
    budget = Budget(parse_duration(tc.budget, "train.budget"), clock=clock)
    return_freed_memory()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # cuda:N becomes the current device (one process; several take one each), TF32 on for fp32 matmuls
    device = use_device(pick_device(tc.device), int(os.environ.get("WORLD_SIZE", "1")))
    precision = resolve_precision(tc.precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=autocast_kind(precision))
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = device if world == 1 else accelerator.device
    ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    if not is_main:
        reporter = Reporter(quiet=True, every=float("inf"))
    model_dir = resolve_model(cfg.model, log=reporter.log)
    tokenizer = load_tokenizer(model_dir)
    examples, val_examples, stats, data_info = load_examples(cfg, tokenizer)
    model = load_base_for_training(model_dir, tc, param_dtype(precision), device)
    varlen = (cfg.data.packing and tc.method not in methods.PROMPT_METHODS
              and varlen_available(device, compute_dtype(precision)) and use_varlen(model))  # fmt: skip
    model = methods.prepare_for_training(model, tc, model_dir)
    compiling = wants_compile(tc.compile, device, budget.seconds)
    if device.type == "cpu" and not compiling and (n := use_cpu_dropout(model)):
        reporter.log(f"LoRA dropout on {n} layers: masks from NumPy's PCG64 (train/dropout.py).")
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    kernels, why = resolve_kernels(tc.kernels, device)
    if kernels == "liger" and not apply_liger(model, tc.kernels):
        kernels, why = "none", f"Liger has no kernels for this model family ({tc.kernels}); PyTorch's kernels"
    if "liger" in (kernels, tc.kernels):
        reporter.log(f"train.kernels {tc.kernels}: {why}.")
    fused_ce = fused_linear_ce() if kernels == "liger" else None
    probed = resolve_micro_batch(cfg, model, examples, tokenizer, accelerator, resume, reporter.log, varlen)
    compiled = compile_blocks(model) if compiling else 0
    optimizer = methods.make_optimizer(params, tc, device)
    # accelerate's accumulation: the last micro-batch of a step syncs gradients (DDP, FSDP) or is the boundary
    # where the DeepSpeed engine clips and steps; each micro-batch's loss is scaled back (see forward_backward)
    accelerator.gradient_accumulation_steps = tc.grad_accum
    if ds:
        configure_deepspeed(accelerator, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones

    plan = BatchPlan(
        [len(e.input_ids) for e in examples],
        tc.micro_batch,
        tc.seed,
        cfg.data.max_seq_len,
        packing=cfg.data.packing,
        group_by_length=cfg.data.group_by_length,
    )
    per_step = tc.grad_accum * world
    max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * plan.per_epoch() / per_step))
    return Session(
        cfg=cfg,
        run=run,
        reporter=reporter,
        resume=resume,
        budget=budget,
        accelerator=accelerator,
        world=world,
        rank=rank,
        is_main=is_main,
        precision=precision,
        model_dir=model_dir,
        tokenizer=tokenizer,
        examples=examples,
        val_examples=val_examples,
        stats=stats,
        data_info=data_info,
        model=model,
        unwrapped=unwrapped,
        optimizer=optimizer,
        params=params,
        trainable_names={n for n, p in unwrapped.named_parameters() if p.requires_grad},
        n_trainable=n_trainable,
        n_total=n_total,
        sharded=accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED),
        deepspeed=ds,
        varlen=varlen,
        probed=probed,
        compiled=compiled,
        kernels=kernels,
        fused_ce=fused_ce,
        plan=plan,
        targets=[sum(1 for x in e.labels[1:] if x != -100) for e in examples],
        per_step=per_step,
        tracker=Tracker(run, cfg, enabled=is_main),
        state=TrainState(
            max_steps=max_steps, total_steps=max_steps, micro_batch=tc.micro_batch, grad_accum=tc.grad_accum
        ),
    )


def fit(s: Session) -> TrainResult:
    """Resume (given a checkpoint), train until something ends the run, always save, write the summary. A run
    that fails stops its tracker (the system sampler, the backends' runs marked failed) before the error goes on."""
    try:
        return _fit(s)
    except BaseException:
        s.tracker.abandon()
        raise


def _fit(s: Session) -> TrainResult:
    tc, budget = s.cfg.train, s.budget
    if s.resume is not None:
        restore(s)
    start(s)
    st = s.state
    now = time.monotonic()
    checkpoint_due = _Interval(tc.checkpoint_every, "train.checkpoint_every", now)
    eval_due = _Interval(tc.eval_every if s.val_examples else None, "train.eval_every", now)
    eval_seconds, stopped_by, last_loss, val_loss = 0.0, "max_steps", None, None
    s.model.train()
    if budget.seconds is not None and st.step < st.max_steps:  # before any step is measured
        budget.prior_step = first_step_estimate(s)
        (no_time,) = agree(s, st.step == 0 and budget.should_stop())
        if (
            no_time
        ):  # the setup alone used the budget: no step can be trained, say so rather than save nothing
            raise RunError(budget_too_short(s))
    with _StopFlag() as stop, s.reporter.task("train", st.max_steps) as bar:
        bar.update(st.step, budget_info(budget.elapsed(), budget.seconds))
        while st.step < st.max_steps:
            signalled, out_of_time = agree(s, stop.requested, budget.should_stop())
            if signalled or out_of_time:
                stopped_by = "signal" if signalled else "budget"
                break
            t_step = budget.clock()
            graphs_before = graphs_compiled()
            first = st.step * s.per_step
            # every process's micro-batches, in order; this process takes every world-th one
            micro = [s.plan.get(first + j) for j in range(s.per_step)]
            n_target = sum(s.targets[i] for mb in micro for row in mb for i in row)
            if (
                s.deepspeed
            ):  # its engine steps inside the last backward: the learning rate must be set by then
                set_lr(s, lr_at(st.step, st.total_steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio))
            done = forward_backward(s, micro[s.rank :: s.world], n_target, t_step)
            if done is None:  # the step would end past the deadline: drop it, keep the last complete state
                s.optimizer.zero_grad(set_to_none=True)
                stopped_by = "budget"
                break
            loss_sum, data_seconds = done
            grad_norm = s.accelerator.clip_grad_norm_(s.params, tc.grad_clip) if tc.grad_clip else None
            grad_norm = None if grad_norm is None else scalar(grad_norm)
            left = budget.steps_left(eval_seconds)  # this step included
            if left is not None:
                st.total_steps = min(st.max_steps, st.step + left)
            lr = lr_at(st.step, st.total_steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
            if not s.deepspeed:
                set_lr(s, lr)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            sync(s.device)  # CUDA is asynchronous: the step has ended when its kernels have
            dt = budget.clock() - t_step
            compiling = bool(s.compiled) and graphs_compiled() > graphs_before
            if compiling and s.compile_steps < COMPILE_WARMUP_STEPS:
                s.compile_steps += 1  # its time is compilation: as a step time it would stop the run early
            else:
                budget.record_step(dt)
            n_tokens = sum(plan_tokens(s.plan, s.examples, mb) for mb in micro)
            padded = sum(plan_positions(s.plan, s.examples, mb) for mb in micro)
            st.tokens += n_tokens
            st.trained_tokens += n_target
            st.padded += padded
            st.train_seconds += dt
            last_loss = world_sum(s, loss_sum) / max(1, n_target)

            record = {
                "step": st.step,
                "loss": round(last_loss, 6),
                "lr": lr,
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / dt, 2),
                "padding": round(1 - n_tokens / max(1, padded), 4),
                "step_seconds": round(dt, 4),
                "data_seconds": round(data_seconds, 4),
                "elapsed": round(budget.elapsed(), 3),
                "total_steps": st.total_steps,
                "budget_left": None if budget.seconds is None else round(budget.remaining(), 3),
            }
            if compiling:
                record["compiling"] = True
            now = time.monotonic()
            (do_eval,) = agree(s, eval_due.due(st.step, now) and budget.can_afford(eval_seconds))
            if do_eval:  # every process evaluates (sharded models need them all); all see the same loss
                t_eval = budget.clock()
                val_loss = evaluate(s)
                record["val_loss"] = round(val_loss, 6)
                eval_seconds = budget.clock() - t_eval
            lengths = [len(s.examples[i].input_ids) for mb in micro for row in mb for i in row]
            # the tracker adds samples/s, FLOPs, MFU; writes metrics.jsonl; feeds W&B/MLflow
            s.tracker.log(record, lengths)
            bar.update(
                st.step,
                f"loss {last_loss:.3f}  {n_tokens / dt:.0f} tok/s  "
                + budget_info(budget.elapsed(), budget.seconds),
                total=st.max_steps,
            )
            patience = tc.early_stopping_patience
            (patience_out,) = agree(s, bool(patience) and st.bad_evals >= (patience or 0))
            if patience_out:
                stopped_by = "early_stopping"
                break
            hook = do_eval and s.on_validation is not None and s.is_main
            (pruned,) = agree(s, hook and bool(s.on_validation(st.step, val_loss)))
            if pruned:
                stopped_by = "pruned"
                break
            (do_checkpoint,) = agree(s, checkpoint_due.due(st.step, now) and st.step < st.max_steps)
            if do_checkpoint:
                checkpoint(s)
        out_dir = final_save(s, stopped_by)  # always, whatever stopped the loop
    result = result_of(s, out_dir, stopped_by, last_loss, val_loss)
    summarize(s, result, out_dir)
    return result


# ---- the parts of fit, in the order it calls them -----------------------------------------------------------
def restore(s: Session) -> None:
    """Carry on from the checkpoint `s.resume`: weights, optimizer, random states, counters, the budget spent."""
    engine_state = s.accelerator.load_state if s.deepspeed else None
    saved = load_checkpoint(s.resume, s.unwrapped, s.optimizer, s.rank, engine_state)
    s.state = s.state.resumed(saved)
    s.budget.spent_before = s.state.elapsed
    if s.is_main:
        s.run.truncate_metrics(s.state.step)
    s.reporter.print(f"Resumed from {s.resume} at step {s.state.step}/{s.state.max_steps}.")


def start(s: Session) -> None:
    """Start tracking, say what will train, and time a real save: the budget keeps room for the final one."""
    tc, cfg = s.cfg.train, s.cfg
    s.tracker.start(s.unwrapped, s.device, s.precision, s.world, s.data_info)
    s.reporter.log(
        f"Training {cfg.model} ({tc.method}, {s.n_trainable:,} of {s.n_total:,} parameters) on "
        f"{len(s.examples)} examples ({s.stats.truncated} truncated to {cfg.data.max_seq_len} tokens"
        f"{', packed' if cfg.data.packing else ''}): {s.state.max_steps} steps, {s.precision} on {s.device} "
        f"x{s.world}, budget {tc.budget or 'none'}"
        + (f", {s.compiled} blocks compiled (the first steps compile)." if s.compiled else ".")
    )
    probe = s.run.path / ".save-probe"  # a whole save, by every process (sharded weights are gathered)
    checkpoint(s, probe)
    if s.is_main:
        shutil.rmtree(probe, ignore_errors=True)


def first_step_estimate(s: Session) -> float:
    """Seconds one micro-batch's forward and backward take, from one timed forward pass. The first step is
    guarded micro-batch by micro-batch (forward_backward), so the stop rule needs only this to fit; counting the
    whole accumulation would refuse a step that fits (the cold first forward is already slower than the steady
    state). The pass runs in eval mode under a forked RNG: it draws no dropout masks, so a resumed run trains
    on the random numbers the uninterrupted one did."""
    first_mb = s.plan.get(s.state.step * s.per_step + s.rank)
    batch = {
        k: v.to(s.device)
        for k, v in make_batch(s.plan, s.examples, first_mb, s.tokenizer.pad_token_id, s.varlen).items()
        if k != "n_tokens"
    }
    devices = [s.device] if s.device.type == "cuda" else []
    sync(s.device)
    t_probe = s.budget.clock()
    s.model.eval()
    try:
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            s.accelerator.autocast(),
            eager(bool(s.compiled)),
        ):  # eager: compiling an inference graph here would cost more than the pass it times
            response_loss(s.model, batch, s.fused_ce)
    finally:
        s.model.train()
    sync(s.device)
    return 3 * (s.budget.clock() - t_probe)  # backward ~ 2x forward


def budget_too_short(s: Session) -> str:
    """The error for a budget the setup used up: what the setup took and what one step and the save need."""
    b, tc = s.budget, s.cfg.train
    need = b.next_step_estimate() + b.save_reserve
    return (
        f"train.budget: {tc.budget} is too short: the setup (loading {s.cfg.model}, tokenizing "
        f"{len(s.examples)} examples, a timed save) took {b.elapsed():.1f}s, and one step plus the final save "
        f"need about {need:.1f}s more; give at least {format_duration(math.ceil(1.5 * (b.elapsed() + need)))}"
    )


def agree(s: Session, *flags: bool) -> list[bool]:
    """Decisions taken on the main process (clock, signals), shared with all processes."""
    from accelerate.utils import broadcast

    t = torch.tensor([float(f) for f in flags], device=s.device)
    return [bool(x) for x in (broadcast(t, from_process=0) if s.world > 1 else t).tolist()]


def forward_backward(s: Session, mine: list, n_target: int, t_step: float) -> tuple[float, float] | None:
    """This process's micro-batches of one step, gradients accumulated through accelerate's `accumulate`: only
    the last one synchronises gradients (DDP, FSDP) and is DeepSpeed's boundary, where its engine clips and
    steps once. Returns (their summed loss, seconds spent building batches), or None when finishing the step
    would cross the deadline: a long step must not overrun the budget."""
    acc, budget = s.accelerator, s.budget
    loss_sum, data_seconds = 0.0, 0.0
    acc.step = 0  # accumulate() counts micro-batches from here: the last of the step is the boundary
    # accelerate (and DeepSpeed) divide each backward by the accumulation, DDP averages over processes: the
    # step's loss is the sum over all its micro-batches divided by its label count
    scale = s.world * acc.gradient_accumulation_steps / max(1, n_target)
    for j, mb in enumerate(mine):
        t_data = time.perf_counter()  # building batches runs inline: the doctor reports its share
        batch = make_batch(s.plan, s.examples, mb, s.tokenizer.pad_token_id, s.varlen)
        batch = {k: v.to(s.device) for k, v in batch.items() if k != "n_tokens"}
        data_seconds += time.perf_counter() - t_data
        with acc.accumulate(s.model), acc.autocast():
            loss, _ = response_loss(s.model, batch, s.fused_ce)
            acc.backward(loss * scale)
        loss_sum += float(loss.detach())
        if budget.seconds is not None and j < len(mine) - 1:
            per_micro = (budget.clock() - t_step) / (j + 1)
            (abandoned,) = agree(
                s, budget.remaining() < per_micro * (len(mine) - j - 1) + budget.save_reserve
            )
            if abandoned:
                return None
    return loss_sum, data_seconds


def set_lr(s: Session, lr: float) -> None:
    for group in s.optimizer.param_groups:
        group["lr"] = lr


def scalar(t) -> float:
    """A 0-d tensor (also a replicated DTensor: FSDP2's gradient norm) as a number."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def gpu_peaks(device: torch.device) -> dict:
    """Peak CUDA memory of the run (what the planner predicts; host RSS says nothing about it), in MiB."""
    if device.type != "cuda":
        return {}
    return {
        "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
    }


def configure_deepspeed(accelerator, tc) -> None:
    """The DeepSpeed config from the recipe: micro-batch, accumulation (the engine's boundary is the last
    micro-batch of a step) and clipping (the engine clips when it steps)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = tc.micro_batch
    config["gradient_accumulation_steps"] = tc.grad_accum
    config["gradient_clipping"] = float(tc.grad_clip or 0.0)
    config["train_batch_size"] = tc.micro_batch * tc.grad_accum * accelerator.num_processes


def world_sum(s: Session, value: float) -> float:
    """A number summed over all processes."""
    return float(s.accelerator.reduce(torch.tensor(value, device=s.device), "sum") if s.world > 1 else value)


def evaluate(s: Session) -> float:
    """Validation loss (every process takes part); a new best resets the patience and, with early stopping, is
    kept as the model to end with."""
    st, tc = s.state, s.cfg.train
    # the precision training computes in; eager: no inference graphs to compile for a short pass
    with s.accelerator.autocast(), eager(bool(s.compiled)):
        val_loss = heldout_loss(s.model, s.val_examples, s.tokenizer.pad_token_id, tc.micro_batch, s.device)
    if st.best_val is None or val_loss < st.best_val - 1e-6:
        st.best_val, st.best_step, st.bad_evals = val_loss, st.step, 0
        if tc.early_stopping_patience:
            full = full_weights(s)
            if s.is_main:
                save_best(s.unwrapped, s.run.checkpoints, trainable_only(s, full))
    else:
        st.bad_evals += 1
    return val_loss


def full_weights(s: Session) -> dict | None:
    """Unsharded weights on the main process (every process takes part); None when nothing is sharded."""
    return s.accelerator.get_state_dict(s.model) if s.sharded else None


def trainable_only(s: Session, full: dict | None) -> dict | None:
    return {k: v for k, v in full.items() if k in s.trainable_names} if full is not None else None


def checkpoint(s: Session, folder: Path | None = None) -> None:
    """A resumable checkpoint of this step (every process takes part) in the run's checkpoints, or in `folder`
    (the save probe `start` times: the same work, not kept)."""
    from accelerate.utils import gather_object

    probe = folder is not None
    folder = folder or s.run.checkpoints
    rngs = gather_object([rng_tensors()]) if s.world > 1 else None
    full = full_weights(s)
    if s.sharded:  # each process writes its optimizer shard, then the main process assembles the checkpoint
        shards = sharded_optimizer_dir(folder, s.state.step)
        if s.is_main:
            shards.mkdir(parents=True, exist_ok=True)
        s.accelerator.wait_for_everyone()
        if s.deepspeed:  # the engine's own checkpoint (optimizer partitions, fp32 masters), collectively
            s.accelerator.save_state(str(shards / "deepspeed"), exclude_frozen_parameters=True)
        else:
            torch.save(s.optimizer.state_dict(), shards / f"optimizer-{s.rank}.pt")
        s.accelerator.wait_for_everyone()
    if s.is_main:
        weights, keep = trainable_only(s, full), 1 if probe else s.cfg.train.keep_checkpoints
        if not probe:
            s.state.elapsed = s.budget.elapsed()
        t_save = s.budget.clock()
        saved_to, _ = save_checkpoint(
            s.unwrapped, s.optimizer, s.state.to_json(), folder, keep, rngs, weights
        )
        s.budget.record_save(s.budget.clock() - t_save)
        if not probe:
            s.tracker.checkpoint(saved_to, s.state.step)
    s.accelerator.wait_for_everyone()


def final_save(s: Session, stopped_by: str) -> Path:
    """The last checkpoint (unless this step has one) and the model or adapter; early stopping ends with the
    best weights. Returns the output folder."""
    st, method = s.state, s.cfg.train.method
    if stopped_by == "early_stopping" and load_best(s.unwrapped, s.run.checkpoints):
        s.reporter.print(
            f"Early stopping: restored the best model (step {st.best_step}, val loss {st.best_val:.4f})."
        )
    saved = list_checkpoints(s.run.checkpoints)
    if not saved or saved[-1].name != checkpoint_name(st.step):
        checkpoint(s)
    out_dir = s.run.path / methods.output_name(method)
    full = full_weights(s)
    notes = (
        {QUANT_FILE: quantization_note(s.cfg.train, param_dtype(s.precision))} if method == "qlora" else None
    )
    if s.is_main:
        methods.save_final(s.unwrapped, s.tokenizer, method, out_dir, full, notes)
    s.accelerator.wait_for_everyone()
    return out_dir


def result_of(
    s: Session, out_dir: Path, stopped_by: str, last_loss: float | None, val_loss: float | None
) -> TrainResult:
    """The run's TrainResult: its final state, rounded, with the facts of the run."""
    st = s.state
    return TrainResult(
        run_dir=str(s.run.path),
        output_dir=str(out_dir),
        method=s.cfg.train.method,
        steps=st.step,
        max_steps=st.max_steps,
        stopped_by=stopped_by,
        tokens=st.tokens,
        trained_tokens=st.trained_tokens,
        tokens_per_s=round(st.tokens / st.train_seconds, 2) if st.train_seconds else 0.0,
        padding_waste=round(1 - st.tokens / st.padded, 4) if st.padded else 0.0,
        train_seconds=round(st.train_seconds, 3),
        elapsed_seconds=round(s.budget.elapsed(), 3),
        budget_seconds=s.budget.seconds,
        final_loss=None if last_loss is None else round(last_loss, 6),
        val_loss=None if val_loss is None else round(val_loss, 6),
        best_val_loss=None if st.best_val is None else round(st.best_val, 6),
        best_step=st.best_step,
        precision=s.precision,
        device=str(s.device),
        processes=s.world,
        trainable_params=s.n_trainable,
        total_params=s.n_total,
        examples=len(s.examples),
        truncated=s.stats.truncated,
        peak_rss_mb=round(peak_rss_mb(), 1),
        **gpu_peaks(s.device),
        attention="varlen" if s.varlen else "sdpa",
        kernels=s.kernels,
        micro_batch=st.micro_batch,
        grad_accum=st.grad_accum,
        micro_batch_probe=s.probed.to_dict() if s.probed else None,
    )


def summarize(s: Session, result: TrainResult, out_dir: Path) -> None:
    """summary.json's `train` section, the tracker's finish (backends, doctor) and the closing lines."""
    cfg = s.cfg
    if s.is_main:
        s.run.update_summary(
            run_id=s.run.run_id,
            model=cfg.model,
            method=cfg.train.method,
            data=s.data_info,
            train=asdict(result),
            finished=result.steps >= result.max_steps or result.stopped_by == "early_stopping",
        )
    findings = s.tracker.finish(asdict(result), out_dir)
    s.reporter.log(
        f"Trained {result.steps}/{result.max_steps} steps in {result.elapsed_seconds:.0f}s (stopped by "
        f"{result.stopped_by}), {result.tokens_per_s:.0f} tok/s, padding {result.padding_waste:.0%}, final loss "
        f"{result.final_loss}."
    )
    if findings:
        s.reporter.print(format_findings(findings), markup=False)
    if result.steps == 0:
        s.reporter.print(untrained_warning(result), style="bold red", markup=False)


def untrained_warning(result: TrainResult) -> str:
    why = (
        "the budget left no time for one"
        if result.stopped_by == "budget"
        else f"stopped by {result.stopped_by}"
    )
    return (
        f"warning: no optimizer step was trained ({why}): {result.output_dir} holds the untrained starting "
        "point, not a tuned model"
    )


# ---- the schedule, signals, intervals, data ------------------------------------------------------------------
def lr_at(step: int, total_steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """LR for the optimizer step with index `step` (0-based): linear warmup, then a cosine from `lr` that reaches
    `lr * min_ratio` on the last step of `total_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup))
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step and save; a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Interval:
    """'every 50 steps' or 'every 10 minutes'."""

    def __init__(self, spec, field: str, now: float):
        self.kind, self.every = parse_interval(spec, field) if spec is not None else ("never", 0.0)
        self.last = now

    def due(self, step: int, now: float) -> bool:
        if self.kind == "steps":
            return step % int(self.every) == 0
        if self.kind == "seconds" and now - self.last >= self.every:
            self.last = now
            return True
        return False


def load_examples(cfg: RunConfig, tokenizer):
    """Training and validation examples; `val_fraction` splits validation off the training rows by seed."""
    dc = cfg.data
    records, data_info = load_train_data(dc)  # a JSONL or a prepared folder; checks the dataset fingerprint
    val_path = dc.val or (data_info.get("val") if dc.val_fraction == 0 else None)  # a prepared folder's split
    val_records = read_records(val_path, dc.val_rows) if val_path else []
    if not val_path and dc.val_fraction > 0:
        order = list(range(len(records)))
        random.Random(cfg.train.seed).shuffle(order)
        n_val = max(1, int(len(records) * dc.val_fraction))
        val_records = [records[i] for i in order[:n_val]][: dc.val_rows]
        records = [records[i] for i in sorted(order[n_val:])]
    train, stats = encode_records(records, tokenizer, dc.template, dc.max_seq_len, dc.system_prompt)
    val, _ = encode_records(val_records, tokenizer, dc.template, dc.max_seq_len, dc.system_prompt)
    if not train:
        raise DataError(f"{dc.train}: every example lost its response to truncation; raise data.max_seq_len")
    return train, val, stats, data_info


def plan_tokens(plan: BatchPlan, examples, mb) -> int:
    return sum(len(examples[i].input_ids) for row in mb for i in row)


def plan_positions(plan: BatchPlan, examples, mb) -> int:
    """Positions the micro-batch computes: rows x the longest row."""
    return len(mb) * max(sum(len(examples[i].input_ids) for i in row) for row in mb)


def find_resume_checkpoint(run: RunDir) -> Path:
    found = list_checkpoints(run.checkpoints)
    if not found:
        raise RunError(f"{run.path}: no complete checkpoint to resume from")
    return found[-1]
