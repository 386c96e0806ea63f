"""Fast kernels on CUDA: Liger's fused linear cross-entropy, RMSNorm, RoPE and SwiGLU.

Why: once the frozen weights stay in bf16 and only token rows train, the full-vocabulary logits
(batch x seq_len x 128k) dominate the peak; Liger's fused linear cross-entropy (FLCE) computes
the loss chunk by chunk and never materialises them (22.7 -> 10.4 GiB on the Llama-3-8B shape,
benchmarks/RESULTS.md), and its RMSNorm/RoPE/SwiGLU keep fewer activations.

liger-kernel is optional (`pip install 'peftko[gpu]'`, it needs triton and a CUDA card). It is
probed with find_spec and imported only here, so peftko imports and trains without it; with
`liger: auto` a missing liger-kernel or a CPU run simply means no kernels (apply_fast_kernels
returns None), with `liger: on` it is an error the user can act on.

Marker rows and FLCE. peftko trains the marker rows of lm_head through peft's
`trainable_token_indices`: lm_head becomes a TrainableTokensWrapper that keeps the base matrix
frozen and a small delta for the listed rows, and multiplies by `base.index_copy(rows, delta)`.
Liger's FLCE does not call lm_head; it reads `lm_head.weight` and does the matmul itself. If that
attribute were the frozen base matrix, the marker rows would neither be used in the loss nor
learn. peft (0.17+) answers `wrapper.weight` with the merged, differentiable matrix, which is
exactly what the module multiplies by; `fused_loss_sees_token_rows` checks this on the live
model (a gradient must reach every delta through `lm_head.weight`) before FLCE is enabled, and
FLCE stays off (the other kernels still apply) when it does not hold, with a note saying so.
Cost: FLCE's weight gradient is a full V x H matrix in the compute dtype (1 GiB on the 8B
shape) from which index_copy's backward keeps the marker rows. That is why, for the common
architectures (fused_loss.PLAIN_HEAD_TYPES), peftko computes the loss itself with Liger's fused
kernel on the frozen matrix and adds the marker rows' gradient apart (peftko/model/fused_loss.py); Liger's
own fused forward is used only for the other architectures it supports.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from importlib.util import find_spec

import torch

from peftko.core.errors import UserError
from peftko.model import fused_loss
from peftko.model.token_rows import active_token_names, token_rows_layer

KERNEL_NAMES = {
    "fused_linear_cross_entropy": "fused linear cross-entropy",
    "rms_norm": "RMSNorm",
    "rope": "RoPE",
    "swiglu": "SwiGLU",
}
INSTALL_HINT = "pip install 'peftko[gpu]' (liger-kernel; needs triton and a CUDA card)"


def liger_installed() -> bool:
    return find_spec("liger_kernel") is not None and find_spec("triton") is not None


def _liger_apply_functions() -> dict | None:
    """Liger's model_type -> apply function table, or None when Liger cannot be imported."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # ImportError, or triton failing to initialise without a GPU
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def liger_would_apply(liger: str, device_type: str, model_type: str) -> bool:
    """Whether apply_fast_kernels would switch Liger on (used by the dry-run memory plan)."""
    if liger == "off" or device_type != "cuda" or not liger_installed():
        return False
    table = _liger_apply_functions()
    return bool(table) and model_type in table


# --- the weight lm_head really multiplies by

def fused_loss_sees_token_rows(lm_head) -> bool:
    """True when `lm_head.weight` (what Liger's fused loss reads) carries the trainable token rows:
    a gradient taken through it reaches every active delta. True when there are no token rows."""
    layer = token_rows_layer(lm_head)
    if layer is None:
        return True
    names = active_token_names(layer)
    deltas = [layer.trainable_tokens_delta[n] for n in names]
    deltas = [d for d in deltas if d.requires_grad]
    if not deltas:
        return True
    with torch.enable_grad():
        try:
            weight = lm_head.weight
        except AttributeError:
            return False
        if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
            return False
        rows = [torch.as_tensor(layer.token_indices[n], device=weight.device) for n in names]
        probe = sum(weight.index_select(0, r).float().sum() for r in rows)
        grads = torch.autograd.grad(probe, deltas, allow_unused=True)
    return all(g is not None and bool(torch.all(g != 0)) for g in grads)


# --- switching the kernels on

def _refuse_or_none(liger: str, message: str):
    if liger == "on":
        raise UserError(f"liger: on, but {message}")
    return None


