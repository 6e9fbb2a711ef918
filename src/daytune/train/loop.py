"""The training loop, in one file: read it top to bottom.

    setup (model + LoRA, data, optimizer) -> resume (optional) -> optimizer steps until max steps, epochs or the
    budget run out, or a signal arrives -> final save (adapter + checkpoint) -> summary.

Loss is the sum of response-token cross-entropy over the whole optimizer step divided by the number of response
tokens in it, so 4 micro-batches of 1 give the same update as 1 micro-batch of 4. The learning rate warms up over
`warmup_steps`, then follows a cosine down to `lr * min_lr_ratio`, driven by whichever is further along: steps
done out of the step limit, or training time used out of the budget. With a budget, the LR reaches its floor at
the deadline, however fast the machine turns out to be.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from daytune.budget import Budget, parse_duration
from daytune.config import RunConfig
from daytune.data import encode_records
from daytune.data.batching import collate, micro_batch_indices, micro_batches_per_epoch
from daytune.data.trainset import load_train_data
from daytune.engine import response_loss
from daytune.errors import DataError, RunError
from daytune.fileio import replace_dir_atomic
from daytune.models import load_model, load_tokenizer, resolve_model
from daytune.progress import Reporter, budget_info
from daytune.track import RunDir, peak_rss_mb
from daytune.train.checkpoint import list_checkpoints, load_checkpoint, save_adapter, save_checkpoint
from daytune.train.lora import add_lora
from daytune.train.precision import autocast_kind, param_dtype, pick_device, resolve_precision


@dataclass
class TrainResult:
    run_dir: str
    adapter_dir: str
    steps: int
    max_steps: int
    stopped_by: str  # max_steps | budget | signal
    tokens: int  # non-padding tokens processed
    trained_tokens: int  # response tokens that carried loss
    tokens_per_s: float
    train_seconds: float  # time inside optimizer steps
    elapsed_seconds: float  # whole train stage, including loading and saving
    budget_seconds: float | None
    final_loss: float | None
    precision: str
    device: str
    examples: int
    truncated: int
    peak_rss_mb: float


def lr_at(step: int, max_steps: int, time_fraction: float, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    progress = min(1.0, max(progress, time_fraction))
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


def train(
    cfg: RunConfig, run: RunDir, reporter: Reporter | None = None, resume: Path | None = None
) -> TrainResult:
    reporter = reporter or Reporter(quiet=True)
    tc = cfg.train
    budget = Budget(parse_duration(tc.budget, "train.budget"))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    # ---- setup -------------------------------------------------------------------------------------------
    from accelerate import Accelerator

    device = pick_device(tc.device)
    precision = resolve_precision(tc.precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=autocast_kind(precision))
    model_dir = resolve_model(cfg.model, log=reporter.log)
    tokenizer = load_tokenizer(model_dir)
    records, data_info = load_train_data(cfg.data)  # also checks the dataset fingerprint
    examples, stats = encode_records(
        records, tokenizer, cfg.data.template, cfg.data.max_seq_len, cfg.data.system_prompt
    )
    if not examples:
        raise DataError(
            f"{cfg.data.train}: every example lost its response to truncation; raise data.max_seq_len"
        )
    model = load_model(model_dir, dtype=param_dtype(precision))
    model.config.use_cache = False
    model = add_lora(model, tc.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    n_micro = micro_batches_per_epoch(len(examples), tc.micro_batch)
    max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * n_micro / tc.grad_accum))
    step, tokens_seen, trained_seen, train_seconds = 0, 0, 0, 0.0
    if resume is not None:
        state = load_checkpoint(resume, unwrapped, optimizer)
        step, tokens_seen = state["step"], state["tokens"]
        trained_seen, train_seconds = state["trained_tokens"], state["train_seconds"]
        budget.spent_before = state["elapsed"]
        run.truncate_metrics(step)
        reporter.print(f"Resumed from {resume} at step {step}/{max_steps}.")
    reporter.log(
        f"Training {cfg.model} with LoRA r={tc.lora.r} on {len(examples)} examples ({stats.truncated} truncated "
        f"to {cfg.data.max_seq_len} tokens): {max_steps} steps, {precision} on {device}, "
        f"budget {tc.budget or 'none'}."
    )
    with tempfile.TemporaryDirectory() as tmp:  # measure a real save: the budget keeps room for the final one
        t0 = time.perf_counter()
        save_adapter(unwrapped, Path(tmp))
        budget.record_save(time.perf_counter() - t0)

    def state_now() -> dict:
        return {
            "step": step,
            "max_steps": max_steps,
            "tokens": tokens_seen,
            "trained_tokens": trained_seen,
            "train_seconds": train_seconds,
            "elapsed": budget.elapsed(),
        }

    # ---- loop --------------------------------------------------------------------------------------------
    stopped_by, last_loss = "max_steps", None
    model.train()
    with _StopFlag() as stop, reporter.task("train", max_steps) as bar:
        bar.update(step, budget_info(budget.elapsed(), budget.seconds))
        while step < max_steps:
            if stop.requested:
                stopped_by = "signal"
                break
            if budget.should_stop():
                stopped_by = "budget"
                break
            t0 = time.perf_counter()
            batches = [
                collate(
                    [
                        examples[i]
                        for i in micro_batch_indices(
                            len(examples), tc.micro_batch, tc.seed, step * tc.grad_accum + j
                        )
                    ],
                    tokenizer.pad_token_id,
                )
                for j in range(tc.grad_accum)
            ]
            n_target = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            loss_sum = 0.0
            for b in batches:
                b = {k: v.to(accelerator.device) for k, v in b.items()}
                with accelerator.autocast():
                    loss, _ = response_loss(model, b)
                accelerator.backward(loss / max(1, n_target))
                loss_sum += float(loss.detach())
            grad_norm = accelerator.clip_grad_norm_(params, tc.grad_clip) if tc.grad_clip else None
            time_fraction = 0.0
            if budget.seconds is not None:
                time_fraction = budget.elapsed() / max(1e-9, budget.seconds - budget.save_reserve)
            lr = lr_at(step, max_steps, time_fraction, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            budget.record_step(dt)
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            tokens_seen += n_tokens
            trained_seen += n_target
            train_seconds += dt
            last_loss = loss_sum / max(1, n_target)
            run.log(
                {
                    "step": step,
                    "loss": round(last_loss, 6),
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                    "tokens": n_tokens,
                    "tokens_per_s": round(n_tokens / dt, 2),
                    "step_seconds": round(dt, 4),
                    "elapsed": round(budget.elapsed(), 3),
                    "budget_left": None if budget.seconds is None else round(budget.remaining(), 3),
                }
            )
            bar.update(
                step,
                f"loss {last_loss:.3f}  {n_tokens / dt:.0f} tok/s  "
                + budget_info(budget.elapsed(), budget.seconds),
            )
            if step % tc.checkpoint_every == 0 and step < max_steps:
                _, seconds = save_checkpoint(
                    unwrapped, optimizer, state_now(), run.checkpoints, tc.keep_checkpoints
                )
                budget.record_save(seconds)

        # ---- final save: always, whatever stopped the loop -------------------------------------------------
        if (
            not list_checkpoints(run.checkpoints)
            or list_checkpoints(run.checkpoints)[-1].name != f"step-{step:07d}"
        ):
            save_checkpoint(unwrapped, optimizer, state_now(), run.checkpoints, tc.keep_checkpoints)
        tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=run.path))
        try:
            save_adapter(unwrapped, tmp)
            tokenizer.save_pretrained(tmp)  # the adapter folder is self-contained for serving
            replace_dir_atomic(tmp, run.adapter)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    result = TrainResult(
        run_dir=str(run.path),
        adapter_dir=str(run.adapter),
        steps=step,
        max_steps=max_steps,
        stopped_by=stopped_by,
        tokens=tokens_seen,
        trained_tokens=trained_seen,
        tokens_per_s=round(tokens_seen / train_seconds, 2) if train_seconds else 0.0,
        train_seconds=round(train_seconds, 3),
        elapsed_seconds=round(budget.elapsed(), 3),
        budget_seconds=budget.seconds,
        final_loss=None if last_loss is None else round(last_loss, 6),
        precision=precision,
        device=str(device),
        examples=len(examples),
        truncated=stats.truncated,
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    run.update_summary(
        run_id=run.run_id,
        model=cfg.model,
        method=tc.method,
        data=data_info,
        train=asdict(result),
        finished=step >= max_steps,
    )
    reporter.log(
        f"Trained {step}/{max_steps} steps in {result.elapsed_seconds:.0f}s (stopped by {stopped_by}), "
        f"{result.tokens_per_s:.0f} tok/s, final loss {result.final_loss}."
    )
    return result


def find_resume_checkpoint(run: RunDir) -> Path:
    found = list_checkpoints(run.checkpoints)
    if not found:
        raise RunError(f"{run.path}: no complete checkpoint to resume from")
    return found[-1]
