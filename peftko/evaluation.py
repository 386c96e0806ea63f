"""Held-out measures that stay comparable across tokenizers: bits per character.

Per-token perplexity changes when the tokenizer changes (and registering markers changes it);
bits per character does not: total negative log-likelihood of the held-out documents, in bits,
divided by their number of characters.
"""

from __future__ import annotations

import math

import torch

from peftko.kernels import fused_loss_kwargs


@torch.no_grad()
def held_out_nll(model, blocks, collator, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) over packed held-out blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = collator([blocks[i] for i in range(start, min(start + batch_size, len(blocks)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, **fused_loss_kwargs(model))
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n  # the model's loss is the mean over these n positions
        count += n
    model.train(was_training)
    return total, count


def bits_per_char(nll_nats: float, chars: int) -> float:
    return nll_nats / math.log(2) / chars if chars else float("nan")
