"""Loading the base: device, precision, quantization, and the safety rules for local weights.

Precision policy (see ANCHORS.md: the fp32 upcast of prepare_model_for_kbit_training costs 2.8x):
frozen weights stay in the compute dtype (bf16 where the device supports it, fp16 on CUDA
cards without bf16, fp32 on a CPU without bf16; the `dtype` setting overrides this choice);
only trainable parameters are fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from peftko.config import BUILTIN_MODEL
from peftko.errors import UserError


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # frozen weights and compute

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.float16


def resolve_model_path(model: str) -> Path:
    """A local directory with config.json; `builtin:tiny-llama` is built on first use."""
    if model == BUILTIN_MODEL:
        from peftko.tiny_base import builtin_base

        return builtin_base()
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(
            f"model directory not found: {model} (peftko loads local paths only; download the model "
            "first, e.g. with `hf download`, and pass its folder to --model)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass the folder of a Hugging Face causal LM to --model")
    return path


def check_seq_len(path: Path, seq_len: int) -> None:
    """A block longer than the base's trained context gives positions it has never seen."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'}: {e}") from None
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is longer than the context {path.name} was trained on "
                        f"(max_position_embeddings = {limit}); use --seq-len {limit} or less")


def pick_precision(device: str, dtype: str = "auto") -> Precision:
    """Device and compute dtype; dtype 'auto' picks the fastest exact-enough type the device has."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one process per GPU under accelerate launch
    dev = torch.device(device)
    if dtype != "auto":
        return Precision(dev, _chosen_dtype(dev, dtype))
    if dev.type == "cuda":
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        chosen = torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    return Precision(dev, chosen)


def _chosen_dtype(dev: torch.device, dtype: str) -> torch.dtype:
    # bf16 on a CPU is allowed (emulated where the CPU lacks it: slow, but the same numbers).
    if dtype == "float16" and dev.type != "cuda":
        raise UserError(f"--dtype float16 needs a CUDA device, not {dev}; use float32 or bfloat16")
    if dtype == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bfloat16: this CUDA device does not support it; use float16 or auto")
    return getattr(torch, dtype)


def _cpu_has_fast_bf16() -> bool:
    # bf16 on a CPU without AVX512-BF16/AMX is emulated and several times slower than fp32.
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def quantization_config(quant: str, compute_dtype: torch.dtype):
    """NF4 with double quantization, or LLM.int8; None for an unquantized base."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a directory the user must fix
        raise UserError(f"cannot load the tokenizer from {path}: {_first_line(e)}") from None


def check_weight_files(path: Path, allow_pickle: bool) -> None:
    """Safetensors only unless the user opts in: a pickle can run arbitrary code on load."""
    if any(path.glob("*.safetensors")) or allow_pickle:
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise UserError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); they can run code when "
            "loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source."
        )
    raise UserError(f"{path} holds no model weights (*.safetensors)")


def load_base(
    path: Path,
    quant: str,
    precision: Precision,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load the causal LM for training (quantized per `quant`) or, with quant='none', for merging."""
    from transformers import AutoModelForCausalLM

    check_weight_files(path, allow_pickle)
    kwargs = dict(
        dtype=precision.dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        device_map={"": str(precision.device)},
    )
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quant, precision.dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load the model from {path}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
