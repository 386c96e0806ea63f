"""The training step: LoRA + marker rows on the base, driven by transformers' Trainer.

This module is the one training path: `peftko lora-train` and `benchmarks/recipes.py` both call
`attach_adapters` and `make_trainer`, so the benchmark measures what users run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from peftko import distributed
from peftko.config import report_targets
from peftko.token_rows import MarkerToken, trainable_token_indices

TOKEN_ROW_PARAM = "trainable_tokens_delta"


def lora_config(model, cfg, tokens: list[MarkerToken]):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        trainable_token_indices=trainable_token_indices(model, tokens) if tokens else None,
        task_type="CAUSAL_LM",
    )


def check_target_modules(model_path: Path, cfg) -> None:
    """Refuse LoRA target names the base does not have, naming the ones it does (before any load)."""
    if cfg.target_modules == "all-linear":
        return
    from peftko.base_model import linear_layer_names
    from peftko.errors import UserError

    names = linear_layer_names(model_path, cfg.trust_remote_code)
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise UserError(f"target_modules: {', '.join(missing)} not found in {model_path.name}; its linear "
                        f"layers are {', '.join(sorted(names))} (or use all-linear)")


def attach_adapters(model, cfg, tokens: list[MarkerToken]):
    """Wrap the base with LoRA + marker rows. Frozen weights keep their dtype; trainables are fp32.

    Deliberately NOT prepare_model_for_kbit_training: its fp32 upcast of every frozen tensor makes
    activations fp32 and costs 2.8x speed (benchmarks/RESULTS.md) for no gain in a bf16 compute path.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, cfg, tokens))
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def param_groups(peft_model, cfg) -> list[dict]:
    rows, lora = [], []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            (rows if TOKEN_ROW_PARAM in name else lora).append(p)
    groups = [{"params": lora, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if rows:
        # The marker rows get their own rate and never decay toward zero (they are whole rows).
        groups.append({"params": rows, "lr": cfg.embedding_lr, "weight_decay": 0.0})
    return groups


def make_optimizer(peft_model, cfg, device: torch.device):
    groups = param_groups(peft_model, cfg)
    if cfg.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def planned_steps(cfg, n_blocks: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(n_blocks / (cfg.batch_size * cfg.grad_accum)))
    return max(1, math.ceil(per_epoch * cfg.epochs))


MANY_PASSES = 3  # beyond this, a small corpus is being memorised rather than learned from


def passes_note(cfg, n_blocks: int) -> str | None:
    """A line to print when --max-steps means many passes over a small corpus, else None."""
    steps = planned_steps(cfg, n_blocks)
    passes = steps * cfg.batch_size * cfg.grad_accum / max(n_blocks, 1)
    if cfg.max_steps <= 0 or passes <= MANY_PASSES:
        return None
    return (f"note: {steps} steps x {cfg.batch_size * cfg.grad_accum} blocks = {passes:.1f} passes over "
            f"{n_blocks} training blocks; this many passes over a small corpus can memorise it "
            "(watch the held-out eval_loss, or lower --max-steps)")


def checkpointing_kwargs(cfg, precision) -> dict:
    """offload: transformers holds each layer's checkpointed input in pinned host memory; a GPU's
    only: on the CPU there is nothing to move, and no pinned allocator."""
    return {"use_reentrant": False, "offload": cfg.offload_checkpoints and precision.device.type == "cuda"}


def training_arguments(cfg, precision, output: Path, n_blocks: int, has_eval: bool) -> TrainingArguments:
    steps = planned_steps(cfg, n_blocks)
    return TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device.type == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs=checkpointing_kwargs(cfg, precision),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        # eval_steps 0 means only at the end: the Trainer evaluates the last step whatever the interval,
        # so that evaluation is logged (metrics.jsonl, TensorBoard, W&B) like every other one.
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit or None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_targets(cfg.report_to),
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="all",
        dataloader_num_workers=0,
        # Data-parallel: every trainable (LoRA, marker rows) takes part in every forward, so DDP
        # need not walk the graph for unused ones each step.
        ddp_find_unused_parameters=False,
    )


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


class ReadableProgress(ProgressCallback):
    """The Trainer's progress bar, with log lines a person can read instead of dict reprs."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # a second bar for a few eval batches only garbles the first one

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        self.training_bar.write(format_log(state, logs))


class PlainLogLines(TrainerCallback):
    """One line per log and no bar: what `peftko lora-train ... > train.log` should hold.

    A bar redraws itself with carriage returns, which a file keeps, tangled with the step lines.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            click.echo(format_log(state, logs, total=state.max_steps))


def progress_callback() -> TrainerCallback:
    """The bar only when both streams are terminals: tqdm draws on stderr, the log lines go to stdout."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return ReadableProgress()
    return PlainLogLines()


def format_log(state, logs: dict, total: int | None = None) -> str:
    if "train_runtime" in logs and "loss" not in logs:
        speed = state.num_input_tokens_seen / max(logs["train_runtime"], 1e-9)
        return f"done: {state.global_step} steps in {logs['train_runtime']:.0f} s, {speed:,.0f} tokens/s"
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


class PeftkoTrainer(Trainer):
    """The Trainer with two changes to checkpoints: adapter-only, and never half-written.

    - The adapter is saved with save_embedding_layers=False: peft's default ("auto") writes the
      FULL embedding matrices once the vocabulary was resized (1 GB a checkpoint for an 8B base),
      while the marker rows are already in the adapter file as trainable-token deltas.
    - Each checkpoint is written into a hidden staging folder and renamed in (peftko.checkpoints),
      and a write error becomes a UserError naming the folder; transformers 5.23 writes straight
      into checkpoint-N, so a crash mid-save would leave a checkpoint --resume could pick up.
    """

    _staging: Path | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Liger's fused loss still builds full logits in eval mode unless told not to.
        if not model.training:
            from peftko.kernels import fused_loss_kwargs

            inputs = {**inputs, **fused_loss_kwargs(model)}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        # Evaluating must not change the 4-bit layers that training goes on with (peftko.evaluation).
        from peftko.evaluation import quantized_layers_kept

        with quantized_layers_kept(self.model):
            return super().evaluate(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Trainer.train, except for a checkpoint already at max_steps (a stop after the last
        step, or a shortened run): Trainer.train would run one more step when that checkpoint
        falls inside an epoch, so the checkpoint is loaded and no step runs."""
        from peftko.checkpoints import step_of

        if resume_from_checkpoint is None or step_of(Path(resume_from_checkpoint)) < self.args.max_steps:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, 0.0, {})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir, save_embedding_layers=False)

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, the Trainer's "run dir" is the staging folder.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from peftko.checkpoints import rotate, staged_checkpoint
        from peftko.run_dir import is_write_failure

        output, step = Path(self.args.output_dir), self.state.global_step
        info = {"epoch": self.state.epoch, "tokens_seen": int(self.state.num_input_tokens_seen or 0),
                "processes": self.args.world_size}
        try:
            with staged_checkpoint(output, step, info) as stage:
                self._staging = stage
                super()._save_checkpoint(model, trial)
            distributed.on_main(lambda: rotate(output, self.args.save_total_limit or 0))
        except Exception as e:
            if not is_write_failure(e):
                raise
            raise checkpoint_write_error(output, step, e) from None
        finally:
            self._staging = None

    def save_checkpoint_now(self) -> None:
        """A checkpoint of the current step, unless one exists (a stop after the last step).
        Data-parallel, every rank calls it: each sees the same checkpoints."""
        from peftko.checkpoints import latest_checkpoint, step_of

        latest = latest_checkpoint(Path(self.args.output_dir))
        if latest is None or step_of(latest) != self.state.global_step:
            self._save_checkpoint(self.model, None)


