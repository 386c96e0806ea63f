"""Held-out measures that stay comparable across tokenizers: bits per character.

Per-token perplexity changes when the tokenizer changes (and registering markers changes it);
bits per character does not: total negative log-likelihood of the held-out documents, in bits,
divided by their number of characters.

Every evaluation runs inside `quantized_layers_kept`, so measuring never changes what is trained.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from peftko.kernels import fused_loss_kwargs

# bitsandbytes' Linear4bit reads this attribute (set from a CPU probe when the layer is built).
_CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


@contextmanager
def quantized_layers_kept(model):
    """Leave every 4-bit layer exactly as it was, whatever bitsandbytes decides about the CPU.

    Why: on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weights in place
    for an inference-only kernel the first time the layer runs in eval mode without gradients,
    and keeps them so. Every later forward, training included, then takes that kernel, which has
    no autograd (LoRA gradients change; a biased linear fails at `result += bias`), and saving a
    checkpoint converts them back with a lossy inverse. So an evaluation before or during
    training would change the training itself, on some CPUs only.

    Two layers of defence: the layer's repack switch is turned off for the duration (no repack,
    no extra memory), and should a bitsandbytes version repack on some other trigger, the
    original 4-bit weight and quantization state (kept by reference, no copy) are put back.
    """
    saved = [_snapshot(m) for m in _linear4bit_layers(model)]
    for layer, *_ in saved:
        if hasattr(layer, _CPU_REPACK_FLAG):
            setattr(layer, _CPU_REPACK_FLAG, False)
    try:
        yield model
    finally:
        for snapshot in saved:
            _restore(*snapshot)


def _linear4bit_layers(model) -> list:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # an unquantized base on a machine without bitsandbytes
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _snapshot(layer) -> tuple:
    state = layer.weight.quant_state
    fields = dict(vars(state)) if state is not None else None
    return layer, getattr(layer, _CPU_REPACK_FLAG, None), layer.weight.data, state, fields


def _restore(layer, flag, data, state, fields) -> None:
    if flag is not None:
        setattr(layer, _CPU_REPACK_FLAG, flag)
    if layer.weight.data_ptr() != data.data_ptr():  # the repack allocates a new tensor
        layer.weight.data = data
    if state is not None:
        # The repack mutates the QuantState object in place (absmax, dtype, nested...): restore
        # its fields, keeping the object that the layer and its weight share.
        if not _fields_equal(vars(state), fields):
            vars(state).clear()
            vars(state).update(fields)
        layer.weight.quant_state = state


def _fields_equal(a: dict, b: dict) -> bool:
    # By identity: the repack replaces tensors, and tensors do not compare to a single bool.
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


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
    with quantized_layers_kept(model):
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
