"""The training loop, in one file: read it top to bottom.

    setup (model + method, data, optimizer) -> resume (optional) -> optimizer steps until max steps, epochs, the
    budget or early stopping end it, or a signal arrives -> final save (model or adapter) -> summary.

The loss of an optimizer step is the sum of response-token cross-entropy over all its micro-batches (on every
process) divided by the number of response tokens in them, so 4 micro-batches of 1 give the same update as 1
micro-batch of 4, and 2 processes the same as 1 process with twice the accumulation. The learning rate warms up
over `warmup_steps`, then follows a cosine down to `lr * min_lr_ratio` over the number of steps the run will make:
the step limit, or, with a budget, the steps predicted from measured step times to fit before the deadline,
re-estimated every step, so the floor is reached at the deadline however fast the machine turns out to be.
Everything runs unchanged under `accelerate launch` (DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import math
import random
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from daytune.budget import Budget, parse_duration
from daytune.config import RunConfig, parse_interval
from daytune.data import encode_records
from daytune.data.batching import BatchPlan, make_batch
from daytune.data.jsonl import read_records
from daytune.data.trainset import load_train_data
from daytune.engine.loss import response_loss
from daytune.errors import DataError, RunError
from daytune.models import load_tokenizer, resolve_model
from daytune.plan import write_run_plan
from daytune.plan.probe import resolve_micro_batch
from daytune.progress import Reporter, budget_info
from daytune.track import RunDir, Tracker, peak_rss_mb
from daytune.track.doctor import format_findings
from daytune.train import methods
from daytune.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_tensors,
    save_checkpoint,
    sharded_optimizer_dir,
    write_weights,
)
from daytune.train.memory import return_freed_memory
from daytune.train.precision import autocast_kind, param_dtype, pick_device, resolve_precision


@dataclass
class TrainResult:
    run_dir: str
    output_dir: str  # adapter/ (PEFT methods) or model/ (full, freeze)
    method: str
    steps: int
    max_steps: int
    stopped_by: str  # max_steps | budget | signal | early_stopping
    tokens: int  # non-padding tokens processed, all processes
    trained_tokens: int  # response tokens that carried loss
    tokens_per_s: float  # non-padding tokens per second of step time
    padding_waste: float  # fraction of processed positions that were padding
    train_seconds: float  # time inside optimizer steps
    elapsed_seconds: float  # whole train stage, including loading and saving
    budget_seconds: float | None
    final_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    precision: str
    device: str
    processes: int
    trainable_params: int
    total_params: int
    examples: int
    truncated: int
    peak_rss_mb: float
    micro_batch: int = 0
    grad_accum: int = 1
    micro_batch_probe: dict | None = None  # micro_batch auto: the tries and the choice


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


@torch.no_grad()
def validation_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    from daytune.data.batching import collate

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), batch_size):
        batch = {k: v.to(device) for k, v in collate(ordered[i : i + batch_size], pad_id).items()}
        loss, n = response_loss(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(1, count)


def train(
    cfg: RunConfig, run: RunDir, reporter: Reporter | None = None, resume: Path | None = None
) -> TrainResult:
    reporter = reporter or Reporter(quiet=True)
    tc = cfg.train
    budget = Budget(parse_duration(tc.budget, "train.budget"))
    return_freed_memory()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    # ---- setup -------------------------------------------------------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, broadcast, gather_object

    device = pick_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=autocast_kind(precision))
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if not is_main:
        reporter = Reporter(quiet=True, every=float("inf"))
    model_dir = resolve_model(cfg.model, log=reporter.log)
    tokenizer = load_tokenizer(model_dir)
    examples, val_examples, stats, data_info = load_examples(cfg, tokenizer)
    model = methods.load_base_for_training(model_dir, tc, param_dtype(precision), accelerator.device)
    model = methods.prepare_for_training(model, tc, model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    probed = resolve_micro_batch(cfg, model, examples, tokenizer, accelerator, resume, reporter.log)  # auto
    optimizer = methods.make_optimizer(params, tc, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    plan = BatchPlan(
        [len(e.input_ids) for e in examples],
        tc.micro_batch,
        tc.seed,
        cfg.data.max_seq_len,
        packing=cfg.data.packing,
        group_by_length=cfg.data.group_by_length,
    )
    if is_main:  # the planner's prediction for this run, to compare with what it measures
        write_run_plan(run, cfg, model_dir, accelerator.device, precision, examples, stats, reporter.log)
    targets = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]  # loss positions per example
    per_step = tc.grad_accum * world  # micro-batches per optimizer step, all processes
    max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * plan.per_epoch() / per_step))
    step, tokens_seen, trained_seen, padded_seen, train_seconds = 0, 0, 0, 0, 0.0
    total_steps = max_steps  # the LR schedule's horizon; with a budget, re-estimated every step
    best_val, best_step, val_loss, bad_evals = None, None, None, 0
    if resume is not None:
        state = load_checkpoint(resume, unwrapped, optimizer, rank)
        step, tokens_seen, trained_seen = state["step"], state["tokens"], state["trained_tokens"]
        padded_seen, train_seconds = state.get("padded", 0), state["train_seconds"]
        total_steps = state.get("total_steps", max_steps)
        best_val, best_step, bad_evals = (
            state.get("best_val"),
            state.get("best_step"),
            state.get("bad_evals", 0),
        )
        budget.spent_before = state["elapsed"]
        if is_main:
            run.truncate_metrics(step)
        reporter.print(f"Resumed from {resume} at step {step}/{max_steps}.")
    tracker = Tracker(run, cfg, enabled=is_main).start(
        unwrapped, accelerator.device, precision, world, data_info
    )
    reporter.log(
        f"Training {cfg.model} ({tc.method}, {n_trainable:,} of {n_total:,} parameters) on {len(examples)} examples "
        f"({stats.truncated} truncated to {cfg.data.max_seq_len} tokens{', packed' if cfg.data.packing else ''}): "
        f"{max_steps} steps, {precision} on {accelerator.device} x{world}, budget {tc.budget or 'none'}."
    )
    if is_main:  # the budget keeps room for the final save: measure a real one
        with tempfile.TemporaryDirectory(dir=run.path) as probe:
            _, seconds = save_checkpoint(unwrapped, optimizer, {"step": 0}, Path(probe), keep=1)
        budget.record_save(seconds)

    def state_now() -> dict:
        return {
            "step": step,
            "max_steps": max_steps,
            "total_steps": total_steps,
            "tokens": tokens_seen,
            "trained_tokens": trained_seen,
            "padded": padded_seen,
            "train_seconds": train_seconds,
            "elapsed": budget.elapsed(),
            "best_val": best_val,
            "best_step": best_step,
            "bad_evals": bad_evals,
            "micro_batch": tc.micro_batch,
            "grad_accum": tc.grad_accum,
        }

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    trainable_names = {n for n, p in unwrapped.named_parameters() if p.requires_grad}

    def full_weights() -> dict | None:
        """Unsharded weights on the main process (every process takes part); None when nothing is sharded."""
        return accelerator.get_state_dict(model) if sharded else None

    def checkpoint() -> None:
        rngs = gather_object([rng_tensors()]) if world > 1 else None
        full = full_weights()
        if sharded:  # each process writes its optimizer shard, then the main process assembles the checkpoint
            shards = sharded_optimizer_dir(run.checkpoints, step)
            shards.mkdir(parents=True, exist_ok=True)
            torch.save(optimizer.state_dict(), shards / f"optimizer-{rank}.pt")
            accelerator.wait_for_everyone()
        if is_main:
            weights = {k: v for k, v in full.items() if k in trainable_names} if full is not None else None
            saved_to, seconds = save_checkpoint(
                unwrapped, optimizer, state_now(), run.checkpoints, tc.keep_checkpoints, rngs, weights
            )
            budget.record_save(seconds)
            tracker.checkpoint(saved_to, step)
        accelerator.wait_for_everyone()

    def agree(*flags: bool) -> list[bool]:
        """Decisions taken on the main process (clock, signals), shared with all processes."""
        t = torch.tensor([float(f) for f in flags], device=accelerator.device)
        return [bool(x) for x in (broadcast(t, from_process=0) if world > 1 else t).tolist()]

    # ---- loop --------------------------------------------------------------------------------------------
    now = time.monotonic()
    checkpoint_due = _Interval(tc.checkpoint_every, "train.checkpoint_every", now)
    eval_due = _Interval(tc.eval_every if val_examples else None, "train.eval_every", now)
    eval_seconds, stopped_by, last_loss = 0.0, "max_steps", None
    model.train()
    if budget.seconds is not None and step < max_steps:  # before any step is measured: time one forward pass
        # The first step is guarded micro-batch by micro-batch (below), so the stop rule needs only one micro-batch's
        # forward and backward to fit; counting the whole accumulation would refuse a step that fits (the cold
        # first forward is already slower than the steady state).
        first_mb = plan.get(step * per_step + rank)
        batch = {
            k: v.to(accelerator.device)
            for k, v in make_batch(plan, examples, first_mb, tokenizer.pad_token_id).items()
            if k != "n_tokens"
        }
        t_probe = time.perf_counter()
        with torch.no_grad(), accelerator.autocast():
            response_loss(model, batch)
        budget.prior_step = 3 * (time.perf_counter() - t_probe)  # backward ~ 2x forward
    with _StopFlag() as stop, reporter.task("train", max_steps) as bar:
        bar.update(step, budget_info(budget.elapsed(), budget.seconds))
        while step < max_steps:
            signalled, out_of_time = agree(stop.requested, budget.should_stop())
            if signalled or out_of_time:
                stopped_by = "signal" if signalled else "budget"
                break
            t_step = time.perf_counter()
            first = step * per_step
            micro = [plan.get(first + j) for j in range(per_step)]  # every process's micro-batches, in order
            n_target = sum(targets[i] for mb in micro for row in mb for i in row)
            mine = micro[rank::world]
            loss_sum, data_seconds, abandoned = 0.0, 0.0, False
            for j, mb in enumerate(mine):
                t_data = time.perf_counter()  # building batches runs inline: the doctor reports its share
                batch = make_batch(plan, examples, mb, tokenizer.pad_token_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "n_tokens"}
                data_seconds += time.perf_counter() - t_data
                sync = accelerator.no_sync(model) if j < len(mine) - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss, _ = response_loss(model, batch)
                    accelerator.backward(loss * world / max(1, n_target))  # DDP averages over processes
                loss_sum += float(loss.detach())
                if (
                    budget.seconds is not None and j < len(mine) - 1
                ):  # a long step must not cross the deadline
                    per_micro = (time.perf_counter() - t_step) / (j + 1)
                    (abandoned,) = agree(
                        budget.remaining() < per_micro * (len(mine) - j - 1) + budget.save_reserve
                    )
                    if abandoned:
                        break
            if abandoned:  # the step would end past the deadline: drop it, keep the last complete state
                optimizer.zero_grad(set_to_none=True)
                stopped_by = "budget"
                break
            grad_norm = accelerator.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip else None
            left = budget.steps_left(eval_seconds)  # this step included
            if left is not None:
                total_steps = min(max_steps, step + left)
            lr = lr_at(step, total_steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_step
            budget.record_step(dt)
            n_tokens = sum(plan_tokens(plan, examples, mb) for mb in micro)
            padded = sum(plan_positions(plan, examples, mb) for mb in micro)
            tokens_seen, trained_seen, padded_seen = (
                tokens_seen + n_tokens,
                trained_seen + n_target,
                padded_seen + padded,
            )
            train_seconds += dt
            loss_world = (
                accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum")
                if world > 1
                else loss_sum
            )
            last_loss = float(loss_world) / max(1, n_target)

            record = {
                "step": step,
                "loss": round(last_loss, 6),
                "lr": lr,
                "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                "tokens": n_tokens,
                "tokens_per_s": round(n_tokens / dt, 2),
                "padding": round(1 - n_tokens / max(1, padded), 4),
                "step_seconds": round(dt, 4),
                "data_seconds": round(data_seconds, 4),
                "elapsed": round(budget.elapsed(), 3),
                "total_steps": total_steps,
                "budget_left": None if budget.seconds is None else round(budget.remaining(), 3),
            }
            now = time.monotonic()
            (do_eval,) = agree(eval_due.due(step, now) and budget.can_afford(eval_seconds))
            if do_eval:  # every process evaluates (sharded models need them all); all see the same loss
                t_eval = time.perf_counter()
                val_loss = validation_loss(
                    model, val_examples, tokenizer.pad_token_id, tc.micro_batch, accelerator.device
                )
                record["val_loss"] = round(val_loss, 6)
                if best_val is None or val_loss < best_val - 1e-6:
                    best_val, best_step, bad_evals = val_loss, step, 0
                    if tc.early_stopping_patience:
                        full = full_weights()
                        if is_main:
                            run.checkpoints.mkdir(parents=True, exist_ok=True)
                            best = {k: v for k, v in full.items() if k in trainable_names} if full else None
                            write_weights(unwrapped, run.checkpoints, ".best.safetensors.tmp", best)
                            (run.checkpoints / ".best.safetensors.tmp").replace(
                                run.checkpoints / "best.safetensors"
                            )
                else:
                    bad_evals += 1
                eval_seconds = time.perf_counter() - t_eval
            lengths = [len(examples[i].input_ids) for mb in micro for row in mb for i in row]
            tracker.log(record, lengths)  # adds samples/s, FLOPs, MFU; writes metrics.jsonl; feeds W&B/MLflow
            bar.update(
                step,
                f"loss {last_loss:.3f}  {n_tokens / dt:.0f} tok/s  "
                + budget_info(budget.elapsed(), budget.seconds),
                total=max_steps,
            )
            (patience_out,) = agree(
                bool(tc.early_stopping_patience) and bad_evals >= (tc.early_stopping_patience or 0)
            )
            if patience_out:
                stopped_by = "early_stopping"
                break
            (do_checkpoint,) = agree(checkpoint_due.due(step, now) and step < max_steps)
            if do_checkpoint:
                checkpoint()

        # ---- final save: always, whatever stopped the loop -------------------------------------------------
        if stopped_by == "early_stopping" and (run.checkpoints / "best.safetensors").is_file():
            from safetensors.torch import load_file

            methods.load_trainable_state(
                unwrapped, load_file(str(run.checkpoints / "best.safetensors")), "best"
            )
            reporter.print(
                f"Early stopping: restored the best model (step {best_step}, val loss {best_val:.4f})."
            )
        saved = list_checkpoints(run.checkpoints)
        if not saved or saved[-1].name != f"step-{step:07d}":
            checkpoint()
        out_dir = run.path / methods.output_name(tc.method)
        full = full_weights()
        if is_main:
            methods.save_final(unwrapped, tokenizer, tc.method, out_dir, full)
        accelerator.wait_for_everyone()

    result = TrainResult(
        run_dir=str(run.path),
        output_dir=str(out_dir),
        method=tc.method,
        steps=step,
        max_steps=max_steps,
        stopped_by=stopped_by,
        tokens=tokens_seen,
        trained_tokens=trained_seen,
        tokens_per_s=round(tokens_seen / train_seconds, 2) if train_seconds else 0.0,
        padding_waste=round(1 - tokens_seen / padded_seen, 4) if padded_seen else 0.0,
        train_seconds=round(train_seconds, 3),
        elapsed_seconds=round(budget.elapsed(), 3),
        budget_seconds=budget.seconds,
        final_loss=None if last_loss is None else round(last_loss, 6),
        val_loss=None if val_loss is None else round(val_loss, 6),
        best_val_loss=None if best_val is None else round(best_val, 6),
        best_step=best_step,
        precision=precision,
        device=str(accelerator.device),
        processes=world,
        trainable_params=n_trainable,
        total_params=n_total,
        examples=len(examples),
        truncated=stats.truncated,
        peak_rss_mb=round(peak_rss_mb(), 1),
        micro_batch=tc.micro_batch,
        grad_accum=tc.grad_accum,
        micro_batch_probe=probed.to_dict() if probed else None,
    )
    if is_main:
        run.update_summary(
            run_id=run.run_id,
            model=cfg.model,
            method=tc.method,
            data=data_info,
            train=asdict(result),
            finished=step >= max_steps or stopped_by == "early_stopping",
        )
    findings = tracker.finish(asdict(result), out_dir)
    reporter.log(
        f"Trained {step}/{max_steps} steps in {result.elapsed_seconds:.0f}s (stopped by {stopped_by}), "
        f"{result.tokens_per_s:.0f} tok/s, padding {result.padding_waste:.0%}, final loss {result.final_loss}."
    )
    if findings:
        reporter.print(format_findings(findings), markup=False)
    return result


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
