"""The `lora-train --dry-run` table: the memory plan (peftko.model.memory_plan) for this config,
printed before any weight is loaded."""

from __future__ import annotations

from pathlib import Path

from peftko.core.config import StepSettings, TrainConfig
from peftko.core.progress import say
from peftko.model.base import Precision
from peftko.model.fused_loss import PLAIN_HEAD_TYPES
from peftko.model.kernels import liger_would_apply
from peftko.model.memory_plan import (ALLOCATOR_SLACK, CARD_OVERHEAD_GIB, CARDS_GIB, GIB, MemoryPlan, ModelShape,
                                      checkpoint_stats, plan_memory, read_config, shape_from_config)

UNKNOWN_MARKER_COUNT = 8  # planned for when the markers are not known yet


def echo_plan(cfg: TrainConfig, model_path: Path, precision: Precision, markers: list[str] | None = None,
              processes: int = 1) -> MemoryPlan | None:
    """Print the predicted GPU peak for this model, quantization, seq_len and batch; loads no weights.

    On a CUDA device the plan is for that device's dtype, with Liger when it would be applied. On the
    CPU the question a user asks is still "will it fit my card", so the table is for a CUDA card in
    bf16, and one line gives the RAM this CPU run needs.
    """
    shape = _shape(model_path)
    if shape is None:
        return None
    n_markers = len(markers) if markers is not None else (
        len(cfg.markers) if isinstance(cfg.markers, list) else UNKNOWN_MARKER_COUNT)
    stats = checkpoint_stats(model_path)
    kwargs = _plan_kwargs(cfg, shape, n_markers, stats, processes)
    on_cuda = precision.device.type == "cuda"
    dtype = precision.dtype_name if on_cuda else "bfloat16"
    liger = liger_would_apply(cfg.liger, precision.device.type, shape.model_type)
    plan = plan_memory(shape, compute_bytes=_dtype_bytes(dtype), liger=liger, **kwargs)
    lines = [_heading(precision, dtype, processes), _model_line(shape, stats, n_markers),
             *_table(plan, cfg, shape, dtype, n_markers, liger)]
    if not plan.fused_ce and cfg.liger != "off":
        fused = plan_memory(shape, compute_bytes=_dtype_bytes(dtype), liger=True, **kwargs)
        lines.append(f"with Liger kernels (pip install 'peftko[gpu]', CUDA): training peak {fused.peak_gib:.2f} GiB, "
                     f"evaluation {fused.evaluation_gib:.2f} GiB, fits in {_verdicts(fused)}")
    if not on_cuda:
        ram = plan_memory(shape, compute_bytes=_dtype_bytes(precision.dtype), liger=False, **kwargs)
        lines.append(f"this run is on the CPU ({str(precision.dtype).replace('torch.', '')}): "
                     f"about {max(ram.peak, ram.loading) / GIB:.1f} GiB of RAM" + _cpu_warning(shape, cfg))
    lines += fit_lines(plan, cfg, shape, _dtype_bytes(dtype), liger, kwargs)
    if processes > 1 or cfg.max_steps > 0:
        lines.append(batch_line(cfg.steps(), processes))
    if stats and abs(stats[0] - shape.total_params) > 0.05 * stats[0]:
        lines.append(f"note: config.json implies {shape.total_params:,} parameters but the checkpoint holds "
                     f"{stats[0]:,}; this architecture may not be modelled well, treat the plan as rough")
    for line in lines:
        say(line)
    return plan


CPU_PRACTICAL_PARAMS = 1e9  # above this, a CPU run is a plan for a GPU, not a run to wait for


def _cpu_warning(shape: ModelShape, cfg: TrainConfig) -> str:
    """Training costs about 6 FLOPs per parameter and token (forward and backward): say what that
    means for a step of this model, which on a CPU is a matter of hours, not seconds."""
    if shape.total_params < CPU_PRACTICAL_PARAMS:
        return ""
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    return (f"; but one step of {tokens:,} tokens is about {6 * shape.total_params * tokens:.1e} floating-point "
            f"operations for {shape.total_params / 1e9:.1f} B parameters, far too slow on a CPU: plan the run "
            "for a CUDA card (the table above)")


