"""Peak training memory, predicted from the architecture and the recipe, without the weights.

The prediction follows what daytune's training step really keeps alive (Hugging Face model code, PEFT adapters,
`daytune.engine.response_loss`), tensor by tensor:

- **weights**: by dtype; qlora stores the linear layers of the blocks in 4 bits (NF4 + absmax constants) and
  everything else in the run's dtype (bf16-true: bf16; otherwise fp32, as `peft.prepare_model_for_kbit_training`
  leaves it);
- **trainable parameters, gradients, optimizer states** (AdamW: two moments; 8-bit optimizers: one byte each);
- **activations**: the tensors autograd saves for backward, listed per operation for each block layout (RMSNorm
  keeps an fp32 copy of its input; each LoRA dropout keeps its own copy of the adapted layer's input and, on CPUs,
  a float mask; attention keeps q, k, v, its output and, with a packing or padding mask, a float copy of the
  (batch, 1, seq, seq) mask per layer). With gradient checkpointing only each block's input is kept, and one
  block is recomputed at a time in backward. `tests/test_plan.py` checks these counts against the tensors autograd
  really saves, on small models of each family;
- **loss buffers**: the output layer runs only at label positions, in chunks of 1024 (checkpointed past one), so
  the (positions x vocabulary) logits are never held at once;
- **transients** (gradients flowing through a block, the loss chunk, optimizer step temporaries) and **framework
  overhead** (the Python/PyTorch runtime on CPU, the CUDA context and caching allocator on GPUs).

The peak is the largest of the step's phases: end of forward, start of backward, end of backward, optimizer step
(and, on CPU where checkpoints are written from the same memory, the checkpoint save).

`Stack` holds the few implementation facts that differ between daytune and other trainers (used to check the
model against published measurements of litgpt and torchtune).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daytune.config import METHODS
from daytune.models.arch import FAMILY_LINEARS, Arch

GB = 1e9
GIB = 2**30
CHUNK = 1024  # daytune.engine.CHUNK: positions per output-layer chunk
ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass(frozen=True)
class Stack:
    """Implementation facts that change memory without being configuration."""

    name: str = "daytune"
    logits: str = "labels"  # labels: daytune.engine (label positions, 1024-chunks) | all: every position held
    logits_held_bytes: int = 0  # logits="all": bytes per (position, vocab entry) held through backward
    # logits="all": the loss is computed in this many chunks (fp32 transient per chunk)
    logits_chunks: int = 1
    adapters_fp32: bool = True  # PEFT keeps adapter weights (and casts their inputs) in fp32 on a 16-bit base
    # prepare_model_for_kbit_training: non-quantized weights, hence activations, fp32 (daytune casts them back
    # to bf16 under bf16-true: see `_qlora_fp32`)
    qlora_fp32_rest: bool = True
    quant_saves_input: bool = False  # bitsandbytes < 0.42: each 4-bit matmul kept its input for backward
    fused_qkv_lora: bool = False  # one LoRA (one dropout) on a fused qkv projection (litgpt)
    quantized_head: bool = False  # qlora also stores the output layer in 4 bits (Lightning's bnb plugin)
    # attention output is the o_proj input's storage (None: HF, by family)
    sdpa_out_shared: bool | None = None
    # packed rows on CUDA in 16 bits attend by segments (varlen flash attention), with no mask
    varlen_packing: bool = True
    reference: str = ""


DAYTUNE = Stack()
# Other trainers, to check the model against their published measurements (benchmarks/planner_accuracy.py).
LITGPT_2023 = Stack(
    name="litgpt (Oct 2023)",
    logits="all",
    logits_held_bytes=4,  # bf16 logits (lm_head_chunk_size=128) and bf16 log-softmax, held through backward
    logits_chunks=10,
    adapters_fp32=False,  # bf16-true: LoRA weights in bf16
    qlora_fp32_rest=False,
    quant_saves_input=True,  # bitsandbytes 0.41.1 MatMul4Bit: ctx.tensors = (A, B)
    fused_qkv_lora=True,  # LoRAQKVLinear: one dropout on the fused qkv input
    quantized_head=True,  # BitsandbytesPrecision converts every nn.Linear, lm_head included
    sdpa_out_shared=False,  # q comes from torch.cat: SDPA's output is laid out (batch, heads, seq), reshape copies
    varlen_packing=False,
    reference="https://github.com/Lightning-AI/litgpt/blob/main/tutorials/resource-tables.md",
)
TORCHTUNE_2024 = Stack(
    name="torchtune (Sep 2024, compiled)",
    logits="all",
    logits_held_bytes=2,  # bf16 logits of every position, in 8 chunks; the compiled loss keeps no fp32 copy
    logits_chunks=8,
    adapters_fp32=False,
    qlora_fp32_rest=False,  # torchao NF4 for linear weights, everything else bf16
    varlen_packing=False,  # packed rows through a block-causal mask
    reference="https://github.com/pytorch/torchtune/blob/main/README.md",
)


@dataclass
class Setup:
    """The recipe fields memory depends on (see daytune.config.TrainConfig), plus the batch shape."""

    method: str = "lora"
    precision: str = "bf16-true"  # 32-true | bf16-true | bf16-mixed | 16-mixed
    seq_len: int = 512
    micro_batch: int = 1
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    lora_r: int = 8
    lora_targets: str | tuple[str, ...] | list[str] = "attention"  # attention | all-linear | module names
    lora_dropout: float = 0.05
    double_quant: bool = True
    freeze_top_k: int = 2
    freeze_train_head: bool = False
    virtual_tokens: int = 20  # prefix, prompt, ptuning
    encoder_hidden: int = 128  # ptuning
    adapter_len: int = 10
    adapter_layers: int | None = None
    ia3_targets: str | tuple[str, ...] | list[str] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] | list[str] = ("down_proj",)
    packing: bool = False
    label_fraction: float = 1.0  # share of positions that carry a label (1.0: worst case)
    device_type: str = "cuda"  # cuda | cpu (dropout masks, runtime overhead, save phase)
    stack: Stack = field(default_factory=lambda: DAYTUNE)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def varlen(self) -> bool:
        """Packed rows attend by segments, with no mask (daytune.engine.attention): on CUDA, in 16 bits, for
        methods that add no virtual tokens."""
        return (
            self.packing
            and self.stack.varlen_packing
            and self.device_type == "cuda"
            and self.precision != "32-true"
            and self.method not in ("adapter", "prefix", "prompt", "ptuning")
        )

    @property
    def masked(self) -> bool:
        """A (batch, 1, seq, seq) mask reaches attention: packing (unless by segments), or padding between rows of
        different length."""
        return not self.varlen and (self.packing or self.micro_batch > 1)


@dataclass
class Breakdown:
    """Bytes, by what holds them; `peak` is the largest phase total, `phase` names it."""

    weights: dict[str, float]  # by dtype / format
    trainable_params: int
    total_params: int
    gradients: float
    optimizer_states: float
    activations: float  # saved for backward, at the end of forward
    activations_no_checkpointing: float
    activations_checkpointing: float
    logits_loss: float  # loss buffers held (part of `activations`) + the largest loss-chunk transient
    transient: float  # the largest short-lived allocation on top of the saved activations
    framework: float  # runtime / CUDA context
    allocator: float  # caching-allocator slack (GPU)
    peak: float
    phase: str
    phases: dict[str, float]

    @property
    def weights_total(self) -> float:
        return sum(self.weights.values())

    def to_dict(self) -> dict:
        return {
            "weights": {k: round(v) for k, v in self.weights.items()},
            "weights_total": round(self.weights_total),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "gradients": round(self.gradients),
            "optimizer_states": round(self.optimizer_states),
            "activations": round(self.activations),
            "activations_no_checkpointing": round(self.activations_no_checkpointing),
            "activations_checkpointing": round(self.activations_checkpointing),
            "logits_loss": round(self.logits_loss),
            "transient": round(self.transient),
            "framework": round(self.framework),
            "allocator": round(self.allocator),
            "peak": round(self.peak),
            "peak_phase": self.phase,
            "phases": {k: round(v) for k, v in self.phases.items()},
        }


# ---- which parameters train ----------------------------------------------------------------------------------
def _names(arch: Arch, spec, what: str) -> set[str]:
    """Module names of one block that `spec` (attention | all-linear | names) selects, in this family's naming."""
    roles = FAMILY_LINEARS[arch.family]
    every = [n for names in roles.values() for n in names]
    if isinstance(spec, str):
        spec = [spec]
    spec = list(spec)
    if spec == ["all-linear"]:
        return set(every)
    if spec == ["attention"]:
        return set(roles["attn_in"] + roles["attn_out"])
    llama_to_family = {  # so a recipe written for Llama names plans on the other families too
        "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
        "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out",
    }  # fmt: skip
    out = set()
    for name in spec:
        if name in every:
            out.add(name)
        elif name in llama_to_family:
            role = roles[llama_to_family[name]]
            out.add(name if name in role else role[0] if len(role) == 1 else name)
        else:
            raise ValueError(f"{what}: {name!r} is not a linear layer of {arch.name} ({', '.join(every)})")
    return {n for n in out if n in every}


