"""A whole plan: memory, fit, the largest micro-batch, speed, what the budget buys, and the fastest setup.

`make_plan` is what `daytune plan` prints and what a training run writes to `plan.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from daytune.hardware import Device
from daytune.models.arch import Arch
from daytune.plan.dataset import DataStats
from daytune.plan.memory import GB, GIB, Breakdown, Setup, breakdown
from daytune.plan.throughput import Speed, predict

PLAN_VERSION = 1
MAX_MICRO_BATCH = 1024


def fits(b: Breakdown, device: Device) -> bool:
    return b.peak <= device.memory


def max_micro_batch(arch: Arch, s: Setup, device: Device, cap: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch whose predicted peak fits the device (0: not even one row)."""
    if not fits(breakdown(arch, replace(s, micro_batch=1)), device):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(breakdown(arch, replace(s, micro_batch=hi)), device):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the cap)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(breakdown(arch, replace(s, micro_batch=mid)), device) else (lo, mid)
    return lo


@dataclass
class Option:
    """One configuration the search looked at."""

    micro_batch: int
    gradient_checkpointing: bool
    peak: float
    tokens_per_s: float | None  # positions per second
    useful_tokens_per_s: float | None  # non-padding tokens per second

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak"] = round(self.peak)
        for k in ("tokens_per_s", "useful_tokens_per_s"):
            d[k] = None if d[k] is None else round(d[k], 1)
        return d


@dataclass
class Plan:
    arch: Arch
    device: Device
    setup: Setup
    memory: Breakdown
    speed: Speed
    max_micro_batch: dict[str, int]
    fastest: Option | None
    budget_seconds: float | None
    data: DataStats | None
    epoch: dict | None  # positions, padding... for the chosen micro-batch
    notes: list[str]

    @property
    def fits(self) -> bool:
        return fits(self.memory, self.device)

    @property
    def useful_tokens_per_s(self) -> float | None:
        if self.speed.tokens_per_s is None:
            return None
        padding = self.epoch["padding"] if self.epoch else 0.0
        return self.speed.tokens_per_s * (1 - padding)

    def reachable(self) -> dict | None:
        """Tokens, epochs and optimizer-step-free time the budget buys (loading and saving not included)."""
        if self.budget_seconds is None or self.speed.tokens_per_s is None:
            return None
        out = {
            "seconds": self.budget_seconds,
            "tokens": round(self.useful_tokens_per_s * self.budget_seconds),
        }
        if self.data is not None and self.epoch:
            epoch_seconds = self.epoch["positions"] / self.speed.tokens_per_s
            out["epoch_seconds"] = round(epoch_seconds, 1)
            out["epochs"] = round(self.budget_seconds / epoch_seconds, 3)
        return out

    def to_dict(self) -> dict:
        s = self.setup
        return {
            "version": PLAN_VERSION,
            "model": {
                "name": self.arch.name,
                "hub_id": self.arch.hub_id,
                "family": self.arch.family,
                "params": self.arch.total_params(),
                "architecture": self.arch.summary(),
                "source": self.arch.source,
            },
            "device": self.device.to_dict(),
            "setup": {
                "method": s.method,
                "precision": s.precision,
                "seq_len": s.seq_len,
                "micro_batch": s.micro_batch,
                "gradient_checkpointing": s.gradient_checkpointing,
                "optimizer": s.optimizer,
                "packing": s.packing,
                "label_fraction": round(s.label_fraction, 4),
                **(
                    {
                        "lora_r": s.lora_r,
                        "lora_targets": _targets(s.lora_targets),
                        "lora_dropout": s.lora_dropout,
                    }
                    if s.method in ("lora", "dora", "qlora")
                    else {}
                ),
            },  # fmt: skip
            "memory": {**self.memory.to_dict(), "capacity": round(self.device.memory), "fits": self.fits},
            "max_micro_batch": self.max_micro_batch,
            "speed": {**self.speed.to_dict(), "useful_tokens_per_s": _round(self.useful_tokens_per_s)},
            "budget": self.reachable(),
            "data": None if self.data is None else {**self.data.to_dict(), **(self.epoch or {})},
            "fastest": None if self.fastest is None else self.fastest.to_dict(),
            "notes": self.notes,
            # what the utilization doctor (daytune.track.doctor) compares a run with: non-padding tokens/s,
            # the peak in MiB (RSS on CPU, device memory on GPUs), and what they were predicted for
            "tokens_per_s": _round(self.useful_tokens_per_s),
            "peak_memory_mb": round(self.memory.peak / 2**20, 1),
            "micro_batch": s.micro_batch,
            "source": f"daytune plan v{PLAN_VERSION} ({self.device.name})",
        }


def _targets(t):
    return t if isinstance(t, str) else list(t)


