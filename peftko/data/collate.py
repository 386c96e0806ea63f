"""Batches of packed blocks in which no document sees another.

A block holds several documents back to back; position_ids restart at 0 where each document
(or the piece of a long one) begins. Resetting positions alone does NOT isolate documents under
sdpa or eager attention in transformers 5 (the second document's logits change with the first), so the
collator also builds the block-diagonal causal mask explicitly, as a 4D tensor that transformers
passes through unchanged. flash_attention_2 reads the document starts from position_ids itself
(varlen), so it gets no mask at all: padding-free.
"""

from __future__ import annotations

import torch

IGNORE = -100


class PackedCollator:
    def __init__(self, pad_id: int, attn_implementation: str, dtype: torch.dtype = torch.float32):
        self.pad_id = pad_id
        self.attn = attn_implementation
        self.dtype = dtype

    @classmethod
    def for_model(cls, tokenizer, model, dtype: torch.dtype) -> "PackedCollator":
        """Pads with the tokenizer's pad token, or eos when it has none (labels mask it either way)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, model.config._attn_implementation, dtype)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = input_ids[i, :n]
            position_ids[i, :n] = torch.as_tensor(r["position_ids"])
            # Padding continues the last positions so it forms its own inert segment.
            position_ids[i, n:] = torch.arange(length - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.attn != "flash_attention_2":
            batch["attention_mask"] = self.block_mask(position_ids)
        return batch

    def block_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(batch, 1, L, L): query i may see key j iff j <= i and both lie in the same segment."""
        segment = torch.cumsum(position_ids == 0, dim=1)
        same = segment[:, :, None] == segment[:, None, :]
        length = position_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (same & causal)[:, None]
        if self.attn == "sdpa" or self.attn == "auto":
            return allowed
        # eager and others add the mask to the scores: 0 where allowed, the dtype's minimum elsewhere.
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
