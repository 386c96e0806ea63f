"""How much GPU memory a run will need, predicted from config.json before any weight is loaded.

`peftko lora-train ... --dry-run` prints this plan so a user knows whether the run fits their card.
Nothing here loads weights: the shape comes from config.json, and the checkpoint's parameter count
(a cross-check) from the safetensors headers. The model (what each term counts, and how it was
calibrated against the measurements in benchmarks/RESULTS.md) is written out in
benchmarks/MEMORY_MODEL.md; `plan_memory` computes it and peftko.model.dry_run prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from peftko.model.header import read_safetensors_header

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
CARDS_GIB = (8, 12, 16, 24)  # the cards people train on; most presets aim at 16 GB

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
    tokens = batch_size * seq_len
    # The common recipe upcasts every non-quantized frozen tensor (and so the residual stream) to fp32.
    frozen_bytes = 4 if common else compute_bytes
    act = 4 if common else compute_bytes
    weights = _weights(s, quant, frozen_bytes)
    trainable_params = s.lora_params(lora_r, target_modules) + _trainable_rows(s, marker_rows, common)
    adam = 2 if optimizer == "paged_adamw_8bit" else 8
    params_and_states = trainable_params * (4 + adam)
    grads = trainable_params * 4
    checkpoints = (s.layers if gradient_checkpointing else 0) * tokens * s.hidden * act
    pinned = checkpoints if offload_checkpoints else 0
    checkpoints -= pinned
    ddp_buckets = grads if processes > 1 else 0
    return MemoryPlan(
        weights=weights,
        trainable=params_and_states,
        checkpoints=checkpoints,
        layer_backward=_layer_backward(s, tokens, act, liger, gradient_checkpointing) + grads,
        loss_step=_loss_step(s, tokens, compute_bytes, liger, liger_forward),
        mask=tokens * seq_len,  # bool block-diagonal mask for sdpa (none with flash_attention_2)
        loading=_loading(shape, s, weights, frozen_bytes, compute_bytes, largest_tensor_bytes, common),
        evaluation=_evaluation(s, tokens, act, compute_bytes, liger, weights + params_and_states, ddp_buckets),
        trainable_params=int(trainable_params),
        fused_ce=liger,
        ddp_buckets=ddp_buckets,
        pinned=pinned,
    )


def _weights(s: ModelShape, quant: str, frozen_bytes: int) -> float:
    lin_bytes = {"4bit": NF4_BYTES, "8bit": 1.0}.get(quant, frozen_bytes)
    return s.linear_params * lin_bytes + (s.embedding_params + s.norm_params) * frozen_bytes


def _trainable_rows(s: ModelShape, marker_rows: int, common: bool) -> int:
    if common:  # modules_to_save unties a tied pair: two trainable V x H copies either way
        return 2 * s.vocab * s.hidden
    return marker_rows * s.hidden * (1 if s.tied else 2)


def _layer_backward(s: ModelShape, tokens: int, act: int, liger: bool, gradient_checkpointing: bool) -> float:
    """The activations of the layers held in backward (one when checkpointing) and their working set."""
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    per_token = (18 * h + 6 * kv + 6 * i) if liger else (30 * h + 8 * kv + 8 * i)
    per_token = per_token * act / 2
    working_set = (4 * i + 4 * h) * act / 2 * tokens
    layers_kept = 1 if gradient_checkpointing else s.layers
    return layers_kept * (per_token * tokens) + working_set


def _loss_step(s: ModelShape, tokens: int, compute_bytes: int, liger: bool, liger_forward: bool) -> float:
    """The loss's own peak: full logits with their fp32 copy and gradient, or Liger's chunks."""
    v, h = s.vocab, s.hidden
    lm_head_copy = v * h * compute_bytes  # merged marker rows / autocast copy of lm_head
    if not liger:
        logit_bytes = LOGIT_BYTES_32BIT if compute_bytes == 4 else LOGIT_BYTES_16BIT
        return tokens * v * logit_bytes + lm_head_copy
    chunk = max(1, tokens // max(1, -(-v // h)))  # Liger's chunking: tokens / ceil(V / H)
    # Chunk logits and their gradient, and the hidden states' gradient; Liger's own forward adds the
    # merged lm_head and the full weight gradient (peftko/model/fused_loss.py).
    return chunk * v * 6 + tokens * h * compute_bytes + (2 * lm_head_copy if liger_forward else 0)


def _loading(shape: ModelShape, s: ModelShape, weights: float, frozen_bytes: int, compute_bytes: int,
             largest_tensor_bytes: float | None, common: bool) -> float:
    """The loading peak. The resize's new matrix and a tensor being read from disk are not alive
    together (measured on an H100: peftko's loading peak is the weights plus one V x H matrix). The
    common recipe's prepare_model_for_kbit_training then makes each fp32 copy while the 16-bit
    original lives."""
    embed_matrix = s.vocab * s.hidden
    largest = largest_tensor_bytes if largest_tensor_bytes is not None else shape.vocab * s.hidden * compute_bytes
    upcast = embed_matrix * compute_bytes if common else 0
    return weights + max(embed_matrix * frozen_bytes, largest) + upcast


def _evaluation(s: ModelShape, tokens: int, act: int, compute_bytes: int, liger: bool, resident: float,
                ddp_buckets: float) -> float:
    """The held-out pass: no gradients, full logits unless Liger's fused loss (kernels.fused_loss_kwargs)."""
    eval_logits = 0 if liger else tokens * s.vocab * (compute_bytes + 4)
    return resident + eval_logits + tokens * (4 * s.hidden + 2 * s.intermediate) * act + ddp_buckets


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
