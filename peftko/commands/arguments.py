"""The checks on a command's arguments that need no model: run before the command's module (and
torch) loads, so a slip answers at once. The click layer only parses; what the values mean is here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from peftko.core.errors import UserError

ABLATE_SAMPLES = 2  # ablate's continuations per held-out document when the config asks for none


def bench_tasks(tasks: str) -> tuple[str, ...]:
    """--tasks as task names, once each; lm-eval must be installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("bench needs EleutherAI's lm-evaluation-harness: pip install 'peftko[bench]'")
    names = tuple(dict.fromkeys(t.strip() for t in tasks.split(",") if t.strip()))
    if not names:
        raise UserError(f"--tasks {tasks!r} names no task; e.g. --tasks kobest_copa,haerae")
    return names


def include_path(path: str | None) -> Path | None:
    return Path(path).expanduser() if path else None


def ablate_output(output_flag: str | None, resume: bool = False, force: bool = False) -> None:
    """A config's output names a training run's folder (runs/demo): with three runs and a comparison
    written beside its files, `lora-train --force` would refuse that folder from then on. --resume
    (what a plain rerun does too) and --force (replace the variants) ask for opposite things."""
    if resume and force:
        raise UserError("--resume keeps what an interrupted ablate trained and --force replaces it: pass one")
    if output_flag is None:
        raise UserError("ablate needs --output DIR (it writes three runs and the comparison there)")


def ablate_sampling(samples: int | None, sample_tokens: int | None, cfg_samples: int,
                    cfg_sample_tokens: int) -> tuple[int, int]:
    """(samples, tokens) for ablate's structure score: the config's samples mean what they mean to
    lora-train (continuations per held-out document); its default 0 would leave ablate without a score."""
    return samples or cfg_samples or ABLATE_SAMPLES, sample_tokens or cfg_sample_tokens