def apply_fast_kernels(model, liger: str, precision) -> str | None:
    """Patch `model` (a PeftModel or a transformers model) with Liger kernels; a one-line description
    for the console, or None when nothing was applied (liger off, CPU, not installed, unsupported).

    `liger` is the config's setting: auto, on (a refusal when Liger cannot apply) or off.
    Call after attach_adapters (the lm_head check needs peft's wrapper) and before the Trainer is
    built. Idempotent: a second call returns the first description.
    """
    if liger == "off":
        return None
    if precision.device.type != "cuda":
        return _refuse_or_none(liger, "Liger's kernels need a CUDA device; use liger: auto or off on the CPU")
    if not liger_installed():
        return _refuse_or_none(liger, f"liger-kernel is not installed: {INSTALL_HINT}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done = getattr(base, "_peftko_kernels", None)
    if done is not None:
        return done
    table = _liger_apply_functions()
    if table is None:
        return _refuse_or_none(liger, "liger_kernel failed to import (check triton and the CUDA driver)")
    model_type = getattr(base.config, "model_type", None)
    if model_type not in table:
        return _refuse_or_none(liger, f"Liger has no kernels for model type {model_type!r}")
    own_loss = model_type in fused_loss.PLAIN_HEAD_TYPES  # peftko's loss; else Liger's fused forward
    liger_loss = not own_loss and fused_loss_sees_token_rows(base.get_output_embeddings())
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
              "fused_linear_cross_entropy": liger_loss}
    apply_fn = table[model_type]  # e.g. apply_liger_kernel_to_llama(..., model=instance)
    accepted = inspect.signature(apply_fn).parameters
    with _modeling_module_kept(base):
        apply_fn(model=base, **{k: v for k, v in wanted.items() if k in accepted})
    if own_loss:
        fused_loss.install(base)
    on = {key: wanted[key] and key in accepted for key in KERNEL_NAMES}
    on["fused_linear_cross_entropy"] |= own_loss
    description = "Liger kernels: " + (", ".join(label for key, label in KERNEL_NAMES.items() if on[key])
                                       or "none for this model")
    if not own_loss and not liger_loss and "fused_linear_cross_entropy" in accepted:
        description += (" (fused linear cross-entropy off: this peft version hides the trainable marker rows "
                        "of lm_head from it; full logits are computed)")
    base._peftko_kernels = description
    base._peftko_fused_ce = on["fused_linear_cross_entropy"]
    return description


@contextlib.contextmanager
def _modeling_module_kept(model):
    """Undo what a Liger apply function does to the whole modeling module, beyond `model`.

    Why: besides patching the instance, Liger rewrites the module (modeling_llama.LlamaRMSNorm,
    .LlamaMLP, .apply_rotary_pos_emb). Every model built later in the process would get triton
    kernels, and one on the CPU (a merge or eval after training, in the same process) fails with
    "Pointer argument cannot be accessed from Triton (cpu tensor?)". The classes are put back
    (this model's modules were patched one by one); a replaced function stays for this model's
    attention but dispatches by device: Liger's on CUDA tensors, the original elsewhere.
    """
    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    try:
        yield
    finally:
        for name, value in list(vars(module).items()):
            old = before.get(name)
            if value is old:
                continue
            if inspect.isfunction(old) and inspect.isfunction(value):
                setattr(module, name, _by_device(value, old))
            elif name in before:
                setattr(module, name, old)
            else:
                delattr(module, name)


def _by_device(on_cuda, elsewhere):
    @functools.wraps(elsewhere)
    def dispatch(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return (on_cuda if first is not None and first.is_cuda else elsewhere)(*args, **kwargs)

    return dispatch


def fused_ce_active(model) -> bool:
    """Whether apply_fast_kernels switched Liger's fused linear cross-entropy on for this model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "_peftko_fused_ce", False))


def fused_loss_kwargs(model) -> dict:
    """Extra forward() arguments that make evaluation use the fused loss too.

    Liger's patched forward computes full logits whenever the model is in eval mode, so a held-out
    pass at batch 4 x 2048 on a 128k vocabulary would need ~6 GiB more than training. Passing
    skip_logits=True with labels keeps evaluation on the fused loss (out.loss only, out.logits None).
    Empty when the fused loss is not active, where the argument would not be understood.
    """
    return {"skip_logits": True} if fused_ce_active(model) else {}
