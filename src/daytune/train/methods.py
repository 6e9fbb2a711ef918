"""Fine-tuning methods: one `method:` key, built on PEFT wherever PEFT has the method.

full      every weight trains                     -> model/  (HF safetensors)
freeze    only the top-k blocks train              -> model/
lora      low-rank adapters (PEFT)                 -> adapter/ (PEFT format)
dora      weight-decomposed LoRA (PEFT use_dora)   -> adapter/
qlora     LoRA on a 4-bit NF4 base (bitsandbytes)  -> adapter/
adapter   LLaMA-Adapter adaption prompts (PEFT)    -> adapter/
prefix    prefix tuning (PEFT)                     -> adapter/
prompt    prompt tuning (PEFT)                     -> adapter/
ptuning   P-tuning, an MLP prompt encoder (PEFT)   -> adapter/
ia3       (IA)^3 rescaling vectors (PEFT)          -> adapter/
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from daytune.config import TrainConfig
from daytune.errors import ConfigError, ModelError
from daytune.fileio import replace_dir_atomic, temp_dir_beside

PEFT_METHODS = ("lora", "dora", "qlora", "adapter", "prefix", "prompt", "ptuning", "ia3")
PROMPT_METHODS = ("adapter", "prefix", "prompt", "ptuning")  # add virtual tokens or attention paths
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def output_name(method: str) -> str:
    """The run folder's final artifact: adapter/ for PEFT methods, model/ for full and freeze."""
    return "adapter" if method in PEFT_METHODS else "model"


def linear_layer_names(model) -> list[str]:
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def resolve_targets(model, targets, field: str):
    """'attention' -> q/k/v/o; 'all-linear' stays for PEFT (every linear layer but the output head)."""
    if isinstance(targets, str):
        targets = [targets]
    if targets == ["attention"]:
        targets = ATTENTION
    if targets == ["all-linear"]:
        return "all-linear"
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"{field}: {missing} not found in this model; its linear layers are {available}")
    return list(targets)


def _peft_config(model, tc: TrainConfig, tokenizer_dir: Path):
    import peft

    m = tc.method
    if m in ("lora", "dora", "qlora"):
        return peft.LoraConfig(
            r=tc.lora.r,
            lora_alpha=tc.lora.alpha,
            lora_dropout=tc.lora.dropout,
            target_modules=resolve_targets(model, tc.lora.targets, "train.lora.targets"),
            use_dora=m == "dora",
            task_type="CAUSAL_LM",
        )
    if m == "ia3":
        targets = resolve_targets(model, tc.ia3.targets, "train.ia3.targets")
        feedforward = [t for t in tc.ia3.feedforward if targets == "all-linear" or t in targets]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    if m == "adapter":
        n_layers = model.config.num_hidden_layers
        layers = tc.adapter.adapter_layers or n_layers
        if not 1 <= layers <= n_layers:
            raise ConfigError(f"train.adapter.adapter_layers: must be within 1..{n_layers}, got {layers}")
        return peft.AdaptionPromptConfig(
            adapter_len=tc.adapter.adapter_len, adapter_layers=layers, task_type="CAUSAL_LM"
        )
    n = tc.prompt.num_virtual_tokens
    if m == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM")
    if m == "prompt":
        if tc.prompt.init_text:
            return peft.PromptTuningConfig(
                num_virtual_tokens=n,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=tc.prompt.init_text,
                tokenizer_name_or_path=str(tokenizer_dir),
                task_type="CAUSAL_LM",
            )
        return peft.PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM")
    if m == "ptuning":
        return peft.PromptEncoderConfig(
            num_virtual_tokens=n, encoder_hidden_size=tc.prompt.encoder_hidden_size, task_type="CAUSAL_LM"
        )
    raise ConfigError(f"train.method: {m!r} is not a PEFT method")