def checkpoint_write_error(output: Path, step: int, e: Exception):
    from peftko.checkpoints import latest_checkpoint
    from peftko.errors import UserError
    from peftko.run_dir import describe_write_failure

    previous = latest_checkpoint(output)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    return UserError(f"could not write checkpoint-{step} in {output}: {describe_write_failure(e)} "
                     f"(disk full?); {kept}. Free space, then resume with --resume.")


class BeforeFirstStep(TrainerCallback):
    """Calls `action` once the Trainer has loaded all it needs (a resumed checkpoint's weights,
    optimizer and schedule included), before the first step: a run that fails to start has
    rewritten nothing."""

    def __init__(self, action):
        self.action = action

    def on_train_begin(self, args, state, control, **kwargs):
        self.action()


def final_eval_loss(trainer) -> float:
    """The held-out loss after the last step, evaluating only if the Trainer has not just done so.

    With eval_steps set, the Trainer already evaluates at the last step; a second evaluate() would
    cost a pass over the held-out set and log the same number twice in metrics.jsonl.
    """
    for record in reversed(trainer.state.log_history):
        if "eval_loss" in record:
            if record.get("step") == trainer.state.global_step:
                return record["eval_loss"]
            break
    return trainer.evaluate()["eval_loss"]


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
        click.echo(f"wandb: {why}; logging offline to {Path(output) / 'wandb'} "
                   "(upload later with `wandb sync`, or set WANDB_MODE=online)")


def wandb_offline_reason() -> str | None:
    """Why W&B cannot log online from here (no key, offline mode asked for, server unreachable), or None."""
    import netrc
    import socket
    from urllib.parse import urlparse

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


def set_up_reporting(trainer, cfg, output: Path) -> None:
    """TensorBoard event files go inside the run directory, not in the Trainer's default runs/DATE."""
    if "tensorboard" not in report_targets(cfg.report_to):
        return
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        # logging_dir is None unless the user set TENSORBOARD_LOGGING_DIR, which then wins.
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(output) / "tensorboard")


def make_trainer(peft_model, cfg, precision, output: Path, train, val, collator, callbacks=()):
    args = training_arguments(cfg, precision, output, len(train), val is not None)
    if "wandb" in report_targets(cfg.report_to):
        prepare_wandb(output)
    trainer = PeftkoTrainer(
        model=peft_model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collator,
        optimizers=(make_optimizer(peft_model, cfg, precision.device), None),
        callbacks=[MetricsFile(Path(output) / "metrics.jsonl"), *callbacks],
    )
    set_up_reporting(trainer, cfg, output)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # the Trainer's choice when tqdm is disabled
    trainer.add_callback(progress_callback())
    return trainer
