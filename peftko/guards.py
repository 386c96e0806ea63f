"""What keeps a long run from ending badly: signals, non-finite steps, out-of-memory, disk space.

Exit codes (documented in the README):
  2    bad input or environment, nothing more to do (UserError; includes CUDA out of memory and
       a full or unwritable output disk)
  3    training diverged: max_bad_steps non-finite steps in a row (TrainingDiverged)
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM (e.g. a preempted job): during training, a
       checkpoint was written after the current step and `--resume` continues from it; before
       training nothing was written; during the final save, the save completed (peftko.stopping)
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from peftko.errors import UserError

class TrainingDiverged(UserError):
    """Too many non-finite steps in a row: the user must change a setting (exit 3, no traceback)."""

    exit_code = 3


def resume_command(output: Path) -> str:
    """The command the user ran, with --resume: the same config and flags continue the same run."""
    args = sys.argv[1:]
    if args[:1] != ["lora-train"]:
        return f"peftko lora-train --output {shlex.quote(str(output))} <your config and flags> --resume"
    return "peftko " + shlex.join(args + ([] if "--resume" in args else ["--resume"]))


# --- SIGINT / SIGTERM (the handler and its phases: peftko.stopping)
class StopOnSignal(TrainerCallback):
    """In the train phase, a signal stops training at the end of the step, with a checkpoint."""

    def __init__(self, stopper):
        self.stopper = stopper

    def on_step_end(self, args, state, control, **kwargs):
        # Data-parallel, every rank stops after the same step, even if only one was signalled.
        if self.stopper.agreed():
            control.should_save = True
            control.should_training_stop = True
        return control


# --- non-finite loss or gradients
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
        print(f"step {state.global_step}: non-finite loss or gradients, step skipped "
              f"({self.in_a_row} in a row; stopping at {self.max_bad})", file=sys.stderr)
        if self.in_a_row >= self.max_bad:
            self.diverged = True
            control.should_training_stop = True
        return control

    def diverged_error(self, cfg, output: Path, checkpoint: Path | None) -> TrainingDiverged:
        first, last = self.bad_steps[-self.in_a_row], self.bad_steps[-1]
        kept = (f"The last checkpoint, {checkpoint}, holds the parameters of the last good step "
                "(skipped steps change nothing)." if checkpoint else
                "No checkpoint was written (set --save-steps to keep one).")
        return TrainingDiverged(
            f"training stopped: steps {first}-{last} ({self.in_a_row} in a row) had non-finite loss or "
            f"gradients. {kept}\nLikely causes:\n"
            f"  - the learning rate is too high (lr {cfg.lr:g}, embedding_lr {cfg.embedding_lr:g}): "
            "try a tenth of it\n"
            "  - fp16 overflow (GPUs without bf16): a lower learning rate, or --max-grad-norm 1.0\n"
            "  - a corrupt or unusual document in the corpus (check `peftko markers` on it)\n"
            f"Continue with a lower rate: {resume_command(output)} --force --lr {cfg.lr / 10:g}"
        )


def check_finite_parameters(model, cfg) -> None:
    """A run whose trainable parameters ended NaN or inf (a step that was finite itself but
    overshot, e.g. lr inf) never exits 0 and never writes its adapter."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    bad = sum(int((~p.isfinite()).sum()) for p in trainable)
    if bad:
        total = sum(p.numel() for p in trainable)
        raise TrainingDiverged(
            f"training ended with {bad:,} of {total:,} trainable values NaN or inf, so no adapter was "
            "written (a previous one in --output is untouched). The learning rate is likely too high "
            f"(lr {cfg.lr:g}, embedding_lr {cfg.embedding_lr:g}): try a tenth of it, in a new --output."
        )


# --- CUDA out of memory
@contextlib.contextmanager
def translate_oom(cfg, phase: str):
    """torch.OutOfMemoryError -> one UserError with the sizes tried and what to change."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg, phase)) from None


def oom_message(cfg, phase: str) -> str:
    steps = []
    if cfg.batch_size > 1:
        steps.append(f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2} "
                     "(same tokens per step, less memory)")
    steps.append(f"--seq-len {max(64, cfg.seq_len // 2)} (shorter blocks)")
    if cfg.quant != "4bit":
        steps.append("--quant 4bit (NF4 base weights, a quarter of bf16)")
    if not cfg.gradient_checkpointing:
        steps.append("--gradient-checkpointing (recompute activations instead of storing them)")
    elif not cfg.offload_checkpoints:
        steps.append("--offload-checkpoints (the checkpointed hidden states in CPU memory; slower)")
    steps.append("close other programs using the GPU (nvidia-smi lists them)")
    steps.append(f"see the memory estimate first: {_dry_run_command()}")
    tried = (f"seq_len {cfg.seq_len}, batch_size {cfg.batch_size}, grad_accum {cfg.grad_accum}, "
             f"quant {cfg.quant}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    return (f"out of GPU memory while {phase} ({tried}). Try, one at a time:\n"
            + "\n".join(f"  - {s}" for s in steps))


def _dry_run_command() -> str:
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--force")]
    if args[:1] != ["lora-train"]:
        return "peftko lora-train ... --dry-run"
    return "peftko " + shlex.join(args + ["--dry-run"])


# --- disk space
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 like the trainable parameters


def output_bytes_needed(trainable: int, cfg, tokenizer_bytes: int, planned_steps: int) -> int:
    """Peak bytes the output directory grows to: kept checkpoints + the one being written + final.

    A checkpoint is the adapter (4 bytes a parameter) plus the Adam moments plus ~1 MiB of
    scheduler, RNG and trainer state; the final adapter is staged beside the previous one.
    """
    adapter = 4 * trainable
    checkpoint = adapter * (1 + ADAM_STATES) + (1 << 20)
    final = adapter + tokenizer_bytes
    if cfg.save_steps:
        written = max(1, planned_steps // cfg.save_steps)
        kept = min(written, cfg.save_total_limit) if cfg.save_total_limit else written
    else:
        kept = 0  # only an interrupted run writes one
    return (kept + 1) * checkpoint + 2 * final


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
