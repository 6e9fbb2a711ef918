"""What a training run has done so far, spelled once: saved in every checkpoint, restored on resume, and the
base of what training returns (and summary.json's `train` section)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass
class TrainState:
    """The counters of a run. `to_json()` is a checkpoint's state.json (its keys are what old checkpoints hold,
    so keep them); `max_steps`, `micro_batch` and `grad_accum` are the recipe's, saved for the record."""

    step: int = 0  # optimizer steps done
    max_steps: int = 0
    total_steps: int = 0  # the LR schedule's horizon; with a budget, re-estimated every step
    tokens: int = 0  # non-padding tokens processed, all processes
    trained_tokens: int = 0  # response tokens that carried loss
    padded: int = 0  # positions computed, padding included
    train_seconds: float = 0.0  # time inside optimizer steps
    elapsed: float = 0.0  # the budget's clock, all attempts, as of the last save
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    micro_batch: int = 0
    grad_accum: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    def resumed(self, saved: dict) -> TrainState:
        """This fresh state carried on from a checkpoint's state.json. Keys added after the first checkpoints
        were written have defaults, so older checkpoints still resume; the recipe's fields stay as they are."""
        return replace(
            self,
            step=saved["step"],
            total_steps=saved.get("total_steps", self.max_steps),
            tokens=saved["tokens"],
            trained_tokens=saved["trained_tokens"],
            padded=saved.get("padded", 0),
            train_seconds=saved["train_seconds"],
            elapsed=saved["elapsed"],
            best_val=saved.get("best_val"),
            best_step=saved.get("best_step"),
            bad_evals=saved.get("bad_evals", 0),
        )


@dataclass
class TrainResult:
    """What `fit` returns and summary.json's `train` section holds: the final TrainState (rounded, named for
    readers) with the facts of the run (see `daytune.train.loop.result_of`)."""

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
    peak_rss_mb: float  # host memory of the process
    micro_batch: int = 0
    grad_accum: int = 1
    micro_batch_probe: dict | None = None  # micro_batch auto: the tries and the choice
    peak_gpu_allocated_mb: float | None = None  # CUDA: torch.cuda.max_memory_allocated (tensors)
    peak_gpu_reserved_mb: float | None = None  # CUDA: max_memory_reserved (what the caching allocator held)
    attention: str = "sdpa"  # packed rows: "varlen" (by segments, CUDA) or "sdpa" (through a mask)
    kernels: str = "none"  # train.kernels as resolved: "liger" (fused Triton kernels) or "none" (PyTorch's)
