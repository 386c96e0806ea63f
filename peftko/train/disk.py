"""Disk space for a run's output: checked before training, not found missing at the first save."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftko.core.errors import UserError

ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the trainable parameters


def output_bytes_needed(trainable: int, save_steps: int, save_total_limit: int, tokenizer_bytes: int,
                        planned_steps: int) -> int:
    """Peak bytes the output directory grows to: kept checkpoints + the one being written + final.

    A checkpoint is the adapter (4 bytes a parameter) plus the Adam moments plus ~1 MiB of
    scheduler, RNG and trainer state; the final adapter is staged beside the previous one.
    """
    adapter = 4 * trainable
    checkpoint = adapter * (1 + ADAM_STATES) + (1 << 20)
    final = adapter + tokenizer_bytes
    if save_steps:
        written = max(1, planned_steps // save_steps)
        kept = min(written, save_total_limit) if save_total_limit else written
    else:
        kept = 0  # only an interrupted run writes one
    return (kept + 1) * checkpoint + 2 * final


def tokenizer_bytes(model_path: Path) -> int:
    """What the base's tokenizer files take: the final adapter folder holds a copy of them."""
    return sum(f.stat().st_size for f in Path(model_path).glob("*token*") if f.is_file())


def check_disk_space(output: Path, need: int) -> None:
    output = Path(output)
    free = shutil.disk_usage(output).free
    reusable = _bytes_in(output)  # old checkpoints and a previous adapter are replaced as we go
    if free + reusable < need:
        raise UserError(
            f"not enough disk space in {output}: the adapter and checkpoints need about {_size(need)}, "
            f"{_size(free)} is free. Free space, choose another --output, or keep fewer checkpoints "
            "(--save-total-limit, --save-steps)."
        )


def _bytes_in(output: Path) -> int:
    return sum(f.stat().st_size for f in output.rglob("*") if f.is_file() and not f.name.startswith("."))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
