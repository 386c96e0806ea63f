"""Held-out measures that stay comparable across tokenizers: bits per character.

Per-token perplexity changes when the tokenizer changes (and registering markers changes it);
bits per character does not: total negative log-likelihood of the held-out documents, in bits,
divided by their number of characters.

Every evaluation runs inside `quantized_layers_kept` (peftko.model.quantized), so measuring never
changes what is trained.
"""

from __future__ import annotations

import math

import torch

from peftko.core.progress import phase
from peftko.model.kernels import fused_loss_kwargs
from peftko.model.quantized import quantized_layers_kept


@torch.no_grad()
def held_out_nll(model, blocks, collator, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) over packed held-out blocks.

    With Liger's fused loss the model returns the loss alone, batch by batch. Without it the
    model returns full-vocabulary logits, and its own loss would copy them to fp32 at once
    (4 x 2048 x 128k: 6 GiB on a Llama-3 base, more than training needs): then one block at
    a time, the loss summed in chunks of positions (`_summed_nll`).
    """
    was_training = model.training
    model.eval()
    fused = fused_loss_kwargs(model)
    step = batch_size if fused else 1
    total, count = 0.0, 0
    with quantized_layers_kept(model), phase("evaluate", len(blocks), "blocks") as progress:
        for start in range(0, len(blocks), step):
            batch = collator([blocks[i] for i in range(start, min(start + step, len(blocks)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            if fused:
                out = model(**batch, **fused)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(out.loss) * n  # the model's loss is the mean over these n positions
            else:
                labels = batch.pop("labels")
                nll, n = _summed_nll(model(**batch).logits, labels)
                total += nll
            count += n
            progress.set(min(start + step, len(blocks)))
    model.train(was_training)
    return total, count


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> tuple[float, int]:
    """Next-token NLL summed over positions whose label is not -100, in fp32, `chunk` positions at
    a time: what a causal LM's loss computes, without an fp32 copy of every logit."""
    logits, labels = logits[:, :-1], labels[:, 1:].to(logits.device)
    total, count = 0.0, 0
    for s in range(0, logits.shape[1], chunk):
        part, target = logits[:, s:s + chunk].float(), labels[:, s:s + chunk]
        total += float(torch.nn.functional.cross_entropy(part.reshape(-1, part.shape[-1]), target.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total, count


def bits_per_char(nll_nats: float, chars: int) -> float:
    return nll_nats / math.log(2) / chars if chars else float("nan")