def _freeze_all_but_top(model, tc: TrainConfig) -> None:
    blocks = _blocks(model)
    k = tc.freeze.top_k
    if k > len(blocks):
        raise ConfigError(f"train.freeze.top_k: the model has {len(blocks)} blocks, got {k}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks[-k:]:
        for p in block.parameters():
            p.requires_grad_(True)
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is not None:
        for p in norm.parameters():
            p.requires_grad_(True)
    if tc.freeze.train_head:
        for p in model.get_output_embeddings().parameters():
            p.requires_grad_(True)


def _blocks(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return getattr(decoder, name)
    raise ConfigError(f"train.method freeze: cannot find the transformer blocks of {type(model).__name__}")


def _prepare_4bit(model, gradient_checkpointing: bool):
    """PEFT's preparation of a 4-bit base (frozen weights, input gradients for checkpointing), keeping the
    weights that are not 4-bit in the dtype they were loaded in. `prepare_model_for_kbit_training` upcasts the
    embeddings, norms and head to fp32, which is what fp16 training needs (16-mixed loads fp32 and is left
    as it is); under bf16-true it would make the residual stream, attention and head run in fp32 (twice the
    activation memory, no flash kernel). So bf16 runs keep them in bf16, as QLoRA computes: NF4 storage, bf16
    compute. LoRA weights stay fp32 (PEFT keeps adapters in fp32 on a 16-bit base) and return bf16."""
    from peft import prepare_model_for_kbit_training

    loaded = {n: p.dtype for n, p in model.named_parameters()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for n, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != loaded.get(n, p.dtype):
            p.data = p.data.to(loaded[n])
    return model


def prepare_for_training(model, tc: TrainConfig, tokenizer_dir: Path):
    """Wrap or freeze the base model according to `tc.method`; returns the model to train."""
    model.config.use_cache = False
    if tc.method == "qlora":
        model = _prepare_4bit(model, tc.gradient_checkpointing)
    elif tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tc.method in PEFT_METHODS:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if tc.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if tc.method == "freeze":
        _freeze_all_but_top(model, tc)
        return model
    from peft import get_peft_model

    return get_peft_model(model, _peft_config(model, tc, tokenizer_dir))


def make_optimizer(params, tc: TrainConfig, device: torch.device):
    if tc.optimizer == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"train.optimizer {tc.optimizer} needs bitsandbytes: pip install 'daytune[quant]'"
        ) from None
    cls = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}[
        tc.optimizer
    ]
    try:
        return getattr(bnb.optim, cls)(params, lr=tc.lr, weight_decay=tc.weight_decay)
    except (RuntimeError, NotImplementedError) as e:
        raise ConfigError(
            f"train.optimizer {tc.optimizer}: not supported on {device} ({e}); use adamw"
        ) from None


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a checkpoint must hold to resume."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys():
        missing = sorted(params.keys() - tensors.keys())[:3]
        extra = sorted(tensors.keys() - params.keys())[:3]
        raise ModelError(
            f"{where}: checkpoint does not match this model/method (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(_like(tensors[n], p))


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor, read by every process) laid out as parameter `p`: on its device and dtype, and
    for an FSDP2 parameter (a DTensor) sharded as it is, each process keeping its own part (no communication)."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        DTensor = None
    if DTensor is not None and isinstance(p, DTensor):
        local = full.to(p.to_local().device, p.dtype)
        return distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None)
    return full.to(p.device, p.dtype)


def save_final(
    model, tokenizer, method: str, folder: Path, state_dict: dict | None = None, notes: dict | None = None
) -> Path:
    """Write the run's model atomically: a PEFT adapter folder, or a full HF model folder; tokenizer included.
    `state_dict`: full weights gathered from a sharded (FSDP/DeepSpeed) run; `notes`: extra JSON files by name
    (a qlora adapter's quantization.json)."""
    import json

    tmp = temp_dir_beside(folder)
    try:
        model.save_pretrained(
            tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {})
        )
        tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        return replace_dir_atomic(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
