"""Measured GPU memory of a run: the peak while loading and the peak while training, read apart.

torch's caching allocator keeps one high-water mark per device; resetting it after the load lets
the training peak stand on its own, as `--dry-run` predicts the two (peftko.model.memory_plan). On a
CPU there is nothing to read and every function returns None.
"""

from __future__ import annotations

import torch

GIB = 1024**3


def peak_gib(device: torch.device) -> float | None:
    """The most memory torch's allocator held for tensors on DEVICE since the last reset, in GiB."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