def _round(x):
    """Three significant digits: a 7B model on a CPU without fast bf16 makes well under 0.1 token/s."""
    return None if x is None else float(f"{x:.3g}")


def make_plan(
    arch: Arch,
    setup: Setup,
    device: Device,
    *,
    micro_batch_auto: bool = False,
    budget_seconds: float | None = None,
    data: DataStats | None = None,
    search_checkpointing: bool = True,
) -> Plan:
    """Predict memory and speed for `setup` on `device`. `micro_batch_auto` picks the largest that fits
    (preferring no checkpointing when it fits one row)."""
    notes: list[str] = []
    setup = replace(setup, device_type="cpu" if device.kind == "cpu" else "cuda")
    if data is not None:
        setup = replace(setup, label_fraction=_label_fraction(data, setup))
    limits = {
        "without_checkpointing": max_micro_batch(arch, replace(setup, gradient_checkpointing=False), device),
        "with_checkpointing": max_micro_batch(arch, replace(setup, gradient_checkpointing=True), device),
    }
    if data is not None:
        rows = data.epoch(1, setup.seq_len, setup.packing)["micro_batches"]
        limits = {k: min(v, max(1, rows)) if v else 0 for k, v in limits.items()}
    if micro_batch_auto:
        ckpt = setup.gradient_checkpointing
        best = limits["with_checkpointing" if ckpt else "without_checkpointing"]
        if best == 0 and not ckpt and limits["with_checkpointing"]:
            ckpt, best = True, limits["with_checkpointing"]
            notes.append("one row does not fit without gradient checkpointing: turned it on")
        setup = replace(setup, micro_batch=max(1, best), gradient_checkpointing=ckpt)
    if data is not None:
        setup = replace(setup, label_fraction=_label_fraction(data, setup))
    memory = breakdown(arch, setup)
    speed = predict(arch, setup, device)
    epoch = data.epoch(setup.micro_batch, setup.seq_len, setup.packing) if data is not None else None
    fastest = _fastest(arch, setup, device, data, limits, search_checkpointing)
    if not fits(memory, device):
        notes.append(
            f"does not fit: predicted peak {memory.peak / GB:.1f} GB > {device.memory / GB:.1f} GB on {device.name}"
        )
        if fastest is None:
            notes.append(_suggest(arch, setup, device))
    if device.kind == "cpu" and device.available and memory.peak > device.available:
        notes.append(f"only {device.available / GB:.1f} GB are free on this machine right now")
    if arch.family == "qwen":
        notes.append("Qwen (v1) needs trust_remote_code: daytune plans it but does not load it")
    if data is not None and "smollm2" in data.tokenizer and arch.vocab != 49152:
        notes.append("token counts come from the SmolLM2 tokenizer (expect about ±15 % with the model's own)")
    return Plan(arch, device, setup, memory, speed, limits, fastest, budget_seconds, data, epoch, notes)


def _label_fraction(data: DataStats, s: Setup) -> float:
    """The most label positions in one micro-batch of the first epoch, as a share of its positions."""
    e = data.epoch(s.micro_batch, s.seq_len, s.packing)
    return min(1.0, e["max_labels"] / max(1, s.micro_batch * (s.seq_len - 1)))


def _fastest(arch, setup, device, data, limits, search_checkpointing) -> Option | None:
    """Among micro-batches (powers of two and the largest that fits) with and without checkpointing, the one
    with the most useful tokens per second; ties go to less memory."""
    options = []
    for ckpt in (False, True) if search_checkpointing else (setup.gradient_checkpointing,):
        top = limits["with_checkpointing" if ckpt else "without_checkpointing"]
        sizes = sorted({2**k for k in range(12) if 2**k <= top} | ({top} if top else set()))
        for mb in sizes:
            s = replace(setup, micro_batch=mb, gradient_checkpointing=ckpt)
            if data is not None:
                s = replace(s, label_fraction=_label_fraction(data, s))
            b = breakdown(arch, s)
            if not fits(b, device):
                continue
            sp = predict(arch, s, device)
            padding = data.epoch(mb, s.seq_len, s.packing)["padding"] if data is not None else 0.0
            useful = None if sp.tokens_per_s is None else sp.tokens_per_s * (1 - padding)
            options.append(Option(mb, ckpt, b.peak, sp.tokens_per_s, useful))
    if not options:
        return None
    return max(options, key=lambda o: ((o.useful_tokens_per_s or 0.0), -o.peak))


