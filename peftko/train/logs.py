"""Where a run is logged: metrics.jsonl, progress events (the command line shows them as a bar on a
terminal, plain lines in a file), TensorBoard and W&B inside the run folder."""

from __future__ import annotations

import json
import netrc
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from peftko.core.config import report_targets
from peftko.core.progress import Finished, Started, Tracker, emit, say


PHASE, EVAL_PHASE = "train", "evaluate"


class MetricsFile(TrainerCallback):
    """One JSON object per log in OUTPUT/metrics.jsonl: step, loss, lr, tokens seen (and eval)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # every rank logs the same (reduced) numbers
            return
        record = log_record(state, logs or {})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def log_record(state, logs: dict) -> dict:
    record = {"step": state.global_step}
    renames = {"learning_rate": "lr", "num_input_tokens_seen": "tokens_seen"}
    for k, v in logs.items():
        if k in ("total_flos",):
            continue
        record[renames.get(k, k)] = v
    record.setdefault("tokens_seen", state.num_input_tokens_seen)
    return record


class TrainingProgress(TrainerCallback):
    """The training phase as progress events (peftko.core.progress): one Advanced event per step,
    carrying the log line when the step logs; the command line draws the bar or prints the lines."""

    def __init__(self):
        self.tracker: Tracker | None = None
        self.evaluating: Tracker | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.tracker = Tracker(PHASE, state.max_steps, "steps")
            self.tracker.done = state.global_step  # a resumed run starts where it stopped
            emit(Started(PHASE, state.max_steps, "steps"))
            self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.set(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tracker is not None and logs:
            self.tracker.set(state.global_step, format_log(state, logs, total=state.max_steps),
                             **log_record(state, logs))

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """The Trainer's evaluations during training: an "evaluate" phase counted in batches."""
        if self.tracker is None:
            return
        if self.evaluating is None:
            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.evaluating = Tracker(EVAL_PHASE, total, "batches")
            self.eval_start = time.monotonic()
            emit(Started(EVAL_PHASE, total, "batches"))
        self.evaluating.advance()

    def on_evaluate(self, args, state, control, **kwargs):
        if self.evaluating is not None:
            e = self.evaluating
            emit(Finished(EVAL_PHASE, e.done, e.total, e.unit, round(time.monotonic() - self.eval_start, 3)))
            self.evaluating = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            emit(Finished(PHASE, state.global_step, state.max_steps, "steps",
                          round(time.monotonic() - self.start, 3), ok=state.global_step >= state.max_steps))
            self.tracker = None


def format_log(state, logs: dict, total: int | None = None) -> str:
    if "train_runtime" in logs and "loss" not in logs:
        speed = state.num_input_tokens_seen / max(logs["train_runtime"], 1e-9)
        took = f"in {logs['train_runtime']:.0f} s, {speed:,.0f} tokens/s"
        if total and state.global_step < total:  # a stop: what was done, not "done"
            return f"stopped at step {state.global_step} of {total} {took}"
        return f"done: {state.global_step} steps {took}"
    # Without a bar, the line itself says how far the run is.
    parts = [f"step {state.global_step:>5}" + (f"/{total}" if total else "")]
    if "loss" in logs:
        parts.append(f"loss {logs['loss']:.4f}")
    if "eval_loss" in logs:
        parts.append(f"eval_loss {logs['eval_loss']:.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs and logs["grad_norm"] is not None:
        parts.append(f"grad_norm {float(logs['grad_norm']):.3f}")
    if state.num_input_tokens_seen:
        parts.append(f"tokens {int(state.num_input_tokens_seen):,}")
    return "  ".join(parts)


# --- where else the run is logged (report_to)
def prepare_wandb(output: Path) -> None:
    """W&B must never stop a run to ask for a key or wait on a network it cannot reach.

    Without a configured key or a reachable server it logs offline into OUTPUT/wandb, which
    `wandb sync` uploads later. Settings the user made (WANDB_MODE, WANDB_DIR, WANDB_PROJECT) win.
    """
    os.environ.setdefault("WANDB_DIR", str(Path(output).resolve()))
    os.environ.setdefault("WANDB_PROJECT", "peftko")
    if os.environ.get("WANDB_MODE"):
        return
    why = wandb_offline_reason()
    if why:
        os.environ["WANDB_MODE"] = "offline"
        say(f"wandb: {why}; logging offline to {Path(output) / 'wandb'} "
            "(upload later with `wandb sync`, or set WANDB_MODE=online)")


def wandb_offline_reason() -> str | None:
    """Why W&B cannot log online from here (no key, offline mode asked for, server unreachable), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    has_key = bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"))
    if not has_key:
        try:
            has_key = netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "no API key configured (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"{host} is not reachable"
    return None


def set_up_reporting(trainer, report_to: list[str] | str, output: Path) -> None:
    """TensorBoard event files go inside the run directory, not in the Trainer's default runs/DATE."""
    if "tensorboard" not in report_targets(report_to):
        return
    for callback in trainer.callback_handler.callbacks:
        # logging_dir is None unless the user set TENSORBOARD_LOGGING_DIR, which then wins.
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(output) / "tensorboard")
