"""The one way to build the model that trains: load the base, then make it trainable.

Two steps, so a caller can measure the base as loaded (before its embeddings grow) in between:

    base = load(model_path, cfg, precision)
    built = make_trainable(base, tokenizer, tokens, cfg, precision)

`build_trainable` does both. The training session, the recipe benchmark and the tests all build
through here, so what they measure is what `peftko lora-train` trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers

from peftko.base_model import Precision, load_base
from peftko.collate import PackedCollator
from peftko.kernels import apply_fast_kernels
from peftko.token_rows import MarkerToken, embedding_modules, grow_embeddings, init_marker_rows
from peftko.training import attach_adapters


@dataclass
class TrainableModel:
    model: object  # the PeftModel: LoRA on the linear layers, trainable rows for the markers
    collator: PackedCollator  # batches for this model's attention implementation
    tokens: list[MarkerToken]
    rows_before: int  # embedding rows of the base
    rows_after: int  # after making room for the markers
    tied: bool  # input and output embeddings share one matrix
    kernels: str | None  # what apply_fast_kernels switched on, None when nothing
    trainable_params: int


def load(model_path: Path, cfg, precision: Precision):
    """The base as the config asks for it (quantization, attention, remote code, pickle)."""
    return load_base(model_path, cfg.quant, precision, cfg.attn_implementation, cfg.trust_remote_code,
                     cfg.allow_pickle)


def make_trainable(model, tokenizer, tokens: list[MarkerToken], cfg, precision: Precision) -> TrainableModel:
    """Make room for the markers and start their rows from their pieces, attach LoRA and the
    trainable rows, switch on fast kernels where available. `tokenizer` has the markers registered."""
    rows_before, rows_after = grow_embeddings(model, tokenizer)
    init_marker_rows(model, tokens)
    tied = embedding_modules(model)[2]
    transformers.set_seed(cfg.seed)  # LoRA's random A matrices come next
    peft_model = attach_adapters(model, cfg, tokens)
    kernels = apply_fast_kernels(peft_model, cfg, precision)
    collator = PackedCollator.for_model(tokenizer, model, precision.dtype)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return TrainableModel(peft_model, collator, tokens, rows_before, rows_after, tied, kernels, trainable)


def build_trainable(model_path: Path, tokenizer, tokens: list[MarkerToken], cfg,
                    precision: Precision) -> TrainableModel:
    return make_trainable(load(model_path, cfg, precision), tokenizer, tokens, cfg, precision)
