"""`train.micro_batch: auto`: find the largest micro-batch that fits with real forward/backward steps.

Each try runs one forward and backward pass on the worst rows of the dataset (the longest rows of the batch plan,
every position carrying a label), in the run's precision (its autocast) and attention path, with a placeholder
the size of what the model does not hold yet: the optimizer states and, with several processes, DDP's gradient
buckets. On CUDA a try fails on an out-of-memory error (also the ones cuBLAS and bitsandbytes raise as plain
RuntimeErrors) or a peak above `train.memory_limit`; on CPU, where running out
of memory kills the process instead of raising, a try fails when its peak resident memory passes the ceiling:
`train.memory_limit`, or 90 % of what the machine has free. Sizes double until a try fails, then a bisection
finds the edge. Between tries everything is freed (gradients, batch, placeholder, CUDA cache) and the random
state is restored, so the run that follows is the one it would have been with that micro-batch set by hand.

The chosen micro-batch divides the per-process share of `train.batch_size`, and gradient accumulation makes up
the rest: the effective batch stays what the recipe asked for.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from daytune.errors import ConfigError
from daytune.units import parse_size


def accumulation(batch_size: int, micro_batch: int, world: int, field: str = "train.batch_size") -> int:
    """Gradient accumulation that makes micro_batch x accumulation x processes == batch_size exactly."""
    if batch_size % (micro_batch * world):
        raise ConfigError(
            f"{field}: {batch_size} rows per step is not a multiple of micro_batch {micro_batch} x {world} "
            f"process(es); pick a batch_size divisible by {micro_batch * world}"
        )
    return batch_size // (micro_batch * world)


@dataclass
class Try:
    micro_batch: int
    fits: bool
    peak_mb: float | None  # MiB; None when the try ran out of memory


@dataclass
class ProbeResult:
    micro_batch: int
    grad_accum: int
    largest_fitting: int
    limit_mb: float
    tries: list[Try]
    seconds: float
    source: str = "probe"  # probe | checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


# ---- peak memory of one try ---------------------------------------------------------------------------------
def _rss_peak_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM")


class _CpuPeak:
    """Peak resident memory over a block: the kernel's high-water mark, reset through /proc/self/clear_refs
    (Linux); elsewhere a sampling thread (which can miss a short spike, so the ceiling keeps a margin)."""

    def __enter__(self):
        self.peak = 0.0
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            _rss_peak_mb()
            self._hwm = True
        except OSError:
            self._hwm = False
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        import resource

        while not self._stop.is_set():
            self.peak = max(
                self.peak, _current_rss_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self._hwm:
            self.peak = _rss_peak_mb()
        else:
            self._stop.set()
            self._sampler.join()


def _current_rss_mb() -> float | None:
    try:
        import os

        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def cpu_ceiling_mb(limit: int | None) -> float:
    """The memory a CPU run may use: the configured limit, else 90 % of (free memory + what we already hold)."""
    if limit:
        return limit / 2**20
    from daytune.hardware import cpu_memory

    _, available = cpu_memory()
    return 0.9 * (available / 2**20 + (_current_rss_mb() or 0.0))


OOM_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cuda_error_out_of_memory",
    "failed to allocate",
    "can't allocate memory",
)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError, or a RuntimeError saying so (cuBLAS handle or workspace
    creation, bitsandbytes' buffers, cuDNN). Any other error is a real failure and propagates."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MARKERS)


# ---- the search ------------------------------------------------------------------------------------------------
def largest_that_fits(try_size, max_size: int) -> tuple[int, list[Try]]:
    """Doubling, then bisection, over sizes 1..max_size; `try_size(n)` returns a Try. 0 when 1 does not fit."""
    tries: list[Try] = []

    def fits(n: int) -> bool:
        tries.append(try_size(n))
        return tries[-1].fits

    if max_size < 1 or not fits(1):
        return 0, tries
    lo, hi, n = 1, None, 2  # lo fits; hi (once known) does not
    while n <= max_size:
        if not fits(n):
            hi = n
            break
        lo, n = n, n * 2
    if hi is None:  # every power of two up to max_size fitted
        if lo == max_size or fits(max_size):
            return max_size, tries
        hi = max_size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tries


def probe_micro_batch(
    model, make_batch, max_size: int, device, state_bytes: int, limit: int | None, log, autocast=None
) -> tuple[int, float, list[Try]]:
    """The largest micro-batch (≤ max_size) whose forward/backward fits; returns (size, limit MiB, tries).

    `make_batch(n)` builds a worst-case micro-batch of n rows (tensors on `device`); `state_bytes` is reserved
    for the optimizer states (and DDP's buckets) while probing; `autocast()`: the run's mixed-precision
    context (accelerator.autocast)."""
    from contextlib import nullcontext

    import torch

    autocast = autocast or nullcontext

    from daytune.engine.loss import response_loss

    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        limit_mb = (min(limit, total) if limit else 0.95 * total) / 2**20  # room for fragmentation
    else:
        limit_mb = cpu_ceiling_mb(limit)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    was_training = model.training
    model.train()

    def clean(collect: bool):
        for p in model.parameters():
            p.grad = None
        if collect:  # only an out-of-memory error leaves tensors in reference cycles (its traceback frames)
            gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    clean(collect=True)

    def try_size(n: int) -> Try:
        placeholder = batch = loss = None
        peak, failed = None, False
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                placeholder = torch.empty(state_bytes, dtype=torch.uint8, device=device)
                batch = make_batch(n)
                with autocast():
                    loss, _ = response_loss(model, batch)
                loss.backward()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_reserved(device) / 2**20
            else:
                with _CpuPeak() as meter:
                    placeholder = torch.zeros(state_bytes, dtype=torch.uint8)  # zeros: really resident
                    batch = make_batch(n)
                    with autocast():
                        loss, _ = response_loss(model, batch)
                    loss.backward()
                peak = meter.peak
            ok = peak <= limit_mb
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            ok, failed = False, True
        finally:
            del placeholder, batch, loss
            clean(collect=failed)
        log(f"micro_batch auto: {n} rows -> {'fits' if ok else 'too large'}"
            + (f" (peak {peak:,.0f} MiB of {limit_mb:,.0f})" if peak is not None else " (out of memory)"))  # fmt: skip
        return Try(n, ok, None if peak is None else round(peak, 1))

    try:
        best, tries = largest_that_fits(try_size, max_size)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
    return best, limit_mb, tries


def optimizer_state_bytes(params, optimizer: str) -> int:
    """AdamW's two moments per trainable parameter (8-bit optimizers: one byte each)."""
    n = sum(p.numel() for p in params)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2 * n
    return 2 * sum(p.numel() * p.element_size() for p in params)


def ddp_bucket_bytes(params) -> int:
    """DDP's gradient buckets: one flat copy of the gradients of the parameters that train, allocated when the
    model is wrapped (after the probe)."""
    return sum(p.numel() * p.element_size() for p in params)


def worst_batches(plan, examples, pad_id: int, device, varlen: bool = False):
    """make_batch(n): the n longest rows of the first epoch (repeated if there are fewer), every position with a
    label, as the training loop would collate them (`varlen`: packed rows by segments)."""
    from daytune.data.batching import make_batch as collate_rows

    rows = sorted((row for mb in plan.epoch(0) for row in mb),
                  key=lambda row: -sum(len(examples[i].input_ids) for i in row))  # fmt: skip

    def make(n: int):
        import torch

        chosen = [rows[i % len(rows)] for i in range(n)]
        batch = collate_rows(plan, examples, chosen, pad_id, varlen)
        widths = torch.tensor([sum(len(examples[i].input_ids) for i in row) for row in chosen])
        real = torch.arange(batch["input_ids"].shape[1])[None] < widths[:, None]
        batch["labels"] = batch["input_ids"].masked_fill(~real, -100)
        return {k: v.to(device) for k, v in batch.items() if k != "n_tokens"}

    return make


def resolve_micro_batch(
    cfg, model, examples, tokenizer, accelerator, resume: Path | None, log, varlen: bool = False
) -> ProbeResult | None:
    """Set cfg.train.micro_batch and grad_accum: from train.batch_size, from the checkpoint being resumed, or
    by probing. Returns what was decided (None when the recipe fixed the micro-batch itself)."""
    from daytune.data.batching import BatchPlan

    tc = cfg.train
    world = accelerator.num_processes
    if tc.micro_batch != "auto":
        if tc.batch_size:
            tc.grad_accum = accumulation(tc.batch_size, tc.micro_batch, world)
        return None
    if resume is not None:  # keep the micro-batch the interrupted run chose: the batch order depends on it
        from daytune.train.checkpoint import read_state

        state = read_state(Path(resume))
        if "micro_batch" in state:
            tc.micro_batch, tc.grad_accum = int(state["micro_batch"]), int(state["grad_accum"])
            return ProbeResult(
                tc.micro_batch, tc.grad_accum, tc.micro_batch, 0.0, [], 0.0, source="checkpoint"
            )
    from accelerate.utils import DistributedType, gather_object

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            "train.micro_batch: auto probes an unsharded model, which does not tell what fits under FSDP or "
            "DeepSpeed; set micro_batch to a number"
        )
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by {world} processes")
    per_process = tc.batch_size // world
    t0 = time.perf_counter()
    device = accelerator.device
    if next(model.parameters()).device != device:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    limit = parse_size(tc.memory_limit)
    plan = BatchPlan([len(e.input_ids) for e in examples], 1, tc.seed, cfg.data.max_seq_len,
                     packing=cfg.data.packing, group_by_length=cfg.data.group_by_length)  # fmt: skip
    make = worst_batches(plan, examples, tokenizer.pad_token_id, device, varlen)
    reserve = optimizer_state_bytes(params, tc.optimizer) + (ddp_bucket_bytes(params) if world > 1 else 0)
    best, limit_mb, tries = probe_micro_batch(
        model, make, per_process, device, reserve, limit, log, accelerator.autocast
    )
    if world > 1:  # every process must use the same micro-batch: the smallest any of them fits
        best = min(gather_object([best]))
    if best == 0:
        raise ConfigError(
            f"train.micro_batch: auto: one row of {cfg.data.max_seq_len} tokens does not fit in "
            f"{limit_mb:,.0f} MiB; enable train.gradient_checkpointing, shorten data.max_seq_len, use a lighter "
            "method (qlora) or raise train.memory_limit"
        )
    mb = max(d for d in range(1, best + 1) if per_process % d == 0)
    tc.micro_batch, tc.grad_accum = mb, per_process // mb
    if mb < best:
        log(
            f"micro_batch auto: {best} rows fit; using {mb}, which divides the {per_process} rows per process"
        )
    return ProbeResult(mb, tc.grad_accum, best, round(limit_mb, 1), tries, round(time.perf_counter() - t0, 2))


__all__ = ["accumulation", "resolve_micro_batch", "probe_micro_batch", "largest_that_fits"]
