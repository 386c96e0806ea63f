"""Loading the base: device, precision, quantization, and the safety rules for local weights.

Precision policy (see benchmarks/RESULTS.md: the fp32 upcast of prepare_model_for_kbit_training costs 2.8x):
frozen weights stay in the compute dtype (bf16 where the device supports it, fp16 on CUDA
cards without bf16, fp32 on a CPU without bf16; the `dtype` setting overrides this choice);
only trainable parameters are fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from peftko.core.config import BUILTIN_MODEL, BaseLoading
from peftko.core.errors import UserError
from peftko.model.built_base import builtin_folder
from peftko.model.gemma_base import NAME as GEMMA, gemma_base
from peftko.model.header import read_safetensors_header
from peftko.model.tiny_base import builtin_base


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # frozen weights and compute

    @property
    def dtype_name(self) -> str:
        """"bfloat16", not "torch.bfloat16": for the console, the manifest and the config."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.device.type == "cuda" and self.dtype == torch.float16


BUILTIN_BASES = {BUILTIN_MODEL: builtin_base, GEMMA: gemma_base}  # built on first use, then cached


def resolve_model_path(model: str) -> Path:
    """A local directory with config.json; `builtin:tiny-llama` is built on first use."""
    if model in BUILTIN_BASES:
        return BUILTIN_BASES[model]()
    path = Path(model).expanduser().resolve()  # absolute: recorded in adapter_config.json and peftko.json
    if not path.exists():
        raise UserError(
            f"model directory not found: {model} (peftko loads local paths only; download the model "
            "first, e.g. with `hf download`, and pass its folder to --model)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: it is not a model folder; pass the folder of a Hugging Face causal LM")
    return path


def as_built(path: Path) -> Path:
    """`path`; where it is the folder of one of peftko's built bases (a run records its base by folder),
    that base as its builder hands it out: built again if absent or visibly damaged, else hashed from
    now for peftko.model.built_base.confirm to compare with its build record before use."""
    for name, get in BUILTIN_BASES.items():
        if Path(path).expanduser().resolve() == builtin_folder(name).resolve():
            return get()
    return path


def terms_files(path: Path) -> list[str]:
    """The base's licence and terms-of-use files (LICENSE, NOTICE, Gemma's GEMMA_TERMS.html, ...):
    the model cards name them, and `peftko merge` copies them beside the merged weights, which are
    still the base's weights under the base's terms."""
    names = ("LICENSE", "LICENCE", "NOTICE", "TERMS", "USE_POLICY")
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and not p.is_symlink() and any(n in p.name.upper() for n in names))


def read_base_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'}: {e}") from None


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")
DEFAULT_SEQ_LEN = 2048  # long enough for whole scenes, short enough for a 12 GB card with an 8B base


def context_limit(config: dict) -> tuple[str, int] | None:
    """(key, positions) the base was trained on, from whichever key its family uses."""
    c = config.get("text_config") or config
    for key in CONTEXT_KEYS:
        if isinstance(c.get(key), int) and c[key] > 0:
            return key, c[key]
    return None


def resolve_seq_len(path: Path, seq_len: int | str) -> int:
    """`auto` becomes min(2048, the base's context); an explicit value must fit in that context,
    since a block longer than the trained context gives positions the base has never seen."""
    limit = context_limit(read_base_config(path))
    if seq_len == "auto":
        return min(DEFAULT_SEQ_LEN, limit[1]) if limit else DEFAULT_SEQ_LEN
    if limit and seq_len > limit[1]:
        raise UserError(f"--seq-len {seq_len} is longer than the context {path.name} was trained on "
                        f"({limit[0]} = {limit[1]}); use --seq-len {limit[1]} or less, or --seq-len auto")
    return seq_len


# model_type -> why transformers' built-in class must not be used for it (the model's own code is right).
NEEDS_REMOTE_CODE = {
    "exaone": "transformers' built-in EXAONE class reads this config.json differently from EXAONE's own "
              "code (an absent tie_word_embeddings means untied there, so EXAONE-3.5-2.4B would get a "
              "random lm_head)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.txt", "tokenizer_config.json")


def check_base_config(path: Path, loading: BaseLoading, dry_run: bool = False) -> list[str]:
    """Refuse, before any slow work, what would break for this base; return warnings for a dry run.

    A dry run may plan from a folder holding only config.json: the missing weights, tokenizer or
    remote code become warnings there, and a refusal in a real run.
    """
    config = read_base_config(path)
    _check_architecture(config, loading.trust_remote_code)
    _check_attention(config, loading.attn_implementation)
    missing = _missing_parts(path, config, loading.trust_remote_code, loading.allow_pickle)
    if missing and not dry_run:
        raise UserError(f"{path} lacks {'; '.join(missing)}: download the whole model folder "
                        "(e.g. `hf download ORG/NAME --local-dir DIR`)")
    return [f"{path} lacks {m}; the plan below is from config.json alone, a real run needs them" for m in missing]


