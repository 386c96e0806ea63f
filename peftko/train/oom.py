"""CUDA out of memory: one message with the sizes tried and what to change, instead of a traceback."""

from __future__ import annotations

import contextlib

import torch

from peftko.core.config import MemoryLevers
from peftko.core.errors import UserError
from peftko.train.rerun import dry_run_command


@contextlib.contextmanager
def translate_oom(levers: MemoryLevers, phase: str):
    """torch.OutOfMemoryError -> one UserError with the sizes tried and what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(oom_message(levers, phase)) from None


def oom_message(levers: MemoryLevers, phase: str) -> str:
    steps = []
    if levers.batch_size > 1:
        steps.append(f"--batch-size {levers.batch_size // 2} --grad-accum {levers.grad_accum * 2} "
                     "(same tokens per step, less memory)")
    steps.append(f"--seq-len {max(64, levers.seq_len // 2)} (shorter blocks)")
    if levers.quant != "4bit":
        steps.append("--quant 4bit (NF4 base weights, a quarter of bf16)")
    if not levers.gradient_checkpointing:
        steps.append("--gradient-checkpointing (recompute activations instead of storing them)")
    elif not levers.offload_checkpoints:
        steps.append("--offload-checkpoints (the checkpointed hidden states in CPU memory; slower)")
    steps.append("close other programs using the GPU (nvidia-smi lists them)")
    steps.append(f"see the memory estimate first: {dry_run_command()}")
    tried = (f"seq_len {levers.seq_len}, batch_size {levers.batch_size}, grad_accum {levers.grad_accum}, "
             f"quant {levers.quant}, gradient checkpointing {'on' if levers.gradient_checkpointing else 'off'}")
    return (f"out of GPU memory while {phase} ({tried}). Try, one at a time:\n"
            + "\n".join(f"  - {s}" for s in steps))