def adapter_params(arch: Arch, s: Setup) -> int:
    """Trainable parameters the method adds (LoRA matrices, DoRA magnitudes, prompts, gates, IA3 vectors)."""
    m = s.method
    if m in ADAPTER_METHODS:
        on = _names(arch, s.lora_targets, "lora targets")
        per_layer = sum(
            s.lora_r * (i + o) + (o if m == "dora" else 0) for n, _, i, o, _ in arch.linears() if n in on
        )
        return per_layer * arch.layers
    if m == "ia3":
        on = _names(arch, s.ia3_targets, "ia3 targets")
        ff = _names(arch, s.ia3_feedforward, "ia3 feedforward") & on
        return arch.layers * sum(i if n in ff else o for n, _, i, o, _ in arch.linears() if n in on)
    if m in ("prompt", "prefix", "ptuning"):
        n = s.virtual_tokens
        if m == "prompt":
            return n * arch.hidden
        if m == "prefix":
            return n * 2 * arch.layers * arch.kv_dim
        e = s.encoder_hidden  # PEFT's P-tuning MLP encoder: embeddings + 3 linear layers
        return n * arch.hidden + arch.hidden * e + e + e * e + e + e * arch.hidden + arch.hidden
    if m == "adapter":
        layers = s.adapter_layers or arch.layers
        return layers * (s.adapter_len * arch.hidden + 1)
    return 0


