"""The one way to build the model that trains: load the base, then make it trainable.

Two steps, so a caller can measure the base as loaded (before its embeddings grow) in between:

    base = load(model_path, cfg.base_loading(), precision)
    built = make_trainable(base, tokenizer, tokens, cfg.lora(), precision, cfg.liger, cfg.seed)

`build_trainable` does both from a TrainConfig. The training session, the recipe benchmark and the
tests all build through here, so what they measure is what `peftko lora-train` trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import transformers

from peftko.core.config import BaseLoading, LoraSettings, TrainConfig
from peftko.model.adapters import attach_adapters
from peftko.model.base import Precision, load_base
from peftko.model.kernels import apply_fast_kernels
from peftko.model.token_rows import MarkerToken, embedding_modules, grow_embeddings, init_marker_rows, piece_rows


@dataclass
class TrainableModel:
    model: object  # the PeftModel: LoRA on the linear layers, trainable rows for the markers
    tokens: list[MarkerToken]
    rows_before: int  # embedding rows of the base
    rows_after: int  # after making room for the markers
    tied: bool  # input and output embeddings share one matrix
    kernels: str | None  # what apply_fast_kernels switched on, None when nothing
    trainable_params: int
    piece_rows: list[int]  # old marker pieces trained too, so the loss can push them down (token_rows.piece_rows)


def load(model_path: Path, loading: BaseLoading, precision: Precision):
    """The base as the config asks for it (quantization, attention, remote code, pickle)."""
    return load_base(model_path, loading.quant, precision, loading.attn_implementation, loading.trust_remote_code,
                     loading.allow_pickle)


def make_trainable(model, tokenizer, tokens: list[MarkerToken], lora: LoraSettings, precision: Precision,
                   liger: str = "auto", seed: int = 42) -> TrainableModel:
    """Make room for the markers and start their rows from their pieces, attach LoRA and the
    trainable rows, switch on fast kernels where available. `tokenizer` has the markers registered."""
    rows_before, rows_after = grow_embeddings(model, tokenizer)
    init_marker_rows(model, tokens)
    tied = embedding_modules(model)[2]
    transformers.set_seed(seed)  # LoRA's random A matrices come next
    pieces = piece_rows(tokenizer, tokens)
    peft_model = attach_adapters(model, lora, tokens, pieces)
    kernels = apply_fast_kernels(peft_model, liger, precision)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return TrainableModel(peft_model, tokens, rows_before, rows_after, tied, kernels, trainable, pieces)


def build_trainable(model_path: Path, tokenizer, tokens: list[MarkerToken], cfg: TrainConfig,
                    precision: Precision) -> TrainableModel:
    """load, then make_trainable, with the settings of `cfg`."""
    base = load(model_path, cfg.base_loading(), precision)
    return make_trainable(base, tokenizer, tokens, cfg.lora(), precision, cfg.liger, cfg.seed)
