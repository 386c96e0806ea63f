"""4-bit layers that stay exactly as they were while a model is evaluated, whatever the CPU.

bitsandbytes may change a Linear4bit's weights in place the first time it runs without gradients
on some CPUs (see quantized_layers_kept), which would change the training that goes on after an
evaluation. Every evaluation during training runs inside `quantized_layers_kept`.
"""

from __future__ import annotations

from contextlib import contextmanager

# bitsandbytes' Linear4bit reads this attribute (set from a CPU probe when the layer is built).
_CPU_REPACK_FLAG = "support_avx512bf16_for_cpu"


@contextmanager
def quantized_layers_kept(model):
    """Leave every 4-bit layer exactly as it was, whatever bitsandbytes decides about the CPU.

    Why: on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weights in place
    for an inference-only kernel the first time the layer runs in eval mode without gradients,
    and keeps them so. Every later forward, training included, then takes that kernel, which has
    no autograd (LoRA gradients change; a biased linear fails at `result += bias`), and saving a
    checkpoint converts them back with a lossy inverse. So an evaluation before or during
    training would change the training itself, on some CPUs only.

    Two layers of defence: the layer's repack switch is turned off for the duration (no repack,
    no extra memory), and should a bitsandbytes version repack on some other trigger, the
    original 4-bit weight and quantization state (kept by reference, no copy) are put back.
    """
    saved = [_snapshot(m) for m in _linear4bit_layers(model)]
    for layer, *_ in saved:
        if hasattr(layer, _CPU_REPACK_FLAG):
            setattr(layer, _CPU_REPACK_FLAG, False)
    try:
        yield model
    finally:
        for snapshot in saved:
            _restore(*snapshot)


def _linear4bit_layers(model) -> list:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # an unquantized base on a machine without bitsandbytes
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _snapshot(layer) -> tuple:
    state = layer.weight.quant_state
    fields = dict(vars(state)) if state is not None else None
    return layer, getattr(layer, _CPU_REPACK_FLAG, None), layer.weight.data, state, fields


def _restore(layer, flag, data, state, fields) -> None:
    if flag is not None:
        setattr(layer, _CPU_REPACK_FLAG, flag)
    if layer.weight.data_ptr() != data.data_ptr():  # the repack allocates a new tensor
        layer.weight.data = data
    if state is not None:
        # The repack mutates the QuantState object in place (absmax, dtype, nested...): restore
        # its fields, keeping the object that the layer and its weight share.
        if not _fields_equal(vars(state), fields):
            vars(state).clear()
            vars(state).update(fields)
        layer.weight.quant_state = state


def _fields_equal(a: dict, b: dict) -> bool:
    # By identity: the repack replaces tensors, and tensors do not compare to a single bool.
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