def trainable_params(arch: Arch, s: Setup) -> int:
    if s.method == "full":
        return arch.total_params()
    if s.method == "freeze":
        k = min(s.freeze_top_k, arch.layers)
        head = (arch.embedding_params() if arch.tied else arch.head_params()) if s.freeze_train_head else 0
        return k * arch.layer_params() + arch.norm_params() + head
    return adapter_params(arch, s)


# ---- weights and optimizer -------------------------------------------------------------------------------------
def _param_bytes(precision: str) -> int:
    return 2 if precision == "bf16-true" else 4


def _qlora_fp32(s: Setup) -> bool:
    """qlora keeps the non-4-bit weights (so the activations) in fp32: PEFT's preparation upcasts them, and
    daytune casts them back only for bf16-true (train/methods.py)."""
    return s.method == "qlora" and s.stack.qlora_fp32_rest and s.precision != "bf16-true"


def act_bytes(s: Setup) -> int:
    """Bytes per element of the activations saved for backward."""
    if _qlora_fp32(s):
        return 4
    return 4 if s.precision == "32-true" else 2


def nf4_bytes(numel: int, double_quant: bool) -> float:
    """4-bit weights: half a byte each, plus one absmax per 64 (fp32, or 8-bit with fp32 per 256 absmaxes)."""
    return numel / 2 + (numel / 64 + numel / 64 / 256 * 4 if double_quant else numel / 64 * 4)