def _shape(model_path: Path) -> ModelShape | None:
    try:
        return shape_from_config(read_config(model_path))
    except (KeyError, TypeError, ValueError) as e:
        say(f"memory plan: config.json does not give the model's shape ({type(e).__name__}: {e}); "
            "no prediction for this architecture")
        return None


def _plan_kwargs(cfg: TrainConfig, shape: ModelShape, n_markers: int, stats, processes: int) -> dict:
    """plan_memory's arguments from the config, the same whatever the compute dtype and kernels."""
    return dict(
        quant=cfg.quant, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lora_r=cfg.lora_r,
        target_modules=cfg.target_modules, marker_rows=n_markers,
        gradient_checkpointing=cfg.gradient_checkpointing, offload_checkpoints=cfg.offload_checkpoints,
        optimizer=cfg.optimizer, largest_tensor_bytes=stats[1] if stats else None, processes=processes,
        liger_forward=shape.model_type not in PLAIN_HEAD_TYPES,
    )


def _heading(precision: Precision, dtype: str, processes: int) -> str:
    on_cuda = precision.device.type == "cuda"
    where = f"on {precision.device}" if on_cuda else "for a CUDA card"
    if processes > 1:
        where = f"per card, {processes} data-parallel processes ({'cuda' if on_cuda else 'CUDA cards'})"
    return f"memory plan {where}, {dtype} (from config.json; no weights loaded):"


def _model_line(shape: ModelShape, stats, n_markers: int) -> str:
    params = f"{shape.total_params / 1e9:.2f} B parameters"
    if stats:
        params += f" ({stats[0] / 1e9:.2f} B in the safetensors headers)"
    return (f"  model       {shape.model_type}, {params}, {shape.layers} layers, hidden {shape.hidden}, "
            f"vocab {shape.vocab:,} + {n_markers} markers, {'tied' if shape.tied else 'untied'}")


def _table(plan: MemoryPlan, cfg: TrainConfig, shape: ModelShape, dtype: str, n_markers: int,
           liger: bool) -> list[str]:
    """One line per part of the peak, then the verdict for common cards."""
    quant_name = {"4bit": "NF4", "8bit": "LLM.int8", "none": dtype}[cfg.quant]
    adam = "8-bit AdamW" if cfg.optimizer == "paged_adamw_8bit" else "AdamW"
    ckpt = "one hidden state per layer (gradient checkpointing)" if cfg.gradient_checkpointing else \
        "every layer's activations (no gradient checkpointing)"
    if plan.pinned:
        ckpt = f"the hidden states checkpointed in CPU memory ({plan.pinned / GIB:.2f} GiB of pinned RAM)"
    logits = f"{cfg.batch_size} x {cfg.seq_len} x {shape.vocab + n_markers:,}"
    loss = (f"fused linear cross-entropy (Liger): no {logits} logits" if plan.fused_ce
            else f"{logits} logits, their fp32 copy and gradient")
    lines = [
        f"  weights     {_gib(plan.weights)}  decoder linears in {quant_name}, embeddings in {dtype}",
        f"  trainable   {_gib(plan.trainable)}  {plan.trainable_params:,} parameters (LoRA r={cfg.lora_r} "
        f"+ marker rows) in fp32 + {adam} states",
        f"  activations {_gib(plan.checkpoints + plan.layer_backward)}  {ckpt} + one layer in backward",
        f"  logits      {_gib(plan.loss_step)}  {loss}",
    ]
    if plan.ddp_buckets:
        lines.append(f"  ddp         {_gib(plan.ddp_buckets)}  DDP gradient buckets (the trainable gradients once more)")
    return lines + [
        f"  peak        {_gib(plan.peak)}  training (activations and logits are not all alive at once)",
        f"  loading     {_gib(plan.loading)}  while loading and resizing (estimate)",
        f"  evaluation  {_gib(plan.evaluation)}  held-out loss, batch {cfg.batch_size}, no gradients"
        + ("" if liger else ", full logits"),
        f"fits in {_verdicts(plan)}  (counting {ALLOCATOR_SLACK:.0%} allocator slack and "
        f"{CARD_OVERHEAD_GIB:.0f} GiB for the CUDA context)",
    ]


