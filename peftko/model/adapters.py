"""LoRA on the base's linear layers, plus trainable rows for the markers: the adapter's shape.

peftko trains only the marker rows of the embedding matrices (peft's `trainable_token_indices`,
a small delta for the listed ids) besides LoRA, never whole matrices.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from peftko.core.config import LoraSettings
from peftko.core.errors import UserError
from peftko.model.base import linear_layer_names
from peftko.model.token_rows import MarkerToken, trainable_token_indices

TOKEN_ROW_PARAM = "trainable_tokens_delta"  # the name peft gives the marker rows' parameters


def lora_config(model, lora: LoraSettings, tokens: list[MarkerToken], pieces: list[int] = ()) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        trainable_token_indices=trainable_token_indices(model, tokens, pieces) if tokens else None,
        task_type="CAUSAL_LM",
    )


def check_target_modules(model_path: Path, target_modules: list[str] | str, trust_remote_code: bool) -> None:
    """Refuse LoRA target names the base does not have, naming the ones it does (before any load)."""
    if target_modules == "all-linear":
        return
    names = linear_layer_names(model_path, trust_remote_code)
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise UserError(f"target_modules: {', '.join(missing)} not found in {model_path.name}; its linear "
                        f"layers are {', '.join(sorted(names))} (or use all-linear)")


def attach_adapters(model, lora: LoraSettings, tokens: list[MarkerToken], pieces: list[int] = ()):
    """Wrap the base with LoRA + marker rows (and the rows of their syntax pieces: token_rows.piece_rows). Frozen weights keep their dtype; trainables are fp32.

    Deliberately NOT prepare_model_for_kbit_training: its fp32 upcast of every frozen tensor makes
    activations fp32 and costs 2.8x speed (benchmarks/RESULTS.md) for no gain in a bf16 compute path.
    """
    peft_model = get_peft_model(model, lora_config(model, lora, tokens, pieces))
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model