def weights(arch: Arch, s: Setup) -> dict[str, float]:
    pb = _param_bytes(s.precision)
    adapters = adapter_params(arch, s) if s.method not in ("full", "freeze") else 0
    adapter_bytes = 4 if (s.stack.adapters_fp32 or pb == 4) else pb
    out: dict[str, float] = {}
    if s.method == "qlora":
        linear = sum(i * o for _, _, i, o, _ in arch.linears()) * arch.layers
        if s.stack.quantized_head and not arch.tied:
            linear += arch.vocab * arch.hidden
        rest = arch.total_params() - linear
        rest_bytes = 4 if _qlora_fp32(s) else pb
        out["nf4 (linear layers)"] = nf4_bytes(linear, s.double_quant)
        out[f"{'fp32' if rest_bytes == 4 else 'bf16'} (embeddings, norms, head)"] = rest * rest_bytes
    else:
        out["fp32" if pb == 4 else "bf16"] = arch.total_params() * pb
    if adapters:
        out["adapters (fp32)" if adapter_bytes == 4 else "adapters"] = adapters * adapter_bytes
    return out


def optimizer_bytes(arch: Arch, s: Setup, n_trainable: int) -> float:
    """AdamW keeps two moments per trainable parameter in the parameter's dtype; 8-bit optimizers one byte each
    (plus an fp32 absmax per 256; tensors under 4096 elements stay 32-bit)."""
    pb = 4 if s.method not in ("full", "freeze") and s.stack.adapters_fp32 else _param_bytes(s.precision)
    if s.method in ("full", "freeze") and s.precision in ("bf16-mixed", "16-mixed"):
        pb = 4
    if s.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return n_trainable * 2 * (1 + 4 / 256)
    return n_trainable * 2 * pb


# ---- activations -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    base_trainable: bool = False  # full, or a top block under freeze
    lora: frozenset = frozenset()
    ia3: frozenset = frozenset()
    ia3_ff: frozenset = frozenset()
    adapter: bool = False


def _layers(arch: Arch, s: Setup) -> list[tuple[_Layer, int]]:
    """The blocks, bottom to top, as runs of identical blocks: (block, how many)."""
    m = s.method
    lora = frozenset(_names(arch, s.lora_targets, "lora targets")) if m in ADAPTER_METHODS else frozenset()
    ia3 = ia3_ff = frozenset()
    if m == "ia3":
        on = _names(arch, s.ia3_targets, "ia3 targets")
        ia3_ff = frozenset(_names(arch, s.ia3_feedforward, "ia3 feedforward") & on)
        ia3 = frozenset(on - ia3_ff)
    top = min(s.freeze_top_k, arch.layers) if m == "freeze" else 0
    adapted = min(s.adapter_layers or arch.layers, arch.layers) if m == "adapter" else 0
    upper = max(top, adapted)  # the top blocks differ from the ones below
    plain = _Layer(base_trainable=m == "full", lora=lora, ia3=ia3, ia3_ff=ia3_ff)
    special = _Layer(
        base_trainable=m in ("full", "freeze"), lora=lora, ia3=ia3, ia3_ff=ia3_ff, adapter=adapted > 0
    )
    runs = [(plain, arch.layers - upper), (special, upper)]
    return [(layer, n) for layer, n in runs if n > 0]


class _Saved(dict):
    """Saved tensors of one block, per token: name -> bytes. The same name is the same storage (counted once)."""


