"""How much GPU memory a run will need, predicted from config.json before any weight is loaded.

`peftko lora-train ... --dry-run` prints this plan so a user knows whether the run fits their card.
Nothing here loads weights: the shape comes from config.json, and the checkpoint's parameter count
(a cross-check) from the safetensors headers. The model (what each term counts, and how it was
calibrated against the measurements in benchmarks/RESULTS.md) is written out in
benchmarks/MEMORY_MODEL.md; `plan_memory` computes it and `echo_plan` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LOGIT_BYTES_16BIT = 14  # per logit element when logits are bf16/fp16 (see the module docstring)
LOGIT_BYTES_32BIT = 12  # fp32 logits: no separate upcast copy
CARD_OVERHEAD_GIB = 1.0  # the CUDA context and libraries, kept free by the "fits" verdict
# What torch's caching allocator reserves beyond the tensors it holds: 2-13 % of the peak in every
# peftko run on an H100 (benchmarks/RESULTS.md, "GPU (measured)": 1B 4 x 2048, 2.58 GiB allocated
# and 2.90 reserved; 8B 2 x 8192 with offloaded checkpoints, 9.70 and 10.67, in an allocator capped
# at 11.5 GiB as on a 12 GiB card). A card must hold the reserved memory, so the verdict counts it.
ALLOCATOR_SLACK = 0.12
CARDS_GIB = (12, 24)

GATED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, in_features, out_features) of each linear in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_dim
        if self.model_type == "gpt_neox":
            return (("query_key_value", h, 3 * h), ("dense", h, h), ("dense_h_to_4h", h, i), ("dense_4h_to_h", i, h))
        return (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h))

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int, target_modules="all-linear") -> int:
        wanted = None if target_modules == "all-linear" else set(target_modules)
        return self.layers * sum(r * (i + o) for n, i, o in self.linears if wanted is None or n in wanted)

    def with_vocab(self, rows: int) -> "ModelShape":
        return replace(self, vocab=max(self.vocab, rows))


def shape_from_config(config: dict) -> ModelShape:
    """A ModelShape from a config.json dict: Llama, Mistral, Qwen, Gemma, GPT-NeoX and alikes, with
    each family's key names (EXAONE's num_layers, GPT-2's n_embd/n_layer/n_head). head_dim is read,
    not derived, where given: Gemma's heads are wider than hidden_size / heads."""
    c = config.get("text_config") or config
    hidden = int(_first(c, "hidden_size", "n_embd", "d_model"))
    heads = int(_first(c, "num_attention_heads", "n_head", "num_heads"))
    kv = int(c.get("num_key_value_heads") or heads)
    return ModelShape(
        model_type=str(c.get("model_type") or config.get("model_type") or "llama"),
        hidden=hidden,
        layers=int(_first(c, "num_hidden_layers", "num_layers", "n_layer")),
        heads=heads,
        kv_heads=kv,
        head_dim=int(c.get("head_dim") or hidden // heads),
        intermediate=int(c.get("intermediate_size") or c.get("n_inner") or 4 * hidden),
        vocab=int(c.get("vocab_size") or config["vocab_size"]),
        # transformers' default (and EXAONE's own code's) when config.json does not say: tied.
        tied=bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", True))),
    )


def _first(c: dict, *keys: str):
    for key in keys:
        if c.get(key):
            return c[key]
    raise KeyError(" / ".join(keys))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part of the peak (see the module docstring for the model)."""

    weights: float
    trainable: float
    checkpoints: float
    layer_backward: float
    loss_step: float
    mask: float
    loading: float
    evaluation: float
    trainable_params: int
    fused_ce: bool
    ddp_buckets: float = 0.0  # data-parallel runs: DDP's own copy of the trainable gradients
    pinned: float = 0.0  # --offload-checkpoints: the checkpoints, held in pinned CPU memory instead

    @property
    def peak(self) -> float:
        return (self.weights + self.trainable + self.checkpoints + max(self.loss_step, self.layer_backward)
                + self.mask + self.ddp_buckets)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    @property
    def loading_gib(self) -> float:
        return self.loading / GIB

    @property
    def evaluation_gib(self) -> float:
        return self.evaluation / GIB

    def fits(self, card_gib: float) -> bool:
        """Training, loading and evaluation all fit, with the allocator's slack and the CUDA context."""
        return max(self.peak, self.loading, self.evaluation) / GIB * (1 + ALLOCATOR_SLACK) + CARD_OVERHEAD_GIB <= card_gib


def plan_memory(
    shape: ModelShape,
    *,
    quant: str = "4bit",
    seq_len: int = 2048,
    batch_size: int = 1,
    lora_r: int = 16,
    target_modules="all-linear",
    marker_rows: int = 4,
    compute_bytes: int = 2,
    gradient_checkpointing: bool = True,
    offload_checkpoints: bool = False,
    liger: bool = False,
    liger_forward: bool = False,
    optimizer: str = "adamw",
    recipe: str = "peftko",
    largest_tensor_bytes: float | None = None,
    processes: int = 1,
) -> MemoryPlan:
    """Predict the training peak (and the loading peak) in bytes. Pure: no torch, no files.

    shape: the model BEFORE the markers are added (marker_rows new rows are added to it).
    liger: Liger kernels active (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU): CUDA only.
    liger_forward: the loss is Liger's own fused forward (architectures outside
    fused_loss.PLAIN_HEAD_TYPES), which holds a merged V x H lm_head copy and a full V x H weight
    gradient; peftko's own fused loss holds neither.
    recipe: "peftko" (token rows, frozen weights in the compute dtype) or "common"
    (prepare_model_for_kbit_training + modules_to_save=["embed_tokens", "lm_head"]).
    processes: data-parallel processes, one per card. Each card holds everything one process
    does (batch_size is per card); DDP adds its gradient buckets, one fp32 copy of the trainable
    gradients, alive for the whole run.
    """
    if recipe not in ("peftko", "common"):
        raise ValueError(f"recipe must be 'peftko' or 'common', got {recipe!r}")
    common = recipe == "common"
    s = shape.with_vocab(shape.vocab + marker_rows)
    h, i, kv, v = s.hidden, s.intermediate, s.kv_dim, s.vocab
    tokens = batch_size * seq_len
    # The common recipe upcasts every non-quantized frozen tensor (and so the residual stream) to fp32.
    frozen_bytes = 4 if common else compute_bytes
    act = 4 if common else compute_bytes
    logit_bytes = LOGIT_BYTES_32BIT if compute_bytes == 4 else LOGIT_BYTES_16BIT
    lin_bytes = {"4bit": NF4_BYTES, "8bit": 1.0}.get(quant, frozen_bytes)
    embed_matrix = v * h  # elements of one V x H matrix
    n_matrices = 1 if s.tied else 2

    weights = s.linear_params * lin_bytes + (s.embedding_params + s.norm_params) * frozen_bytes
    lora = s.lora_params(lora_r, target_modules)
    if common:
        # modules_to_save unties a tied pair: two trainable copies either way.
        rows = 2 * embed_matrix
    else:
        rows = marker_rows * h * n_matrices
    trainable_params = lora + rows
    adam = 2 if optimizer == "paged_adamw_8bit" else 8
    params_and_states = trainable_params * (4 + adam)
    grads = trainable_params * 4

    checkpoints = (s.layers if gradient_checkpointing else 0) * tokens * h * act
    pinned = checkpoints if offload_checkpoints else 0
    checkpoints -= pinned
    if liger:
        per_token = 18 * h + 6 * kv + 6 * i
    else:
        per_token = 30 * h + 8 * kv + 8 * i
    per_token = per_token * act / 2
    working_set = (4 * i + 4 * h) * act / 2 * tokens
    one_layer = per_token * tokens
    layers_kept = 1 if gradient_checkpointing else s.layers
    layer_backward = layers_kept * one_layer + working_set + grads

    lm_head_copy = embed_matrix * compute_bytes  # merged marker rows / autocast copy of lm_head
    if liger:
        chunk = max(1, tokens // max(1, -(-v // h)))  # Liger's chunking: tokens / ceil(V / H)
        # Chunk logits and their gradient, and the hidden states' gradient; Liger's own forward
        # adds the merged lm_head and the full weight gradient (peftko/fused_loss.py).
        loss_step = chunk * v * 6 + tokens * h * compute_bytes + (2 * lm_head_copy if liger_forward else 0)
    else:
        loss_step = tokens * v * logit_bytes + lm_head_copy
    mask = tokens * seq_len  # bool block-diagonal mask for sdpa (none with flash_attention_2)

    largest = largest_tensor_bytes if largest_tensor_bytes is not None else shape.vocab * h * compute_bytes
    # The resize's new matrix and a tensor being read from disk are not alive together (measured on
    # an H100: peftko's loading peak is the weights plus one V x H matrix). The common recipe's
    # prepare_model_for_kbit_training then makes each fp32 copy while the 16-bit original lives.
    upcast = embed_matrix * compute_bytes if common else 0
    loading = weights + max(embed_matrix * frozen_bytes, largest) + upcast
    # With Liger, evaluation uses the fused loss too (kernels.fused_loss_kwargs): no logits.
    eval_logits = 0 if liger else tokens * v * (compute_bytes + 4)
    ddp_buckets = grads if processes > 1 else 0
    evaluation = weights + params_and_states + eval_logits + tokens * (4 * h + 2 * i) * act + ddp_buckets
    return MemoryPlan(
        weights=weights,
        trainable=params_and_states,
        checkpoints=checkpoints,
        layer_backward=layer_backward,
        loss_step=loss_step,
        mask=mask,
        loading=loading,
        evaluation=evaluation,
        trainable_params=int(trainable_params),
        fused_ce=liger,
        ddp_buckets=ddp_buckets,
        pinned=pinned,
    )


# --- reading a model directory without loading weights

def read_config(model_path: Path) -> dict:
    return json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))