MIN_SEQ_LEN_SUGGESTED = 256  # shorter blocks cut most books mid-scene; below this, no suggestion


def fit_lines(plan: MemoryPlan, cfg: TrainConfig, shape: ModelShape, compute_bytes: int, liger: bool,
              kwargs: dict) -> list[str]:
    """For each card the plan does not fit, the smallest single changes that would make it fit,
    each with its predicted training peak: a shorter sequence, Liger, offloaded checkpoints, a
    smaller batch (with more accumulation, so the step trains as many blocks)."""
    lines = []
    for card in CARDS_GIB:
        if plan.fits(card):
            continue
        kinds = _changes(cfg, shape, compute_bytes, liger, kwargs)
        fitting = [next(((flag, p) for flag, p in kind if p.fits(card)), None) for kind in kinds]
        changes = [f"{flag} ({p.peak_gib:.2f} GiB)" for flag, p in filter(None, fitting)]
        lines.append(f"to fit {card} GiB: " + (", or ".join(changes) if changes else
                                               "no single change of sequence length, Liger, offloaded "
                                               "checkpoints or batch is enough; use a bigger card or a smaller base"))
    return lines


def _changes(cfg: TrainConfig, shape: ModelShape, compute_bytes: int, liger: bool,
             kwargs: dict) -> list[list[tuple[str, MemoryPlan]]]:
    """Each kind of change as (flag, plan) from the smallest change to the largest: the caller keeps
    the first of each kind that fits."""
    def plan(**changed) -> MemoryPlan:
        return plan_memory(shape, compute_bytes=compute_bytes, **{"liger": liger, **kwargs, **changed})

    seq_len = cfg.seq_len // 2
    seq_plans = []
    while isinstance(cfg.seq_len, int) and seq_len >= MIN_SEQ_LEN_SUGGESTED:
        seq_plans.append((f"--seq-len {seq_len}", plan(seq_len=seq_len)))
        seq_len //= 2
    batch, batch_plans = cfg.batch_size // 2, []
    while batch >= 1:
        accum = cfg.grad_accum * cfg.batch_size // batch
        batch_plans.append((f"--batch-size {batch} --grad-accum {accum}", plan(batch_size=batch)))
        batch //= 2
    kinds = [seq_plans, batch_plans]
    if not liger and cfg.liger != "off":
        kinds.append([("--liger on (pip install 'peftko[gpu]', CUDA)", plan(liger=True))])
    if cfg.gradient_checkpointing and not cfg.offload_checkpoints:
        kinds.append([("--offload-checkpoints", plan(offload_checkpoints=True))])
    return kinds


def batch_line(steps: StepSettings, processes: int) -> str:
    """The global batch and what it does to the step count: N processes take N batches a step."""
    per_step = steps.blocks_per_step * processes
    line = (f"global batch: {steps.batch_size} x {steps.grad_accum} accumulation x {processes} "
            f"process{'es' if processes > 1 else ''} = {per_step} blocks of {steps.seq_len} tokens "
            f"({per_step * steps.seq_len:,} tokens) a step")
    if steps.max_steps > 0:
        return line + f"; --max-steps {steps.max_steps}: {steps.max_steps * per_step:,} blocks in all"
    return line + (f"; {steps.epochs:g} epoch(s) take 1/{processes} of the steps one process would"
                   if processes > 1 else "")


def _verdicts(plan: MemoryPlan) -> str:
    return ", ".join(f"{g} GiB: {'yes' if plan.fits(g) else 'no'}" for g in CARDS_GIB)


def _gib(x: float) -> str:
    return f"{x / GIB:6.2f} GiB"


def _dtype_bytes(dtype) -> int:
    return 4 if str(dtype).endswith("float32") else 2