def _block(arch: Arch, s: Setup, layer: _Layer, rg: bool, kv_len: int) -> tuple[_Saved, bool]:
    """Saved bytes per token of one transformer block, and whether its output requires grad.

    `rg`: the block input requires grad (something below trains, or checkpointing made the embeddings require it).
    `kv_len`: keys per query row (the sequence, plus prefix tokens)."""
    h, q, i = arch.hidden, arch.q_dim, arch.intermediate
    a = act_bytes(s)
    lora_b = 4 if s.stack.adapters_fp32 else a
    # CPU dropout multiplies by a float mask; CUDA keeps a bool one
    mask_b = lora_b if s.device_type == "cpu" else 1
    quant = s.method == "qlora"
    saved = _Saved()
    lin_in = {n: fin for n, _, fin, _, _ in arch.linears()}
    lin_out = {n: fout for n, _, _, fout, _ in arch.linears()}

    def norm(tag: str, x: str, rg_in: bool) -> tuple[str, bool]:
        """Pre-norm of tensor `x`; returns the output tensor's name and whether it requires grad."""
        trainable = layer.base_trainable
        if arch.norm == "rms":  # HF: x.float(), x * rsqrt(mean(x^2) + eps), weight * x_hat.to(dtype)
            if rg_in:
                saved[x if a == 4 else f"{x}.f32"] = 4 * h
                saved[f"{tag}.rstd"] = 4
            if trainable:
                saved[f"{tag}.xhat"] = a * h
        elif rg_in or trainable:  # F.layer_norm keeps its input, mean and rstd
            saved[x] = a * h
            saved[f"{tag}.stats"] = 2 * (a if s.device_type == "cpu" else 4)  # mean, rstd
        return f"{tag}.out", rg_in or trainable

    def linear(name: str, x: str, rg_in: bool) -> bool:
        fin, fout = lin_in[name], lin_out[name]
        lora = name in layer.lora and not (s.stack.fused_qkv_lora and name != _first_lora(arch, layer))
        if layer.base_trainable:
            saved[x] = a * fin
        if quant and s.stack.quant_saves_input and (rg_in or name in layer.lora):
            saved[x] = a * fin
        if lora:
            if s.lora_dropout > 0:
                saved[f"{name}.drop"] = lora_b * fin
                if rg_in:
                    saved[f"{name}.mask"] = mask_b * fin
            else:
                saved[x if lora_b == a else f"{name}.cast"] = lora_b * fin
            saved[f"{name}.lora_a"] = lora_b * s.lora_r
            if s.method == "dora":  # (m/|W| - 1) * base_result + m/|W| * lora_result * scaling
                saved[f"{name}.base_result"] = a * fout
                saved[f"{name}.lora_result"] = lora_b * fout
        if name in layer.ia3:  # result * scaling keeps the result
            saved[f"{name}.out"] = a * fout
        if name in layer.ia3_ff:  # x * scaling keeps the input
            saved[x] = a * fin
        return (
            rg_in or layer.base_trainable or name in layer.lora or name in layer.ia3 or name in layer.ia3_ff
        )

    roles = FAMILY_LINEARS[arch.family]
    x = "x"
    # attention ------------------------------------------------------------------------------------------------
    y1, rg_y1 = norm("norm1", x, rg)
    rg_qkv = [linear(n, y1, rg_y1) for n in roles["attn_in"]]
    rg_att = any(rg_qkv) or layer.adapter
    if rg_att:
        saved.update(_attention(arch, s, a, kv_len))
        if layer.adapter:  # LLaMA-Adapter: a second attention over adapter_len prompt tokens, gated
            saved["adapter.q"] = a * q
            saved["adapter.scores"] = (4 + a) * arch.heads * s.adapter_len
            saved["adapter.out"] = a * h
    rg_o = linear(roles["attn_out"][0], "attn.out", rg_att) if rg_att or layer.base_trainable else False
    rg_mid = rg or rg_o
    # MLP --------------------------------------------------------------------------------------------------------
    if arch.parallel and arch.norms_per_layer == 1:
        y2, rg_y2 = y1, rg_y1
    elif arch.parallel:
        y2, rg_y2 = norm("norm2", x, rg)
    else:
        y2, rg_y2 = norm("norm2", "x2", rg_mid)
    rg_in = [linear(n, y2, rg_y2) for n in roles["mlp_in"]]
    if arch.gated:  # act(gate) * up
        rg_gate, rg_up = rg_in
        if rg_gate:
            saved["gate.out"] = a * i  # SiLU keeps its input
        if rg_up:
            saved["act.out"] = a * i
        if rg_gate:
            saved["up.out"] = a * i
        rg_act = rg_gate or rg_up
    else:
        rg_act = rg_in[0]
        if rg_act:
            saved["fc1.out"] = a * i  # GELU keeps its input
            if arch.family == "phi":  # tanh-GELU written in Python keeps tanh(.), 0.5 * x and 1 + tanh(.)
                saved["gelu.tanh"] = a * i
                saved["gelu.half"] = a * i
                saved["gelu.one_plus"] = a * i
    act = "act.prod" if arch.gated else "act.out"
    rg_mlp = linear(roles["mlp_out"][0], act, rg_act) if rg_act or layer.base_trainable else False
    return saved, rg_mid or rg_mlp


