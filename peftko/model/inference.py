"""Loading what peftko wrote, or any local model, for use: ONE loader behind `eval`, `bench`,
`generate`, `ablate` and `merge`.

MODEL may be
  - a `peftko lora-train` output (peftko.json): the recorded base, checked against its fingerprint,
    loaded with the recorded quantization, its embeddings grown to the recorded row count, the
    adapter applied with peft, and the tokenizer (markers included) from the run directory;
  - a `peftko merge` output, any local Hugging Face model directory, or a built-in base
    (`builtin:tiny-llama`, `builtin:gemma-3-270m`, built on first use): loaded as it is
    (unquantized unless `quant` says otherwise).
It computes in the dtype the result records (the run's compute dtype in peftko.json, the dtype a
merge wrote in peftko-merge.json), so the numbers are the same on every CPU and match what
transformers gives for the merged model; `dtype` overrides that ("auto": the device's fastest
exact-enough type, which is also the choice for a folder peftko did not write).
Every bad path or changed base is a UserError (exit 2), with the same messages as training and merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftModel
from safetensors import SafetensorError

from peftko.core.config import DEFAULT_DOC_END, DEFAULT_MARKER_PATTERN
from peftko.core.errors import UserError
from peftko.core.progress import say
from peftko.model.base import BUILTIN_BASES, Precision, load_base, load_tokenizer, pick_precision, resolve_model_path
from peftko.run.layout import ADAPTER_FILES, MANIFEST, MERGE_MARK
from peftko.model.built_base import load_confirmed
from peftko.model.run_facts import check_run_facts, open_run
from peftko.run.grammar_record import MarkerGrammar
from peftko.run.records import MergeRecord, RunRecord
from peftko.run.seal import check_merge_seal

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelInfo:
    """What the caller needs besides the model and tokenizer."""

    kind: str  # "adapter" | "model"
    path: Path
    base: Path  # the base the weights come from (the model itself when not an adapter)
    quant: str
    device: str
    dtype: str  # what the model computes in: "float32", "bfloat16" or "float16"
    markers: list[str] = field(default_factory=list)  # marker strings that are single tokens
    doc_end_marker: str | None = None  # the book-end marker, when it is a single token
    stop_ids: list[int] = field(default_factory=list)  # generation stops at any of these
    grammar: MarkerGrammar | None = None  # the markers' grammar the run or the merge recorded
    guide: object = None  # strict generation's view of the grammar in this tokenizer (model.structure.Guide)


def is_adapter_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (MANIFEST, *ADAPTER_FILES))


def load_for_inference(path: str | Path, quant: str | None = None, device: str = "auto", dtype: str | None = None):
    """(model in eval mode, tokenizer, ModelInfo) for an adapter run, a merged model or a plain base.

    dtype None: as the result records it (see the module docstring)."""
    if str(path) in BUILTIN_BASES:  # the same folder lora-train --model builtin:... trains on
        path = resolve_model_path(str(path))
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {path} (pass a `peftko lora-train` output, a `peftko merge` "
                        f"output, a local Hugging Face model folder or one of {', '.join(BUILTIN_BASES)})")
    if path.is_dir() and is_adapter_dir(path):
        model, tokenizer, info = _load_adapter(path, quant, device, dtype)
    else:  # a built base's bytes are compared once it has loaded (peftko.model.built_base)
        model, tokenizer, info = load_confirmed(path, lambda: _load_model(path, quant, device, dtype))
    model.eval()
    info.stop_ids = stop_ids(model, tokenizer, info.doc_end_marker)
    return model, tokenizer, info


def _load_adapter(run_dir: Path, quant: str | None, device: str, dtype: str | None):
    record, base = open_run(run_dir)
    quant = quant or record.quantization or "none"
    precision = inference_precision(device, dtype, record.compute_dtype, "the run trained")
    model, tokenizer = load_with_adapter(run_dir, base, record, quant, precision, record.attn_implementation)
    info = adapter_info(run_dir, base, quant, precision, record.marker_names, record.doc_end_marker)
    info.grammar = record.grammar
    return model, tokenizer, info


def adapter_info(run_dir: Path, base: Path, quant: str, precision: Precision, markers: list[str],
                 doc_end_marker: str | None) -> ModelInfo:
    """A run's ModelInfo (stop_ids aside): generation stops at the book-end marker only when it is one
    of the run's registered markers (a single token)."""
    end = doc_end_marker if doc_end_marker in markers else None
    return ModelInfo("adapter", run_dir, base, quant, str(precision.device), precision.dtype_name, list(markers), end)


