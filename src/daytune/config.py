"""Typed configs: YAML in, dataclasses out, and an error that names the field for anything unknown or mistyped.

A recipe (see examples/quickstart.yaml) has four sections: model, data, train, eval. Relative paths inside a
recipe are resolved against the recipe's own folder, so a recipe and its data travel together. `--set a.b=v` on
the command line overrides any field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daytune.errors import ConfigError
from daytune.units import parse_duration, parse_interval, parse_size

PRECISIONS = ("auto", "32-true", "bf16-true", "bf16-mixed", "16-mixed")
TEMPLATES = ("chat", "alpaca", "plain")
METHODS = ("lora", "dora", "qlora", "full", "freeze", "adapter", "prefix", "prompt", "ptuning", "ia3")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
TRACK_BACKENDS = ("wandb", "mlflow")


@dataclass
class LoraConfig:
    """lora, dora and qlora. targets: 'attention' (q/k/v/o), 'all-linear', or a list of module names."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class QuantConfig:
    """qlora: the frozen base is stored in 4 bits (bitsandbytes)."""

    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True  # quantize the quantization constants too (~0.4 bit/param saved)


@dataclass
class PromptLearningConfig:
    """prefix, prompt and ptuning: trainable virtual tokens."""

    num_virtual_tokens: int = 20
    init_text: str | None = None  # prompt: initialise the soft prompt from this text's embeddings
    encoder_hidden_size: int = 128  # ptuning: the prompt encoder's MLP width


@dataclass
class AdapterConfig:
    """adapter: LLaMA-Adapter (adaption prompts with zero-initialised gates) on the top layers."""

    adapter_len: int = 10
    adapter_layers: int | None = None  # default: all layers


@dataclass
class IA3Config:
    targets: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])


@dataclass
class FreezeConfig:
    """freeze: train only the top `top_k` transformer blocks (and the final norm)."""

    top_k: int = 2
    train_head: bool = False  # also train the output layer (tied to the embeddings in many small models)


@dataclass
class DataConfig:
    train: str | None = None  # JSONL (instruction/input/output, messages or text) or a `data prepare` folder
    val: str | None = None  # validation JSONL; default: none, or a val_fraction split of train
    val_fraction: float = 0.0  # hold out this fraction of train for validation when `val` is not given
    val_rows: int | None = 200  # validation rows used (None: all)
    prepare: str | None = None  # a data recipe: `daytune run` prepares it into <run>/data and trains on that
    fingerprint: str | None = None  # the data's fingerprint; training refuses data that does not match
    template: str = (
        "chat"  # "chat" (the model's chat template), "alpaca", or "plain" (no roles: eval prompts)
    )
    max_seq_len: int = 512
    max_rows: int | None = None  # use only the first N training rows
    system_prompt: str | None = None  # chat template only; None keeps the template's default
    packing: bool = False  # several examples per sequence (per-example positions, no cross-attention)
    group_by_length: bool = False  # batch examples of similar length together (less padding) when not packing