def _attention(arch: Arch, s: Setup, a: int, kv_len: int) -> dict[str, float]:
    """What attention keeps per token. SDPA's fused kernels keep q, k, v, the output and the log-sum-exp (and a
    float copy of a boolean mask); HF Falcon hands multi-query k/v to SDPA unrepeated, which falls back to the
    math kernel: scaled q, k and v expanded to every head, and the (heads x keys) probabilities."""
    q, kv, heads = arch.q_dim, arch.kv_dim, arch.heads
    if arch.family == "falcon" and arch.kv_heads < heads:
        up = 4 if s.device_type == "cpu" else a  # the CPU math kernel computes 16-bit inputs in fp32
        kv_b = up * (q if s.masked else kv)  # broadcast views without a mask, expanded copies with one
        return {"q": up * q, "k": kv_b, "v": kv_b, "probs": up * heads * kv_len}
    expand = s.masked and arch.kv_heads < heads  # repeat_kv copies k and v when a mask is given
    # q, k: new tensors from the rotary
    saved = {"q": a * q, "k": a * (q if expand else kv), "lse": 4 * heads}
    if expand:
        saved["v"] = a * q
    elif arch.family in ("neox", "qwen"):
        # v is a view of the fused qkv output: its whole storage stays alive
        saved["qkv"] = a * (q + 2 * kv)
    elif arch.family == "falcon":
        saved["v"] = a * kv
    else:
        saved["v_proj.out"] = a * kv
    if s.masked:
        saved["mask"] = a * kv_len  # the boolean mask, converted to an additive float mask in every layer
    # Llama's elementwise rotary keeps q in (batch, seq, heads, dim) layout, so SDPA's output is already laid out
    # as the output projection's input: one storage. The others (partial rotary, reshapes) get a copy.
    shared = s.stack.sdpa_out_shared if s.stack.sdpa_out_shared is not None else arch.family == "llama"
    saved["attn.out" if shared else "attn.sdpa_out"] = a * q
    return saved


def _first_lora(arch: Arch, layer: _Layer) -> str:
    return sorted(layer.lora)[0] if layer.lora else ""