def _suggest(arch: Arch, setup: Setup, device: Device) -> str:
    """What would fit instead: the next lighter method, with checkpointing and one row."""
    lighter = {
        "full": ["freeze", "lora", "qlora"],
        "freeze": ["lora", "qlora"],
        "lora": ["qlora"],
        "dora": ["qlora"],
    }
    for method in lighter.get(setup.method, ["qlora"]):
        s = replace(setup, method=method, micro_batch=1, gradient_checkpointing=True,
                    optimizer="paged_adamw_8bit" if method in ("full", "freeze") else setup.optimizer)  # fmt: skip
        if fits(breakdown(arch, s), device):
            return f"fits instead: method {method} with gradient checkpointing, micro-batch 1 (or more)"
    s = replace(setup, micro_batch=1, gradient_checkpointing=True, seq_len=max(64, setup.seq_len // 4))
    if fits(breakdown(arch, s), device):
        return f"fits only with shorter sequences (seq_len {s.seq_len}) and gradient checkpointing"
    return f"{arch.name} does not fit {device.name} with any method: pick a smaller model or a larger device"


# ---- rendering -------------------------------------------------------------------------------------------------
def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / GB:.2f} GB ({x / GIB:.2f} GiB)"


def render(plan: Plan):
    """A rich table of the plan."""
    from rich.table import Table

    s, m = plan.setup, plan.memory
    title = (
        f"{plan.arch.name} · {s.method} · seq {s.seq_len} × micro-batch {s.micro_batch}"
        f"{' · checkpointing' if s.gradient_checkpointing else ''} · {s.precision} · {plan.device.name}"
    )
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("what", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)  # both columns fit 80 characters
    for dtype, nbytes in m.weights.items():
        t.add_row(f"weights: {dtype}", _gb(nbytes))
    t.add_row("trainable parameters", f"{m.trainable_params:,} of {m.total_params:,}")
    t.add_row("gradients", _gb(m.gradients))
    t.add_row(f"optimizer states ({s.optimizer})", _gb(m.optimizer_states))
    t.add_row("activations" + (" (checkpointing on)" if s.gradient_checkpointing else ""), _gb(m.activations))
    t.add_row("  without checkpointing", _gb(m.activations_no_checkpointing))
    t.add_row("  with checkpointing (+1 block recomputed)", _gb(m.activations_checkpointing))
    t.add_row("logits / loss buffers", _gb(m.logits_loss))
    t.add_row("transient (backward, loss chunk)", _gb(m.transient))
    t.add_row(
        "framework overhead" + (" (runtime)" if plan.device.kind == "cpu" else " (CUDA context)"),
        _gb(m.framework),
    )
    if m.allocator:
        t.add_row("allocator slack", _gb(m.allocator))
    t.add_row(f"[bold]peak[/bold] (at: {m.phase})", f"[bold]{_gb(m.peak)}[/bold]")
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    t.add_row(f"{plan.device.name} memory", f"{_gb(plan.device.memory)}  {verdict}")
    lim = plan.max_micro_batch
    t.add_row(
        "largest micro-batch that fits",
        f"{lim['without_checkpointing']} (checkpointing: {lim['with_checkpointing']})",
    )
    sp = plan.speed
    if sp.tokens_per_s is not None:
        t.add_row("FLOPs per token", f"{sp.flops_per_token / 1e9:.2f} GFLOP")
        t.add_row("device peak × efficiency", f"{sp.peak_flops / 1e12:.1f} TFLOP/s × {sp.efficiency:.0%}")
        t.add_row("predicted tokens/s", f"{sp.tokens_per_s:,.0f}" + (
            f" ({plan.useful_tokens_per_s:,.0f} without padding)" if plan.epoch else ""))  # fmt: skip
    else:
        t.add_row("predicted tokens/s", "unknown (no peak for this device)")
    if plan.data is not None and plan.epoch:
        d, e = plan.data, plan.epoch
        t.add_row("dataset", f"{d.examples:,} examples, {d.tokens:,} tokens")
        t.add_row("  tokens with a label (trained)", f"{d.label_tokens:,}")
        t.add_row("  per epoch", f"{e['micro_batches']:,} micro-batches, padding {e['padding']:.0%}")
    r = plan.reachable()
    if r is not None:
        t.add_row("tokens within the budget", f"{r['tokens']:,}")
        if "epochs" in r:
            t.add_row("epochs within the budget", f"{r['epochs']:,.2f} ({r['epoch_seconds']:,.0f} s each)")
    if plan.fastest is not None:
        f = plan.fastest
        speed = "" if f.useful_tokens_per_s is None else f", {f.useful_tokens_per_s:,.0f} tokens/s"
        t.add_row(
            "fastest setup that fits",
            f"micro-batch {f.micro_batch}{', checkpointing' if f.gradient_checkpointing else ''}",
        )
        t.add_row("  its speed and peak", f"{speed.lstrip(', ')}, {f.peak / GB:.1f} GB".lstrip(", "))
    return t