@dataclass
class TrainConfig:
    method: str = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prompt: PromptLearningConfig = field(default_factory=PromptLearningConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    ia3: IA3Config = field(default_factory=IA3Config)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    micro_batch: int | str = 4  # rows per forward pass, or "auto": the largest that fits (needs batch_size)
    grad_accum: int = 1
    batch_size: int | None = None  # rows per optimizer step (all processes); sets grad_accum
    memory_limit: str | None = None  # micro_batch auto: a try's peak limit ("8GB"); default: what is free
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    warmup_steps: int = 10
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; default: epochs over the data
    budget: str | None = None  # wall-clock limit, e.g. "3m", "24h"; the run always ends with a saved model
    precision: str = "auto"
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit (bitsandbytes)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # torch.compile each decoder block: true | false | auto (a budget of 1h+, on CUDA or a CPU with a C++ compiler);
    # compiling takes minutes of the budget and pays back only in long runs (train/compile.py)
    compile: bool | str = False
    # fused Triton kernels from liger-kernel (RMSNorm, SwiGLU, RoPE, linear cross-entropy): auto | liger | none;
    # CUDA only (auto: when liger-kernel is installed), PyTorch's kernels elsewhere (train/kernels.py)
    kernels: str = "auto"
    grad_clip: float | None = 1.0
    seed: int = 42
    checkpoint_every: int | str = 50  # optimizer steps (50) or time ("10m") between checkpoints
    keep_checkpoints: int = 2
    eval_every: int | str | None = None  # validation loss every N steps or a duration ("5m")
    early_stopping_patience: int | None = None  # stop after N validations without improvement; keeps the best
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch CPU threads; None keeps torch's default


@dataclass
class EvalConfig:
    heldout: str | None = None  # instruction JSONL: mean response-token loss
    heldout_rows: int = 50
    # JSONL with question, choices, answer (index): accuracy by log-likelihood
    multiple_choice: str | None = None
    multiple_choice_rows: int = 100
    batch_size: int = 8
    base: bool = True  # also evaluate the base model, for a base-vs-tuned table
    suite: str | None = None  # an evaluation suite (quick, competition-open, full): HELM-style scenarios
    scenarios: list[str] | None = None  # only these scenarios of the suite
    max_instances: int | None = None  # cap every scenario's instances (MMLU: per subject)
    data_root: str | None = None  # datasets folder for the suite (default: the suite's own)


@dataclass
class WandbConfig:
    """Weights & Biases: online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline."""

    project: str = "daytune"
    entity: str | None = None  # your user or team; None: the key's default entity
    mode: str = "auto"  # auto | online | offline ($WANDB_MODE overrides auto)
    log_model: str = "final"  # final | all (every checkpoint too) | none: the model as W&B artifacts


@dataclass
class MlflowConfig:
    # default: sqlite:///<out_dir>/mlflow.db; any MLflow URI (http://, databricks)
    tracking_uri: str | None = None
    experiment: str = "daytune"
    log_model: str = "final"  # final | all | none: the model folder as run artifacts


@dataclass
class TrackConfig:
    """Where runs are recorded besides the run folder (always written); see daytune/track/."""

    backends: list[str] = field(default_factory=list)  # any of: wandb, mlflow
    system_every: float = 5.0  # seconds between system samples (CPU, RSS; GPU through NVML)
    code_snapshot: bool = True  # copy daytune's source into the run folder (code/)
    # the device's peak for MFU; default: a datasheet table, or measured on CPU
    peak_tflops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class RunConfig:
    name: str = "run"
    model: str = "smollm2-135m"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    out_dir: str = "runs"  # relative to the current directory

    def validate(self) -> RunConfig:
        _choice("data.template", self.data.template, TEMPLATES)
        _choice("train.method", self.train.method, METHODS)
        _choice("train.precision", self.train.precision, PRECISIONS)
        _choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _choice("train.quant.quant_type", self.train.quant.quant_type, ("nf4", "fp4"))
        if self.train.compile not in (True, False, "auto"):
            raise ConfigError(f"train.compile: {self.train.compile!r} is not one of true, false, auto")
        if self.train.kernels not in ("auto", "liger", "none"):
            raise ConfigError(f"train.kernels: {self.train.kernels!r} is not one of auto, liger, none")
        parse_interval(self.train.checkpoint_every, "train.checkpoint_every")
        if self.train.eval_every is not None:
            parse_interval(self.train.eval_every, "train.eval_every")
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be within [0, 1), got {self.data.val_fraction}")
        if self.data.packing and self.train.method in ("prefix", "prompt", "ptuning"):
            raise ConfigError(
                f"data.packing: method {self.train.method} prepends virtual tokens to each sequence, so packed "
                "examples would not all see them; set packing: false (group_by_length: true also cuts padding)"
            )
        parse_duration(self.train.budget, "train.budget")
        _validate_batch(self.train)
        for i, backend in enumerate(self.track.backends):
            _choice(f"track.backends[{i}]", backend, TRACK_BACKENDS)
        _choice("track.wandb.mode", self.track.wandb.mode, ("auto", "online", "offline"))
        _choice("track.wandb.log_model", self.track.wandb.log_model, ("final", "all", "none"))
        _choice("track.mlflow.log_model", self.track.mlflow.log_model, ("final", "all", "none"))
        if self.track.system_every <= 0:
            raise ConfigError(f"track.system_every: must be positive seconds, got {self.track.system_every}")
        for name, value, low in [
            ("data.max_seq_len", self.data.max_seq_len, 8),
            ("train.grad_accum", self.train.grad_accum, 1),
            ("train.keep_checkpoints", self.train.keep_checkpoints, 1),
            ("train.lora.r", self.train.lora.r, 1),
            ("train.prompt.num_virtual_tokens", self.train.prompt.num_virtual_tokens, 1),
            ("train.adapter.adapter_len", self.train.adapter.adapter_len, 1),
            ("train.freeze.top_k", self.train.freeze.top_k, 1),
            ("train.warmup_steps", self.train.warmup_steps, 0),
            ("eval.batch_size", self.eval.batch_size, 1),
            ("eval.heldout_rows", self.eval.heldout_rows, 1),
            ("eval.multiple_choice_rows", self.eval.multiple_choice_rows, 1),
        ]:
            if value < low:
                raise ConfigError(f"{name}: must be at least {low}, got {value}")
        for name, value, unset in [  # optional counts: null means "all" or "the default"
            ("data.val_rows", self.data.val_rows, "all rows"),
            ("data.max_rows", self.data.max_rows, "all rows"),
            ("train.threads", self.train.threads, "torch's default"),
            ("train.early_stopping_patience", self.train.early_stopping_patience, "no early stopping"),
            ("train.adapter.adapter_layers", self.train.adapter.adapter_layers, "all layers"),
            ("eval.max_instances", self.eval.max_instances, "all instances"),
        ]:
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1 (or null for {unset}), got {value}")
        for name, value in [
            ("train.grad_clip", self.train.grad_clip),  # a negative norm would flip the gradients
            ("track.peak_tflops", self.track.peak_tflops),
        ]:
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be positive (or null to turn it off), got {value}")
        if self.train.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be at least 0, got {self.train.weight_decay}")
        if not 0 <= self.train.lora.dropout < 1:
            raise ConfigError(f"train.lora.dropout: must be within [0, 1), got {self.train.lora.dropout}")
        if self.train.lr <= 0:
            raise ConfigError(f"train.lr: must be positive, got {self.train.lr}")
        if self.train.epochs <= 0:
            raise ConfigError(f"train.epochs: must be positive, got {self.train.epochs}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps: must be at least 1, got {self.train.max_steps}")
        if not 0 <= self.train.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be within [0, 1], got {self.train.min_lr_ratio}")
        if not self.train.lora.targets:
            raise ConfigError("train.lora.targets: name at least one module, e.g. [q_proj, v_proj]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate_batch(tc: TrainConfig) -> None:
    """micro_batch: a positive integer or "auto" (which needs batch_size); batch_size replaces grad_accum."""
    if isinstance(tc.micro_batch, str):
        if tc.micro_batch.strip().lower() != "auto":
            raise ConfigError(f"train.micro_batch: expected an integer or 'auto', got {tc.micro_batch!r}")
        tc.micro_batch = "auto"
        if tc.batch_size is None:
            raise ConfigError(
                "train.micro_batch: auto needs train.batch_size, the rows per optimizer step to keep "
                "(gradient accumulation makes up the rest), e.g. batch_size: 16"
            )
    elif tc.micro_batch < 1:
        raise ConfigError(f"train.micro_batch: must be at least 1, got {tc.micro_batch}")
    if tc.batch_size is not None:
        if tc.batch_size < 1:
            raise ConfigError(f"train.batch_size: must be at least 1, got {tc.batch_size}")
        if tc.grad_accum != 1:
            raise ConfigError("train.batch_size sets the gradient accumulation: leave train.grad_accum at 1")
        if isinstance(tc.micro_batch, int) and tc.batch_size % tc.micro_batch:
            raise ConfigError(
                f"train.batch_size: {tc.batch_size} is not a multiple of micro_batch {tc.micro_batch}"
            )
    if tc.memory_limit is not None:
        parse_size(tc.memory_limit, "train.memory_limit")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a type hint, converting only what YAML cannot express (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # YAML's .nan/.inf and the strings "nan"/"inf" parse as floats
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are an error that lists the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key '{path}'; valid keys{' in ' + where if where else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def read_yaml_mapping(path: Path, what: str, top: str) -> dict[str, Any]:
    """A recipe file's top-level mapping (an empty file is {}); errors name the file, and the line for bad YAML.
    `what` names the file in "not found", `top` what the mapping should hold."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping {top} at the top")
    return data


def apply_overrides(data: dict, overrides: Iterable[str]) -> None:
    """Apply each `--set a.b=value` to a recipe's mapping; a number picks a list item: --set sources.1.max_rows=500."""
    for text in overrides:
        keys, value = _parse_override(text)
        _set_key(data, keys, value)


def _parse_override(text: str) -> tuple[list[str], Any]:
    """'train.budget=30s' -> (['train', 'budget'], '30s'); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.budget=30s")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.budget=30s")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def _set_key(data: dict, keys: list[str], value: Any) -> None:
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(
                    f"--set {'.'.join(keys)}: '{where}' is not an item of the list (0..{len(node) - 1})"
                )
            if last:
                node[int(k)] = value
            node = node[int(k)]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            node = node.setdefault(k, {})
        else:
            raise ConfigError(f"--set {'.'.join(keys)}: '{'.'.join(keys[:i])}' is not a section")


def model_beside_recipe(model: str, base: Path) -> str:
    """A model folder or .gguf file written relative to the recipe, made absolute; names and hub ids stay."""
    path = Path(model).expanduser()
    if not path.is_absolute() and ("/" in model or model.endswith(".gguf")) and (base / path).exists():
        return str((base / path).resolve())
    return model


_PATH_FIELDS = [
    ("data", "train"),
    ("data", "val"),
    ("data", "prepare"),
    ("eval", "heldout"),
    ("eval", "multiple_choice"),
    ("eval", "data_root"),
]


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a recipe YAML (or start from defaults), apply `--set` overrides, resolve paths, validate."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        data = read_yaml_mapping(path, "config file", "of sections (model, data, train, eval)")
        base = path.resolve().parent
    apply_overrides(data, overrides)
    try:
        cfg = from_dict(RunConfig, data)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for section, key in _PATH_FIELDS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not Path(value).is_absolute():
            setattr(obj, key, str((base / value).resolve()))
    cfg.model = model_beside_recipe(cfg.model, base)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