def activation_bytes(arch: Arch, s: Setup, checkpointing: bool | None = None) -> dict[str, float]:
    """Bytes saved for backward at the end of the forward pass, and the largest block (recomputed under
    checkpointing). Keys: blocks, model (embeddings, rotary tables, final norm), loss, recompute (one block)."""
    ckpt = s.gradient_checkpointing if checkpointing is None else checkpointing
    a = act_bytes(s)
    m = s.method
    virtual = s.virtual_tokens if m in ("prompt", "ptuning") else 0
    seq = s.seq_len + virtual
    tokens = s.micro_batch * seq
    kv_len = seq + (s.virtual_tokens if m == "prefix" else 0)
    # does the input of block 0 require grad?
    # checkpointing on a PEFT model calls enable_input_require_grads
    rg = m in ("full", "prompt", "ptuning") or (ckpt and m not in ("full", "freeze"))
    blocks, largest = 0.0, 0.0
    any_attention = False
    for layer, count in _layers(arch, s):
        done = 0
        while done < count:
            saved, rg_out = _block(arch, s, layer, rg or m == "prefix", kv_len)
            if m == "prefix":  # trainable keys/values enter every attention: everything above requires grad
                rg_out = True
            n = count - done if rg_out == rg else 1  # identical blocks with the same input behave the same
            per_token = sum(saved.values())
            any_attention = any_attention or "q" in saved
            trains = rg or layer.base_trainable or layer.lora or layer.ia3 or layer.ia3_ff or layer.adapter
            if ckpt:  # checkpointing keeps only the block input (frozen lower blocks under freeze: nothing)
                blocks += n * a * arch.hidden * tokens if trains else 0.0
            else:
                blocks += n * per_token * tokens
            largest = max(largest, per_token * tokens)
            done, rg = done + n, rg_out
    model = 0.0
    if any_attention or ckpt:  # rotary cos/sin, shared by all blocks
        rot = int(arch.head_dim * arch.rotary_fraction)
        model += 2 * rot * a * seq * (s.micro_batch if s.packing else 1)
    inputs = tokens * kv_len if s.masked else 0.0  # the boolean mask (an input, alive all step)
    if m == "full":
        model += 8 * tokens  # embedding indices
    # final norm
    stats = 2 * (a if s.device_type == "cpu" else 4)
    model += (4 * arch.hidden + 4) * tokens if arch.norm == "rms" else (a * arch.hidden + stats) * tokens
    if m in ("full", "freeze") and arch.norm == "rms":  # a trainable RMSNorm keeps the normalized input
        model += a * arch.hidden * tokens
    held, fwd, bwd = loss_bytes(arch, s, tokens)
    return {
        "blocks": blocks,
        "model": model,
        "loss": held,
        "inputs": inputs,
        "loss_forward": fwd,
        "loss_backward": bwd,
        "recompute": largest,
    }


def loss_bytes(arch: Arch, s: Setup, tokens: int) -> tuple[float, float, float]:
    """(held through backward, forward transient, backward transient) of the output layer and cross-entropy."""
    a = act_bytes(s)
    v, h = arch.vocab, arch.hidden
    positions = s.micro_batch * (s.seq_len - 1)  # the last position predicts nothing
    if s.stack.logits == "all":  # every position's logits (and log-softmax) held until backward
        per_chunk = positions / max(1, s.stack.logits_chunks)
        return positions * v * s.stack.logits_held_bytes, per_chunk * v * 4 * 2, per_chunk * v * 4 * 2
    n = int(positions * s.label_fraction)
    head_trains = s.method == "full" or (s.method == "freeze" and s.freeze_train_head)
    if arch.head_bias:  # an output layer with a bias runs on all label positions at once (daytune.engine)
        held = positions + n * v * 4 + 8 * n + (n * h * a if head_trains else 0)
        copy = 4 if a != 4 else 0
        return held, n * v * (a + copy), n * v * (8 + copy)
    held = positions * 1.0  # boolean label selection
    if head_trains or n > CHUNK:
        held += n * h * a  # the selected hidden states (kept by the head's matmul or the chunk checkpoint)
    copy = 4 if a != 4 else 0  # .float() of 16-bit logits is a copy; of fp32 logits, the same tensor
    if n <= CHUNK:  # one chunk, not checkpointed: its fp32 log-softmax output is kept for backward
        held += n * v * 4 + 8 * n
        # forward: the logits beside the log-softmax; backward: the loss gradient and log-softmax's input
        # gradient beside the kept output
        return held, n * v * (a + copy), n * v * (8 + copy)
    # checkpointed chunks: forward makes logits and log-softmax per chunk; backward recomputes one chunk
    # (its log-softmax output kept) and adds the two gradients
    return held, CHUNK * v * (a + copy + 4), CHUNK * v * (12 + copy)


def block_backward_transient(arch: Arch, s: Setup) -> float:
    """Gradients alive inside one block's backward: the incoming gradient, the MLP's intermediate gradients and
    temporaries (about three intermediate-sized tensors), the attention input gradients."""
    a = act_bytes(s)
    tokens = s.micro_batch * s.seq_len
    return tokens * (3 * a * arch.intermediate + 3 * a * arch.hidden + a * (arch.q_dim + 2 * arch.kv_dim))