def load_with_adapter(run_dir: Path, base: Path, record: RunRecord, quant: str, precision, attn: str = "auto"):
    """The base grown as training grew it, with the adapter applied (not merged), and the run's
    tokenizer: for inference and for `peftko merge`. Consent given at training time
    (--allow-pickle, --trust-remote-code) carries over; nothing more."""
    tokenizer = load_tokenizer(run_dir, record.trust_remote_code)
    check_run_facts(run_dir, base, record, tokenizer)  # before the base is loaded: a refusal costs no load
    model = load_base(base, quant, precision, attn, record.trust_remote_code, record.allow_pickle)
    rows = record.vocab.rows_after
    if model.get_input_embeddings().weight.shape[0] < rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    try:
        return PeftModel.from_pretrained(model, run_dir), tokenizer
    except SafetensorError as e:  # a damaged adapter from a run saved before its hash was recorded
        raise UserError(f"cannot read {run_dir / 'adapter_model.safetensors'}: {e}. It was cut short "
                        "or damaged: restore it, or train again.") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot apply the adapter in {run_dir}: {str(e).splitlines()[0]}") from None


def _load_model(path: Path, quant: str | None, device: str, dtype: str | None):
    path = resolve_model_path(str(path))
    quant = quant or "none"
    # A folder peftko did not write records no dtype; one it wrote is used only as it wrote it
    # (a mark that does not read is refused, naming it, rather than taken for no mark).
    mark = MergeRecord.read(path) if (path / MERGE_MARK).is_file() else None
    if mark is not None:
        check_merge_seal(path, mark.seal)
    recorded = mark.dtype if mark else None
    precision = inference_precision(device, dtype, recorded, "the merge wrote")
    model = load_base(path, quant, precision)
    tokenizer = load_tokenizer(path)
    markers = added_markers(tokenizer)
    end = DEFAULT_DOC_END if DEFAULT_DOC_END in markers else None
    return model, tokenizer, ModelInfo("model", path, path, quant, str(precision.device), precision.dtype_name,
                                       markers, end, grammar=mark.grammar if mark else None)


def inference_precision(device: str, dtype: str | None, recorded, what: str) -> Precision:
    """--dtype when given, else the recorded dtype where this device can compute in it, else auto."""
    if dtype is not None:
        return pick_precision(device, dtype)
    if recorded in DTYPES:
        try:
            return pick_precision(device, recorded)
        except UserError:  # float16 from a CUDA run, on a CPU; bfloat16 on a card without it
            precision = pick_precision(device)
            say(f"note: {what} in {recorded}, which {precision.device} cannot compute in; "
                f"using {precision.dtype_name} (set it with --dtype)", err=True)
            return precision
    return pick_precision(device)


def added_markers(tokenizer) -> list[str]:
    """Markers a merged model carries: added, non-special tokens that look like markers."""
    special = set(tokenizer.all_special_tokens)
    rx = re.compile(DEFAULT_MARKER_PATTERN)
    return sorted(t for t in tokenizer.get_added_vocab() if t not in special and rx.fullmatch(t))


def stop_ids(model, tokenizer, doc_end_marker: str | None) -> list[int]:
    """The base's eos id(s), the generation config's (merge adds the book-end marker there), the marker."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids += [] if value is None else ([value] if isinstance(value, int) else list(value))
    if doc_end_marker:
        ids.append(tokenizer.convert_tokens_to_ids(doc_end_marker))
    return list(dict.fromkeys(ids))