def safetensors_headers(model_path: Path) -> list[dict]:
    """The JSON headers of the checkpoint's safetensors files (8-byte length + JSON; no tensor data)."""
    model_path = Path(model_path)
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = [p.name for p in sorted(model_path.glob("*.safetensors"))]
    from peftko.base_model import read_safetensors_header

    return [read_safetensors_header(model_path / name) for name in files if (model_path / name).is_file()]


DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}


def checkpoint_stats(model_path: Path) -> tuple[int, float] | None:
    """(parameter count, largest tensor in bytes) from the safetensors headers; None when there are
    none, or when the checkpoint is pre-quantized (its element counts are not parameter counts)."""
    headers = safetensors_headers(model_path)
    if not headers:
        return None
    count, largest = 0, 0.0
    for header in headers:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] in ("U8", "I8"):
                return None
            numel = 1
            for d in meta["shape"]:
                numel *= d
            count += numel
            largest = max(largest, numel * DTYPE_BYTES.get(meta["dtype"], 2))
    return count, largest


# --- the dry-run table

def _gib(x: float) -> str:
    return f"{x / GIB:6.2f} GiB"


def _dtype_bytes(dtype) -> int:
    return 4 if str(dtype).endswith("float32") else 2


def echo_plan(cfg, model_path: Path, precision, markers: list[str] | None = None,
              processes: int = 1) -> MemoryPlan | None:
    """Print the predicted GPU peak for this model, quantization, seq_len and batch; loads no weights.

    On a CUDA device the plan is for that device's dtype, with Liger when it would be applied. On the
    CPU the question a user asks is still "will it fit my card", so the table is for a CUDA card in
    bf16, and one line gives the RAM this CPU run needs.
    """
    import click

    from peftko.fused_loss import PLAIN_HEAD_TYPES
    from peftko.kernels import liger_would_apply

    config = read_config(model_path)
    try:
        shape = shape_from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        click.echo(f"memory plan: config.json does not give the model's shape ({type(e).__name__}: {e}); "
                   "no prediction for this architecture")
        return None
    n_markers = len(markers) if markers is not None else (len(cfg.markers) if isinstance(cfg.markers, list) else 8)
    stats = checkpoint_stats(model_path)
    kwargs = dict(
        quant=cfg.quant, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lora_r=cfg.lora_r,
        target_modules=cfg.target_modules, marker_rows=n_markers,
        gradient_checkpointing=cfg.gradient_checkpointing, offload_checkpoints=cfg.offload_checkpoints,
        optimizer=cfg.optimizer,
        largest_tensor_bytes=stats[1] if stats else None, processes=processes,
    )
    on_cuda = precision.device.type == "cuda"
    dtype = precision.dtype_name if on_cuda else "bfloat16"
    liger = liger_would_apply(cfg, precision.device.type, shape.model_type)
    kwargs["liger_forward"] = shape.model_type not in PLAIN_HEAD_TYPES
    plan = plan_memory(shape, compute_bytes=_dtype_bytes(dtype), liger=liger, **kwargs)
    v = shape.vocab + n_markers
    quant_name = {"4bit": "NF4", "8bit": "LLM.int8", "none": dtype}[cfg.quant]

    where = f"on {precision.device}" if on_cuda else "for a CUDA card"
    if processes > 1:
        where = f"per card, {processes} data-parallel processes ({'cuda' if on_cuda else 'CUDA cards'})"
    click.echo(f"memory plan {where}, {dtype} (from config.json; no weights loaded):")
    params = f"{shape.total_params / 1e9:.2f} B parameters"
    if stats:
        params += f" ({stats[0] / 1e9:.2f} B in the safetensors headers)"
    click.echo(f"  model       {shape.model_type}, {params}, {shape.layers} layers, hidden {shape.hidden}, "
               f"vocab {shape.vocab:,} + {n_markers} markers, {'tied' if shape.tied else 'untied'}")
    click.echo(f"  weights     {_gib(plan.weights)}  decoder linears in {quant_name}, embeddings in {dtype}")
    adam = "8-bit AdamW" if cfg.optimizer == "paged_adamw_8bit" else "AdamW"
    click.echo(f"  trainable   {_gib(plan.trainable)}  {plan.trainable_params:,} parameters (LoRA r={cfg.lora_r} "
               f"+ marker rows) in fp32 + {adam} states")
    ckpt = "one hidden state per layer (gradient checkpointing)" if cfg.gradient_checkpointing else \
        "every layer's activations (no gradient checkpointing)"
    if plan.pinned:
        ckpt = f"the hidden states checkpointed in CPU memory ({plan.pinned / GIB:.2f} GiB of pinned RAM)"
    click.echo(f"  activations {_gib(plan.checkpoints + plan.layer_backward)}  {ckpt} + one layer in backward")
    logits = f"{cfg.batch_size} x {cfg.seq_len} x {v:,}"
    if plan.fused_ce:
        click.echo(f"  logits      {_gib(plan.loss_step)}  fused linear cross-entropy (Liger): no {logits} logits")
    else:
        click.echo(f"  logits      {_gib(plan.loss_step)}  {logits} logits, their fp32 copy and gradient")
    if plan.ddp_buckets:
        click.echo(f"  ddp         {_gib(plan.ddp_buckets)}  DDP gradient buckets (the trainable gradients "
                   "once more)")
    click.echo(f"  peak        {_gib(plan.peak)}  training (activations and logits are not all alive at once)")
    click.echo(f"  loading     {_gib(plan.loading)}  while loading and resizing (estimate)")
    click.echo(f"  evaluation  {_gib(plan.evaluation)}  held-out loss, batch {cfg.batch_size}, no gradients"
               + ("" if liger else ", full logits"))
    click.echo(f"fits in {_verdicts(plan)}  (counting {ALLOCATOR_SLACK:.0%} allocator slack and "
               f"{CARD_OVERHEAD_GIB:.0f} GiB for the CUDA context)")
    if not plan.fused_ce and cfg.liger != "off":
        fused = plan_memory(shape, compute_bytes=_dtype_bytes(dtype), liger=True, **kwargs)
        click.echo(f"with Liger kernels (pip install 'peftko[gpu]', CUDA): training peak {fused.peak_gib:.2f} GiB, "
                   f"evaluation {fused.evaluation_gib:.2f} GiB, fits in {_verdicts(fused)}")
    if not on_cuda:
        ram = plan_memory(shape, compute_bytes=_dtype_bytes(precision.dtype), liger=False, **kwargs)
        click.echo(f"this run is on the CPU ({str(precision.dtype).replace('torch.', '')}): "
                   f"about {max(ram.peak, ram.loading) / GIB:.1f} GiB of RAM")
    if processes > 1 or cfg.max_steps > 0:
        click.echo(batch_line(cfg, processes))
    if stats and abs(stats[0] - shape.total_params) > 0.05 * stats[0]:
        click.echo(f"note: config.json implies {shape.total_params:,} parameters but the checkpoint holds "
                   f"{stats[0]:,}; this architecture may not be modelled well, treat the plan as rough")
    return plan


def batch_line(cfg, processes: int) -> str:
    """The global batch and what it does to the step count: N processes take N batches a step."""
    per_step = cfg.batch_size * cfg.grad_accum * processes
    line = (f"global batch: {cfg.batch_size} x {cfg.grad_accum} accumulation x {processes} "
            f"process{'es' if processes > 1 else ''} = {per_step} blocks of {cfg.seq_len} tokens "
            f"({per_step * cfg.seq_len:,} tokens) a step")
    if cfg.max_steps > 0:
        return line + f"; --max-steps {cfg.max_steps}: {cfg.max_steps * per_step:,} blocks in all"
    return line + (f"; {cfg.epochs:g} epoch(s) take 1/{processes} of the steps one process would"
                   if processes > 1 else "")


def _verdicts(plan: MemoryPlan) -> str:
    return ", ".join(f"{g} GiB: {'yes' if plan.fits(g) else 'no'}" for g in CARDS_GIB)