# ---- the whole step ------------------------------------------------------------------------------------------
# Python + torch + transformers + peft + accelerate + a tokenizer, measured (torch 2.13 CPU, Linux)
CPU_RUNTIME = 0.45 * GB
CUDA_CONTEXT = 0.5 * GIB  # CUDA context, kernels and cuBLAS workspace (outside PyTorch's allocator)
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, share of the short-lived (activation) memory


def breakdown(arch: Arch, s: Setup) -> Breakdown:
    if s.method not in METHODS:
        raise ValueError(f"unknown method {s.method!r}; one of {', '.join(METHODS)}")
    w = weights(arch, s)
    n_train = trainable_params(arch, s)
    pb = 4 if s.method not in ("full", "freeze") and s.stack.adapters_fp32 else _param_bytes(s.precision)
    grads = n_train * pb
    opt = optimizer_bytes(arch, s, n_train)
    act_plain = activation_bytes(arch, s, checkpointing=False)
    act_ckpt = activation_bytes(arch, s, checkpointing=True)
    acts = act_ckpt if s.gradient_checkpointing else act_plain

    def saved_total(d):
        return d["blocks"] + d["model"] + d["loss"] + d["inputs"]

    saved = saved_total(acts)
    recompute = acts["recompute"] if s.gradient_checkpointing else 0.0
    bwd = block_backward_transient(arch, s)
    if s.method in ("full", "freeze") and s.precision in ("bf16-mixed", "16-mixed"):
        saved += n_train * 2  # autocast keeps 16-bit copies of trainable weights for the step
    weights_total = sum(w.values())
    if s.device_type == "cpu":
        framework, slack = CPU_RUNTIME, 0.0
    else:
        framework = CUDA_CONTEXT
        slack = ALLOCATOR_SLACK * (saved + recompute + max(bwd, acts["loss_backward"]))
    static = weights_total + opt + framework + slack
    # grads of the output layer exist from the start of backward when it trains; block grads accumulate as
    # backward walks down while saved activations are freed: the sum is largest at one of the two ends.
    head_grad = 0.0
    if s.method == "full" or (s.method == "freeze" and s.freeze_train_head):
        head_grad = (arch.embedding_params() if arch.tied else arch.head_params()) * pb
    # The output layer's backward runs first, with everything saved; the loss buffers are gone by the time the
    # blocks' backward starts (recomputing one block under checkpointing).
    phases = {
        "forward": static + saved + acts["loss_forward"],
        "backward (loss)": static + saved + acts["loss_backward"],
        "backward (blocks)": static + saved - acts["loss"] + head_grad + recompute + bwd,
        "backward (end)": static + grads + bwd * (0.5 if s.gradient_checkpointing else 1.0),
        "optimizer step": static + grads + _step_temporaries(arch, s, n_train, pb),
    }
    if s.device_type == "cpu":  # checkpoints are written from the same memory: safetensors copies the weights
        phases["checkpoint save"] = static + n_train * pb
    phase = max(phases, key=phases.get)
    return Breakdown(
        weights=w,
        trainable_params=n_train,
        total_params=arch.total_params() + (n_train if s.method not in ("full", "freeze") else 0),
        gradients=grads,
        optimizer_states=opt,
        activations=saved,
        activations_no_checkpointing=saved_total(act_plain),
        activations_checkpointing=saved_total(act_ckpt) + act_ckpt["recompute"],
        logits_loss=acts["loss"] + max(acts["loss_forward"], acts["loss_backward"]),
        transient=max(acts["loss_forward"], acts["loss_backward"], recompute + bwd),
        framework=framework,
        allocator=slack,
        peak=phases[phase],
        phase=phase,
        phases=phases,
    )


def _step_temporaries(arch: Arch, s: Setup, n_train: int, pb: int) -> float:
    """CPU AdamW (single-tensor) makes a few temporaries of the largest parameter; CUDA's fused AdamW none."""
    if s.device_type != "cpu" or s.optimizer != "adamw":
        return 0.0
    largest = (
        arch.embedding_params() if s.method in ("full",) else min(n_train, arch.hidden * arch.intermediate)
    )
    return 2 * largest * pb
