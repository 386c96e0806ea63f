"""The training step: LoRA + marker rows on the base, driven by transformers' Trainer.

This module is the one training path: `peftko lora-train` and `benchmarks/recipes.py` both call
`make_trainer`, so the benchmark measures what users run.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from peftko.core import distributed
from peftko.core.atomic import describe_write_failure, is_write_failure
from peftko.core.config import StepSettings, report_targets
from peftko.core.errors import UserError
from peftko.model.adapters import TOKEN_ROW_PARAM
from peftko.model.kernels import fused_loss_kwargs
from peftko.model.quantized import quantized_layers_kept
from peftko.run.checkpoints import latest_checkpoint, rotate, staged_checkpoint, step_of
from peftko.run.layout import METRICS
from peftko.train.logs import MetricsFile, prepare_wandb, TrainingProgress, set_up_reporting


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
        import bitsandbytes as bnb  # only here: importing it compiles its CPU kernels (seconds)

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def steps_per_epoch(steps: StepSettings, n_blocks: int, processes: int = 1) -> int:
    """Optimizer steps in one pass over the training blocks, as the Trainer takes them: each process
    reads its share in batches, and the last step of a pass takes the batches that are left (fewer
    than grad_accum when they do not divide evenly)."""
    batches = math.ceil(math.ceil(n_blocks / processes) / steps.batch_size)
    return max(1, math.ceil(batches / steps.grad_accum))


def planned_steps(steps: StepSettings, n_blocks: int, processes: int = 1) -> int:
    if steps.max_steps > 0:
        return steps.max_steps
    return max(1, math.ceil(steps_per_epoch(steps, n_blocks, processes) * steps.epochs))


def blocks_trained(steps: StepSettings, n_blocks: int, processes: int = 1) -> int:
    """The blocks the planned steps train, passes over the data counted whole (a pass reads each
    block once; data-parallel, a short share is padded with repeats, as the sampler does)."""
    per_epoch = steps_per_epoch(steps, n_blocks, processes)
    passes, rest = divmod(planned_steps(steps, n_blocks, processes), per_epoch)
    per_pass = math.ceil(n_blocks / processes) * processes
    return passes * per_pass + min(rest * steps.blocks_per_step * processes, per_pass)


MANY_PASSES = 3  # beyond this, a small corpus is being memorised rather than learned from


def passes_note(steps: StepSettings, n_blocks: int, processes: int = 1) -> str | None:
    """A line to print when --max-steps means many passes over a small corpus, else None."""
    planned, trained = planned_steps(steps, n_blocks, processes), blocks_trained(steps, n_blocks, processes)
    passes = trained / max(n_blocks, 1)
    if steps.max_steps <= 0 or passes <= MANY_PASSES:
        return None
    return (f"note: {planned} steps train {trained:,} blocks = {passes:.1f} passes over {n_blocks} training "
            f"block{'s' if n_blocks != 1 else ''}; this many passes over a small corpus can memorise it "
            "(watch the held-out eval_loss, or lower --max-steps)")


def short_data_note(steps: StepSettings, n_blocks: int, processes: int = 1) -> str | None:
    """A line to print when the training set is smaller than one step's batch, else None: every step
    then trains the whole set, fewer blocks than configured."""
    per_step = steps.blocks_per_step * processes
    if n_blocks >= per_step:
        return None
    split = f"batch_size {steps.batch_size} x grad_accum {steps.grad_accum}" + (
        f" x {processes} processes" if processes > 1 else "")
    trains = "that one block" if n_blocks == 1 else f"all {n_blocks} of them"
    return (f"note: the training set holds {n_blocks} block{'s' if n_blocks != 1 else ''}, fewer than the "
            f"{per_step} a step takes ({split}): every step trains {trains}. Add text, or lower --batch-size "
            "or --grad-accum to match")


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0 = the first), as a fraction of the peak.

    transformers' warmup starts at 0: the first step of every run changed nothing. Here the warmup's
    step i runs at (i + 1) / (warmup + 1), so the first is above 0 and the peak comes right after the
    warmup, as before; after it, the cosine or linear decay is transformers' own, which never reaches 0
    on a step that runs. "constant" has no warmup, as in transformers."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(cfg, total: int) -> int:
    return 0 if cfg.scheduler == "constant" else math.ceil(cfg.warmup_ratio * total)


def warmup_note(cfg, n_blocks: int, processes: int = 1) -> str | None:
    """A line to print before loading when every planned step is a warmup step (a short run, or
    num_epochs: 1 on a small corpus): the learning rate never reaches the configured one."""
    total = planned_steps(cfg.steps(), n_blocks, processes)
    warm = warmup_steps(cfg, total)
    if warm < total:
        return None
    top = cfg.lr * lr_factor(total - 1, kind=cfg.scheduler, warmup=warm, total=total)
    return (f"note: all {total} planned step{'s' if total != 1 else ''} are warmup steps (warmup_ratio "
            f"{cfg.warmup_ratio:g} of {total} = {warm}): the learning rate rises to {top:.2e} at most, not lr "
            f"{cfg.lr:g}. Train more steps (--max-steps, --epochs) or lower --warmup-ratio")


def checkpointing_kwargs(offload_checkpoints: bool, precision) -> dict:
    """offload: transformers holds each layer's checkpointed input in pinned host memory; a GPU's
    only: on the CPU there is nothing to move, and no pinned allocator."""
    return {"use_reentrant": False, "offload": offload_checkpoints and precision.device.type == "cuda"}


def training_arguments(cfg, precision, output: Path, n_blocks: int, has_eval: bool) -> TrainingArguments:
    steps = planned_steps(cfg.steps(), n_blocks, distributed.world_size())
    return TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=warmup_steps(cfg, steps),
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device.type == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs=checkpointing_kwargs(cfg.offload_checkpoints, precision),
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


class PeftkoTrainer(Trainer):
    """The Trainer with two changes to checkpoints: adapter-only, and never half-written.

    - The adapter is saved with save_embedding_layers=False: peft's default ("auto") writes the
      FULL embedding matrices once the vocabulary was resized (1 GB a checkpoint for an 8B base),
      while the marker rows are already in the adapter file as trainable-token deltas.
    - Each checkpoint is written into a hidden staging folder and renamed in (peftko.run.checkpoints),
      and a write error becomes a UserError naming the folder: the Trainer itself writes straight
      into checkpoint-N, so a crash mid-save would leave a checkpoint --resume could pick up.
    """

    _staging: Path | None = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The schedule of lr_factor: a warmup whose first step already moves the model."""
        if self.lr_scheduler is None:
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, partial(
                lr_factor, kind=str(self.args.lr_scheduler_type.value), total=num_training_steps,
                warmup=self.args.get_warmup_steps(num_training_steps)))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Liger's fused loss still builds full logits in eval mode unless told not to.
        if not model.training:
            inputs = {**inputs, **fused_loss_kwargs(model)}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        # Evaluating must not change the 4-bit layers that training goes on with (peftko.model.quantized).
        with quantized_layers_kept(self.model):
            return super().evaluate(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Trainer.train, except for a checkpoint already at max_steps (a stop after the last
        step, or a shortened run): Trainer.train would run one more step when that checkpoint
        falls inside an epoch, so the checkpoint is loaded and no step runs."""
        if resume_from_checkpoint is None or step_of(Path(resume_from_checkpoint)) < self.args.max_steps:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
        self.state.max_steps = self.args.max_steps  # the shortened total, not the checkpoint's
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
        latest = latest_checkpoint(Path(self.args.output_dir))
        if latest is None or step_of(latest) != self.state.global_step:
            self._save_checkpoint(self.model, None)


def checkpoint_write_error(output: Path, step: int, e: Exception) -> UserError:
    previous = latest_checkpoint(output)
    # --resume only when there is a checkpoint to resume from: without one it would be refused.
    then = (f"the previous checkpoint {previous.name} is intact. Free space, then resume with --resume."
            if previous else "no earlier checkpoint exists, so there is nothing to resume: free space and run the "
            "same command again with --force, which replaces only what this run wrote.")
    return UserError(f"could not write checkpoint-{step} in {output}: {describe_write_failure(e)} "
                     f"(disk full?); {then}")


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
        callbacks=[MetricsFile(Path(output) / METRICS), *callbacks],
    )
    set_up_reporting(trainer, cfg.report_to, output)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # the Trainer's choice when tqdm is disabled
    trainer.add_callback(TrainingProgress())
    return trainer