def _check_architecture(config: dict, trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in NEEDS_REMOTE_CODE and not trust_remote_code:
        raise UserError(f"model_type {model_type!r} needs --trust-remote-code: {NEEDS_REMOTE_CODE[model_type]}. "
                        "--trust-remote-code runs the Python files shipped in the model folder; read them first.")
    if model_type not in CONFIG_MAPPING_NAMES and config.get("auto_map") and not trust_remote_code:
        raise UserError(f"model_type {model_type!r} is not built into transformers; this base ships its own code "
                        "(auto_map in config.json). Pass --trust-remote-code to run it (read those Python "
                        "files first), or use a base transformers supports.")


def _check_attention(config: dict, attn_implementation: str) -> None:
    # transformers' sdpa kernel cannot soft-cap attention scores (Gemma-2 caps them at 50): it raises,
    # or without the cap the model computes a different function. auto picks eager for these bases.
    softcap = (config.get("text_config") or config).get("attn_logit_softcapping")
    if softcap and attn_implementation == "sdpa":
        raise UserError(f"--attn-implementation sdpa cannot apply this base's attention soft-capping "
                        f"(attn_logit_softcapping = {softcap}); use --attn-implementation auto or eager "
                        "(or flash_attention_2 on a CUDA card with flash-attn installed)")


def _missing_parts(path: Path, config: dict, trust_remote_code: bool, allow_pickle: bool) -> list[str]:
    missing = []
    if problem := weights_problem(path, allow_pickle):
        missing.append(problem)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES[:3])}, ...)")
    if trust_remote_code:
        modules = {ref.split("--")[-1].rsplit(".", 1)[0] + ".py"
                   for ref in _auto_map_refs(config.get("auto_map") or {})}
        absent = sorted(m for m in modules if not (path / m).is_file())
        if absent:
            missing.append(f"the model's code ({', '.join(absent)}) that auto_map names")
    return missing


def _auto_map_refs(auto_map: dict) -> list[str]:
    refs = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return refs


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


def weights_problem(path: Path, allow_pickle: bool) -> str | None:
    """What a base folder lacks in usable weights, or None. Safetensors only unless the user opts
    in: a pickle can run arbitrary code on load."""
    pickles = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt")])
    if any(path.glob("*.safetensors")) or (pickles and allow_pickle):
        return None
    if pickles:
        return (f"safetensors weights (only pickles: {', '.join(pickles[:3])}, which can run code when "
                "loaded; convert them, or pass --allow-pickle if you trust the source)")
    return "model weights (*.safetensors)"


def check_weight_files(path: Path, allow_pickle: bool) -> None:
    """Usable weights, each safetensors file whole (see check_safetensors), or a UserError."""
    check_safetensors(path)
    if problem := weights_problem(path, allow_pickle):
        raise UserError(f"{path} lacks {problem}")


def check_safetensors(path: Path) -> None:
    """Every safetensors file's header read and its size checked against it: a truncated or damaged
    download is named in a second, not as a traceback after the corpus is tokenised."""
    for w in sorted(path.glob("*.safetensors")):
        read_safetensors_header(w)


def linear_layer_names(path: Path, trust_remote_code: bool = False) -> set[str]:
    """Last name parts of the base's linear layers (q_proj, dense, ...), from config.json alone.

    The model is built on the meta device: no weights are read or allocated, so this is cheap
    enough to run before the corpus pass and under --dry-run.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise UserError(f"cannot read the model architecture from {path / 'config.json'}: {_first_line(e)}") from None
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def load_base(
    path: Path,
    quant: str,
    precision: Precision,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load the causal LM for training (quantized per `quant`) or, with quant='none', for merging."""
    from safetensors import SafetensorError
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
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError, SafetensorError) as e:
        raise UserError(f"cannot load the model from {path}: {_first_line(e)}") from None
    refuse_non_finite(model, path)
    return model


def refuse_non_finite(model, path: Path) -> None:
    """A NaN or inf in the weights is named now: trained on, it would surface hours later as a
    diverged run blamed on the learning rate."""
    bad = [name for name, p in model.named_parameters()
           if any(not bool(torch.isfinite(t).all()) for t in _numbers_of(p))]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{path} holds NaN or inf values in {bad[0]}{more}: its weights are damaged. Download "
                        "the model again, or use another base.")


def _numbers_of(p) -> list[torch.Tensor]:
    """The floating-point numbers a weight is made of. A 4-bit weight's packed bytes are not numbers,
    but a NaN or inf in it makes its block scales non-finite (with double quantization, their
    offset); an 8-bit weight keeps one scale per row beside its integers."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return [state.offset, state.state2.absmax] if state.nested else [state.absmax]
    if getattr(p, "SCB", None) is not None:
        return [p.SCB]
    return [p] if p.is_floating_point() else []


def _first_line(e: Exception, limit: int = 600) -> str:
    """The exception's message on one line, whole: transformers' messages often continue a sentence
    on the next lines ("... from one of: (1) ... (2) ...")."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if not text:
        return type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
