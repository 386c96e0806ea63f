"""Non-finite loss or gradients: skip the step, and stop a run that keeps diverging (exit 3)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from peftko.core.errors import TrainingDiverged
from peftko.core.progress import warn
from peftko.train.rerun import fresh_run_command


class NonFiniteGuard(TrainerCallback):
    """Skip an optimizer step whose gradients are not finite, and stop after max_bad steps in a row.

    Skipping = dropping the gradients before optimizer.step(): AdamW (torch and bitsandbytes)
    leaves a parameter with grad None untouched, moments and step count included. A NaN loss
    yields NaN gradients, so checking the gradients catches both, with one device sync per step.
    Under fp16 the GradScaler already skips overflowing steps and lowers its scale, and it needs
    the gradients to notice; there the guard only counts, so a run whose scale cannot recover
    still stops.
    """

    def __init__(self, max_bad: int, scaler_skips: bool = False):
        self.max_bad, self.scaler_skips = max_bad, scaler_skips
        self.in_a_row, self.skipped, self.bad_steps = 0, 0, []
        self.diverged = False
        self._bad = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        self._bad = bool(grads) and not torch.stack(torch._foreach_norm(grads)).isfinite().all().item()
        if self._bad and not self.scaler_skips:
            for p in model.parameters():
                p.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        if not self._bad:
            self.in_a_row = 0
            return control
        self._bad = False
        self.in_a_row += 1
        self.skipped += 1
        self.bad_steps.append(state.global_step)
        warn(f"step {state.global_step}: non-finite loss or gradients, step skipped "
             f"({self.in_a_row} in a row; stopping at {self.max_bad})")
        if self.in_a_row >= self.max_bad:
            self.diverged = True
            control.should_training_stop = True
        return control

    def diverged_error(self, lr: float, embedding_lr: float, output: Path, checkpoint: Path | None) -> TrainingDiverged:
        first, last = self.bad_steps[-self.in_a_row], self.bad_steps[-1]
        kept = (f"The last checkpoint, {checkpoint}, holds the parameters of the last good step "
                "(skipped steps change nothing)." if checkpoint else
                "No checkpoint was written (set --save-steps to keep one).")
        return TrainingDiverged(
            f"training stopped: steps {first}-{last} ({self.in_a_row} in a row) had non-finite loss or "
            f"gradients. {kept}\nLikely causes:\n"
            f"  - the learning rate is too high (lr {lr:g}, embedding_lr {embedding_lr:g}): "
            "try a tenth of it\n"
            "  - fp16 overflow (GPUs without bf16): a lower learning rate, or --max-grad-norm 1.0\n"
            "  - a corrupt or unusual document in the corpus (check `peftko markers` on it)\n"
            f"Start again with a lower rate, in a new folder (a resume keeps the rate its checkpoint was "
            f"written with): {lower_rate_command(output, lr, embedding_lr)}"
        )


def lower_rate_command(output: Path, lr: float, embedding_lr: float) -> str:
    """A fresh run at a tenth of both rates into OUTPUT-lrX: lr is not a resumable setting, and --force on
    a resume would switch off the check that config, corpus and base are unchanged."""
    lower = f"{lr / 10:g}"
    return fresh_run_command(output, output.with_name(f"{output.name}-lr{lower}"),
                             {"--lr": lower, "--embedding-lr": f"{embedding_lr / 10:g}"})


def check_finite_parameters(model, lr: float, embedding_lr: float, last_loss: float | None = None) -> None:
    """A run whose trainable parameters ended NaN or inf (a step that was finite itself but
    overshot, e.g. lr 1e30) never exits 0 and never writes its adapter. Values can also end finite
    yet so large that every forward overflows: `last_loss` is the loss the ended model gives on a
    training block, measured when the run ended on skipped steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    bad = sum(int((~p.isfinite()).sum()) for p in trainable)
    if bad:
        total = sum(p.numel() for p in trainable)
        what = f"{bad:,} of {total:,} trainable values NaN or inf"
    elif last_loss is not None and not math.isfinite(last_loss):
        what = f"a model whose loss on a training block is {last_loss} (NaN or inf)"
    else:
        return
    raise TrainingDiverged(
        f"training ended with {what}, so no adapter was written (a previous one in --output is "
        f"untouched). The learning rate is likely too high (lr {lr:g}, embedding_lr {embedding_lr:g}): "
        "try a tenth of it, in a new --output."
    )
