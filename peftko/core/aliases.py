"""Other tools' names for peftko's settings: a config written for Axolotl, LLaMA-Factory, TRL (and
the transformers TrainingArguments names it shares) or Unsloth mostly reads as it is.

ALIASES maps a peer's key to peftko's TrainConfig key, with a converter where the value is spelled
differently (load_in_4bit: true is quant: 4bit). A key is here only when it means the same thing;
one that looks alike but measures something else (warmup_steps counts steps, peftko's warmup_ratio
is a fraction) is in REFUSED, with what to write instead. A key that changes nothing in peftko
(Axolotl's strict, tf32, train_on_inputs on raw text) is in IGNORED: listed once in a note, never an
error, as Axolotl itself only warns on keys it does not know; so is any other key left empty. The
docs' table is generated from this module (markdown_table) and tests/test_aliases.py keeps the two equal.

read_source reads one source (the config file, or the --set values) with these names; the types
of peftko's keys come from peftko.core.config, which calls it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftko.core.coercion import to_type

AXOLOTL, FACTORY, TRL, UNSLOTH = "Axolotl", "LLaMA-Factory", "TRL", "Unsloth"


@dataclass(frozen=True)
class Unless:
    """A peer's switch turned off (load_in_4bit: false). It is no value but "not this one", so it
    never overrides another key of the same file; `otherwise` is the value when nothing there sets
    the key (Axolotl without load_in_4bit/8bit trains an unquantized base), None: keep peftko's."""

    excluded: Any
    otherwise: Any = None


@dataclass(frozen=True)
class Alias:
    key: str  # peftko's TrainConfig key
    tools: tuple[str, ...]  # who spells it this way
    convert: Callable[[Any], Any] | None = None  # the peer's value -> peftko's (or an Unless)
    reads: Any = None  # the type the peer's value is read as before convert; None: as peftko's key
    flag: str | None = None  # peftko's flag, when more than --KEY (--quant 4bit)
    note: tuple[str, str] = ("", "")  # (English, Korean) for the docs' table


def _switch(on: Any, otherwise: Any = None) -> Callable[[bool], Any]:
    return lambda value: on if value else Unless(on, otherwise)


def _paths(value: Any) -> Any:
    """A comma-separated string or a list of paths (LLaMA-Factory writes `dataset: a,b`)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Refusal(ValueError):
    """A value refused in words that stand alone: the problem line does not repeat the value."""


DATASETS_EXPECTED = ("peftko reads local text: give `- path: corpus/` with `type: completion` "
                     "(or peftko's own `data: [corpus/]`)")


def _axolotl_datasets(value: Any) -> list[str]:
    """Axolotl's list of dataset dicts, when each is local raw text: their paths."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"is not a list of datasets; {DATASETS_EXPECTED}")
    return [_axolotl_dataset(entry) for entry in value]


def _axolotl_dataset(entry: Any) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ValueError(f"has an entry without a path; {DATASETS_EXPECTED}")
    if _looks_like_hub_name(entry["path"]):
        raise Refusal(f"{entry['path']!r} is a Hugging Face Hub dataset: peftko reads local files; download it "
                      "first")
    if entry.get("type") not in ("completion", "text"):
        raise ValueError(f"type {entry.get('type')!r} is an instruction or chat format; {DATASETS_EXPECTED}")
    if entry.get("field", "text") != "text":
        raise ValueError("field: peftko's key for the text field of .jsonl files is jsonl_field (top level)")
    extra = sorted(set(entry) - {"path", "type", "ds_type", "field"})
    if extra:
        raise ValueError(f"{', '.join(extra)} has no peftko equivalent; {DATASETS_EXPECTED}")
    return entry["path"]


def _looks_like_hub_name(path: str) -> bool:
    """owner/name with nothing of a local path about it, and nothing there: a Hub dataset (the
    path would otherwise fail later as a missing folder, which says nothing of the Hub)."""
    parts = path.split("/")
    return (len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and "\\" not in path
            and not Path(path).exists())


def _lora_target(value: Any) -> Any:
    """LLaMA-Factory's `all` is peftko's all-linear; names may be one comma-separated string."""
    return "all-linear" if value == "all" else _paths(value)


def _bits(value: int) -> str:
    if value not in (4, 8):
        raise ValueError("must be 4 or 8 (or leave it out for an unquantized base: quant none)")
    return f"{value}bit"


def _adapter(value: str) -> Any:
    """Axolotl's adapter: qlora needs a 4-bit base; lora alone trains an unquantized one."""
    if value == "qlora":
        return "4bit"
    if value == "lora":
        return Unless("4bit", "none")
    raise ValueError("peftko trains LoRA adapters only: lora or qlora")


def _precision(on: str) -> Callable[[Any], Any]:
    """Axolotl's bf16: auto is peftko's dtype: auto; off means full precision, as there."""
    return lambda value: "auto" if value == "auto" else _switch(on, "float32")(value)


def _fraction(value: float) -> float:
    if value >= 1:
        raise ValueError("counts examples; peftko holds out a fraction of whole documents: "
                         "val_fraction below 1")
    return value


def _unsloth_checkpointing(value: Any) -> bool:
    """Unsloth's "unsloth" is its own offloading checkpointing: peftko checkpoints (see --offload-checkpoints)."""
    return True if value == "unsloth" else value


# Peers' optimizer names -> peftko's. Paging only moves a full GPU's optimizer states to the CPU; the
# update is the same AdamW, so paged_adamw_32bit is peftko's (32-bit) adamw.
OPTIMIZERS_32BIT = ("adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf", "paged_adamw_32bit", "paged_adamw")
OPTIMIZERS_8BIT = ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_bnb_8bit")


def _optim(value: str) -> str:
    if value in OPTIMIZERS_32BIT:
        return "adamw"
    if value in OPTIMIZERS_8BIT:
        return "paged_adamw_8bit"  # bitsandbytes' 8-bit AdamW; paging only moves states out of a full GPU
    raise ValueError(f"is not an optimizer peftko has: adamw (also read from {', '.join(OPTIMIZERS_32BIT[1:])}) "
                     f"or paged_adamw_8bit (also read from {', '.join(OPTIMIZERS_8BIT[1:])})")


# peftko's own keys whose values a peer spells its own way (Axolotl's `optimizer: paged_adamw_32bit`):
# the value is translated, and --dry-run shows how.
PEER_VALUES: dict[str, Callable[[Any], Any]] = {"optimizer": _optim}


_BOOL = bool
_AUTO_OR_BOOL = Literal["auto"] | bool

ALIASES: dict[str, Alias] = {
    # what to train on
    "base_model": Alias("model", (AXOLOTL,), note=(
        "a local folder: peftko downloads nothing", "로컬 폴더: peftko는 아무것도 내려받지 않습니다")),
    "model_name_or_path": Alias("model", (FACTORY, TRL), note=(
        "a local folder: peftko downloads nothing", "로컬 폴더: peftko는 아무것도 내려받지 않습니다")),
    "model_name": Alias("model", (UNSLOTH,), note=(
        "a local folder: peftko downloads nothing", "로컬 폴더: peftko는 아무것도 내려받지 않습니다")),
    "tokens": Alias("markers", (AXOLOTL,), note=(
        "the tokens to add to the tokenizer: peftko's markers", "토크나이저에 더할 토큰: peftko의 마커")),
    "datasets": Alias("data", (AXOLOTL,), _axolotl_datasets, note=(
        "entries `- path: corpus/` with `type: completion` (raw text); other types are refused",
        "`- path: corpus/`와 `type: completion`(일반 텍스트) 항목만; 다른 type은 거절")),
    "dataset": Alias("data", (FACTORY,), _paths, note=(
        "local files or folders, comma-separated; names from dataset_info.json are not looked up",
        "로컬 파일이나 폴더(쉼표로 구분); dataset_info.json의 이름은 찾지 않습니다")),
    "dataset_text_field": Alias("jsonl_field", (TRL,)),
    "output_dir": Alias("output", (AXOLOTL, FACTORY, TRL)),
    "val_set_size": Alias("val_fraction", (AXOLOTL,), _fraction, reads=float, note=(
        "a fraction below 1 (of whole documents); a count is refused",
        "1보다 작은 비율(문서 단위); 개수는 거절")),
    "dataset_processes": Alias("num_proc", (AXOLOTL,)),
    "preprocessing_num_workers": Alias("num_proc", (FACTORY,)),
    "dataset_num_proc": Alias("num_proc", (TRL,)),
    # base model
    "load_in_4bit": Alias("quant", (AXOLOTL, UNSLOTH), _switch("4bit", "none"), _BOOL, "--quant 4bit", note=(
        "false: none, unless another key says 8bit", "false: none(다른 키가 8bit라 하지 않으면)")),
    "load_in_8bit": Alias("quant", (AXOLOTL,), _switch("8bit", "none"), _BOOL, "--quant 8bit", note=(
        "false: none, unless another key says 4bit", "false: none(다른 키가 4bit라 하지 않으면)")),
    "quantization_bit": Alias("quant", (FACTORY,), _bits, int, "--quant 4bit|8bit",
                              note=("4: 4bit, 8: 8bit", "4: 4bit, 8: 8bit")),
    "adapter": Alias("quant", (AXOLOTL,), _adapter, str, "--quant", note=(
        "qlora: 4bit; lora: none unless load_in_8bit", "qlora: 4bit; lora: none(load_in_8bit가 없으면)")),
    "bf16": Alias("dtype", (AXOLOTL, FACTORY, TRL), _precision("bfloat16"), _AUTO_OR_BOOL, "--dtype bfloat16", note=(
        "true: bfloat16, auto: auto, false: float32", "true: bfloat16, auto: auto, false: float32")),
    "fp16": Alias("dtype", (AXOLOTL, FACTORY, TRL), _precision("float16"), _AUTO_OR_BOOL, "--dtype float16", note=(
        "true: float16 (CUDA only), false: float32", "true: float16(CUDA 전용), false: float32")),
    "flash_attention": Alias("attn_implementation", (AXOLOTL,), _switch("flash_attention_2"), _BOOL,
                             "--attn-implementation flash_attention_2", note=("true: flash_attention_2",
                                                                             "true: flash_attention_2")),
    "sdp_attention": Alias("attn_implementation", (AXOLOTL,), _switch("sdpa"), _BOOL,
                           "--attn-implementation sdpa", note=("true: sdpa", "true: sdpa")),
    # LoRA
    "lora_rank": Alias("lora_r", (FACTORY,)),
    "r": Alias("lora_r", (UNSLOTH,)),
    "random_state": Alias("seed", (UNSLOTH,)),
    "use_gradient_checkpointing": Alias("gradient_checkpointing", (UNSLOTH,), _unsloth_checkpointing, note=(
        "true or \"unsloth\": true", "true나 \"unsloth\": true")),
    "lora_target_modules": Alias("target_modules", (AXOLOTL,)),
    "lora_target": Alias("target_modules", (FACTORY,), _lora_target, note=(
        "all: all-linear; names comma-separated", "all: all-linear; 이름은 쉼표로 구분")),
    "lora_target_linear": Alias("target_modules", (AXOLOTL,), _switch("all-linear"), _BOOL,
                                "--target-modules all-linear", note=("true: all-linear", "true: all-linear")),
    # optimisation
    "learning_rate": Alias("lr", (AXOLOTL, FACTORY, TRL)),
    "embedding_learning_rate": Alias("embedding_lr", (UNSLOTH,)),
    "num_epochs": Alias("epochs", (AXOLOTL,)),
    "num_train_epochs": Alias("epochs", (FACTORY, TRL)),
    "micro_batch_size": Alias("batch_size", (AXOLOTL,)),
    "per_device_train_batch_size": Alias("batch_size", (FACTORY, TRL)),
    "gradient_accumulation_steps": Alias("grad_accum", (AXOLOTL, FACTORY, TRL)),
    "sequence_len": Alias("seq_len", (AXOLOTL,), note=("the packed block length", "묶은 블록의 길이")),
    "max_seq_length": Alias("seq_len", (TRL, UNSLOTH), note=("the packed block length", "묶은 블록의 길이")),
    "max_length": Alias("seq_len", (TRL,), note=("the packed block length", "묶은 블록의 길이")),
    "cutoff_len": Alias("seq_len", (FACTORY,), note=("the packed block length", "묶은 블록의 길이")),
    "lr_scheduler": Alias("scheduler", (AXOLOTL,), note=("cosine, linear or constant", "cosine, linear, constant")),
    "lr_scheduler_type": Alias("scheduler", (FACTORY, TRL), note=(
        "cosine, linear or constant", "cosine, linear, constant")),
    "optim": Alias("optimizer", (FACTORY, TRL, UNSLOTH), _optim, str, note=(
        "adamw_torch (and _fused), paged_adamw_32bit: adamw; adamw_8bit, adamw_bnb_8bit, paged_adamw_8bit: "
        "paged_adamw_8bit", "adamw_torch(_fused), paged_adamw_32bit: adamw; adamw_8bit, adamw_bnb_8bit, "
        "paged_adamw_8bit: paged_adamw_8bit")),
}

# Peers' keys that are peftko's own, meaning the same: nothing to translate.
SAME_NAMES = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "max_steps", "seed", "weight_decay",
              "warmup_ratio", "embedding_lr", "gradient_checkpointing", "max_grad_norm", "logging_steps",
              "eval_steps", "save_steps", "save_total_limit", "report_to", "trust_remote_code",
              "attn_implementation")

# Peers' keys that look like one of peftko's but mean something else, or that peftko has no use
# for: refused, with what to write instead (English, Korean).
REFUSED: dict[str, tuple[str, str]] = {
    "dataset_name": ("names a Hugging Face Hub dataset; peftko reads local files and folders: data: [corpus/]",
                     "Hugging Face Hub 데이터셋 이름입니다; peftko는 로컬 파일과 폴더를 읽습니다: data: [corpus/]"),
    "max_samples": ("keeps part of the data; peftko trains on every document given (choose the files instead)",
                    "데이터 일부만 씀; peftko는 주어진 문서를 모두 학습(파일을 골라 주세요)"),
    "overwrite_output_dir": ("peftko replaces an output folder only with --force", "peftko는 --force로만 출력 폴더를 바꿈"),
    "lora_model_dir": ("loads an existing adapter to train on; peftko starts a new one (continue a peftko run "
                       "with --resume); leave it empty",
                       "있는 어댑터를 불러와 이어 학습합니다; peftko는 새로 시작합니다(peftko 실행은 --resume으로 "
                       "이어 감); 비워 두세요"),
    "resume_from_checkpoint": ("peftko continues a run with --resume (the same command), not a path",
                               "peftko는 경로가 아니라 --resume(같은 명령)으로 이어 갑니다"),
}

# Peers' keys that change nothing in peftko, whatever their value: a note lists them, once.
IGNORED: dict[str, tuple[str, str]] = {
    "strict": ("Axolotl's own check of its keys; peftko checks every key", "Axolotl의 키 검사; peftko는 모든 키를 검사"),
    "tf32": ("a matmul speed switch; dtype sets peftko's precision", "행렬 곱 속도 설정; 정밀도는 dtype"),
    "train_on_inputs": ("raw text has no inputs to mask: every token is trained",
                        "일반 텍스트에는 가릴 입력이 없어 모든 토큰을 학습"),
    "group_by_length": ("packed blocks are all seq_len long: no lengths to group",
                        "묶은 블록은 모두 seq_len 길이: 묶을 길이가 없음"),
    "pad_to_sequence_len": ("packed blocks are all seq_len long already", "묶은 블록은 이미 모두 seq_len 길이"),
    "model_type": ("peftko loads every base with AutoModelForCausalLM", "peftko는 AutoModelForCausalLM으로 읽음"),
    "tokenizer_type": ("peftko loads the base's tokenizer with AutoTokenizer", "peftko는 AutoTokenizer로 읽음"),
    "special_tokens": ("peftko keeps the base's special tokens and pads its blocks itself; tokens to add go in "
                       "`tokens:` or markers", "기반 모델의 특수 토큰을 그대로 씀; 더할 토큰은 `tokens:`나 markers"),
    "overwrite_cache": ("peftko's dataset cache is keyed by the files and the tokenizer: a change rebuilds it",
                        "peftko의 데이터 캐시는 파일과 토크나이저로 구분: 바뀌면 다시 만듦"),
    "dataset_prepared_path": ("peftko caches tokenized data under PEFTKO_HOME/datasets",
                              "peftko는 토큰화한 데이터를 PEFTKO_HOME/datasets에 캐시"),
    # Counts where peftko takes a fraction or a step cadence: no exact translation before the steps are
    # known, and each has a default that serves (a warning, not a refusal of the whole file).
    "warmup_steps": ("peftko warms up over a fraction of all steps, warmup_ratio, 0.05 unless set; for the same "
                     "warmup set warmup_ratio: warmup_steps / total steps",
                     "peftko는 전체 스텝의 warmup_ratio(기본 0.05) 동안 워밍업; 같게 하려면 warmup_ratio: "
                     "warmup_steps / 전체 스텝"),
    "evals_per_epoch": ("peftko evaluates every eval_steps optimizer steps, 50 unless set, and at the end",
                        "peftko는 eval_steps 스텝마다(기본 50), 그리고 끝에 평가"),
    "saves_per_epoch": ("peftko writes a checkpoint every save_steps optimizer steps, none unless set, and the "
                        "adapter at the end", "peftko는 save_steps 스텝마다(기본: 없음) 체크포인트, 끝에 어댑터를 씀"),
}
# Peers' keys whose one value is what peftko does anyway: ignored at that value, refused at another.
# name -> (that value, English, Korean)
IGNORED_AT: dict[str, tuple[Any, str, str]] = {
    "sample_packing": (True, "peftko always packs whole documents into blocks", "peftko는 늘 문서를 블록으로 묶음"),
    "packing": (True, "peftko always packs whole documents into blocks", "peftko는 늘 문서를 블록으로 묶음"),
    "stage": ("pt", "peftko continues pre-training on raw text", "peftko는 일반 텍스트로 사전 학습을 이어 감"),
    "finetuning_type": ("lora", "peftko trains LoRA adapters only", "peftko는 LoRA 어댑터만 학습"),
    "do_train": (True, "peftko's lora-train always trains", "lora-train은 늘 학습"),
    "quantization_method": ("bitsandbytes", "peftko quantizes with bitsandbytes", "peftko는 bitsandbytes로 양자화"),
    "bias": ("none", "peftko's LoRA trains no bias", "peftko의 LoRA는 bias를 학습하지 않음"),
    "use_rslora": (False, "peftko scales LoRA by lora_alpha / lora_r", "peftko는 LoRA를 lora_alpha / lora_r로 스케일"),
}


class Ignored(Exception):
    """A peer's key that changes nothing in peftko: a note, not a problem."""



def _empty(raw: Any) -> bool:
    return raw is None or raw == "" or raw == [] or raw == {}


def peftko_flag(alias: str) -> str:
    entry = ALIASES[alias]
    return entry.flag or "--" + entry.key.replace("_", "-")


def flag_hint(option: str) -> str | None:
    """For a peer's command-line flag (--learning-rate, --num_train_epochs): what peftko calls it."""
    name = option.lstrip("-").replace("-", "_")
    if name in ALIASES:
        return f"peftko calls it {peftko_flag(name)}"
    if name in REFUSED:
        return f"{option} {REFUSED[name][0]}"
    return None


def markdown_table(lang: str) -> str:
    """The table of docs/{en,ko}/coming-from-other-tools.md, generated: alias | peftko key | note."""
    ko = lang == "ko"
    head = ("| 다른 도구의 키 | 쓰는 도구 | peftko 키 | 설명 |" if ko else "| alias | used by | peftko key | note |")
    rows = [head, "|---|---|---|---|"]
    rows += [f"| `{name}` | {', '.join(a.tools)} | `{a.key}` | {a.note[ko]} |" for name, a in ALIASES.items()]
    optim = (f"{', '.join(OPTIMIZERS_32BIT[1:])}: adamw; {', '.join(OPTIMIZERS_8BIT[1:])}: paged_adamw_8bit")
    rows.append(f"| `optimizer` | {AXOLOTL} | `optimizer` | {'값' if ko else 'values'}: {optim} |")
    rows += [f"| `{name}` | | {'거절' if ko else 'refused'} | {text[ko]} |" for name, text in REFUSED.items()]
    rows += [f"| `{name}` | | {'무시(알림)' if ko else 'ignored (a note)'} | {text[ko]} |"
             for name, text in IGNORED.items()]
    rows += [f"| `{name}` | | {'무시' if ko else 'ignored'}: `{_as_written(value)}` | "
             f"{(ko_why if ko else why)}; {'다른 값은 거절' if ko else 'any other value is refused'} |"
             for name, (value, why, ko_why) in IGNORED_AT.items()]
    same = ", ".join(f"`{k}`" for k in SAME_NAMES)
    tail = (f"이름도 뜻도 같은 키(그대로 읽음): {same}. 값을 비워 둔 다른 도구의 키도 무시하고 알림에 적습니다."
            if ko else f"Same name, same meaning (read as is): {same}. Any other tool's key left empty is "
            "ignored too, and listed in the note.")
    return "\n".join(rows) + "\n\n" + tail


# --- reading one source (the config file, or the --set values) with these names

Coerce = Callable[[str, Any], Any]  # (peftko key, value) -> the value as the key's type, or ValueError


@dataclass
class Reading:
    """One source read: peftko's values, the problems, the keys ignored (name, why), how each peer's
    name was read (name, as written, peftko's key, value), and the peftko keys a problem was about."""

    values: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    translated: list[tuple[str, Any, str, Any]] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)

    def __iter__(self):  # values, problems = read_source(...) still reads
        return iter((self.values, self.problems))


def read_source(items: Iterable[tuple[Any, Any]], prefix: str, keys: Collection[str],
                coerce: Coerce) -> Reading:
    """One source's settings under peftko's `keys`, each read by `coerce`, and its problems, each a
    line starting with `prefix` (the file's name). Two names for one key in the same source
    (lr and learning_rate) must agree: neither silently wins."""
    found: dict[str, list[tuple[str, Any, Any]]] = {}  # peftko key -> [(name, as written, as read)]
    reading = Reading()
    problems = reading.problems
    for name, raw in items:
        name = str(name)
        try:
            key, value = _read_one(name, raw, keys, coerce)
        except Ignored as e:
            reading.ignored.append((name, e.args[0]))
        except LookupError as e:
            problems.append(f"{prefix}{name}: {e.args[0]}")
        except Refusal as e:
            problems.append(f"{prefix}{name}: {e}")
            if name in ALIASES:
                reading.failed.add(ALIASES[name].key)
        except ValueError as e:
            problems.append(f"{prefix}{name}: {raw!r} {e}")
            if name in ALIASES:
                reading.failed.add(ALIASES[name].key)
        else:
            if key is not None:
                found.setdefault(key, []).append((name, raw, value))
                if name not in keys or (name in PEER_VALUES and value != raw):
                    reading.translated.append((name, raw, key, value))
    for key, entries in found.items():
        try:
            value = _agree(key, entries)
        except ValueError as e:
            problems.append(f"{prefix}{e}")
            continue
        if value is not None:
            reading.values[key] = value
    return reading


def _read_one(name: str, raw: Any, keys: Collection[str], coerce: Coerce) -> tuple[str | None, Any]:
    """(peftko's key, the value read) for one key as written; LookupError: unknown or refused."""
    if name in keys:
        if name in PEER_VALUES and isinstance(raw, str):
            return name, coerce(name, PEER_VALUES[name](raw))
        return name, coerce(name, raw)
    if name in IGNORED:
        raise Ignored(IGNORED[name][0])
    if name in IGNORED_AT:
        expected, why = IGNORED_AT[name][:2]
        if raw == expected:
            raise Ignored(why)
        raise LookupError(f"{_as_written(raw)} is refused: {why}; only {_as_written(expected)} is accepted "
                          "(and ignored: it is what peftko does)")
    if name not in ALIASES and _empty(raw):
        raise Ignored("empty")
    if name in REFUSED:
        raise LookupError(REFUSED[name][0])
    alias = ALIASES.get(name)
    if alias is None:
        raise LookupError(f"unknown key{_did_you_mean(name, keys)}")
    if raw is None:
        return None, None  # peers' configs leave keys empty (`lora_target_linear:`) to mean unset
    value = to_type(alias.reads, raw, isinstance(raw, str)) if alias.reads else raw
    value = alias.convert(value) if alias.convert else value
    if isinstance(value, Unless):
        otherwise = None if value.otherwise is None else coerce(alias.key, value.otherwise)
        return alias.key, Unless(value.excluded, otherwise)
    return alias.key, coerce(alias.key, value)


def _agree(key: str, entries: list[tuple[str, Any, Any]]) -> Any:
    """The one value that the names of `key` in one source give, or ValueError naming a clash."""
    values = [e for e in entries if not isinstance(e[2], Unless)]
    offs = [e for e in entries if isinstance(e[2], Unless)]
    for first, other in zip(values, values[1:]):
        if first[2] != other[2]:
            raise ValueError(_clash(key, first, other))
    if values:
        for off in offs:
            if values[0][2] == off[2].excluded:
                raise ValueError(_clash(key, values[0], off))
        return values[0][2]
    # Only switches turned off: what they leave (load_in_4bit: false alone: an unquantized base).
    fallbacks = [e for e in offs if e[2].otherwise is not None]
    for first, other in zip(fallbacks, fallbacks[1:]):
        if first[2].otherwise != other[2].otherwise:
            raise ValueError(_clash(key, first, other))
    return fallbacks[0][2].otherwise if fallbacks else None


def _clash(key: str, a: tuple[str, Any, Any], b: tuple[str, Any, Any]) -> str:
    return (f"{a[0]}: {_as_written(a[1])} and {b[0]}: {_as_written(b[1])} both set peftko's {key} "
            "and disagree; keep one")


def _as_written(raw: Any) -> str:
    return str(raw).lower() if isinstance(raw, bool) else repr(raw)  # YAML's false, not Python's False


def _did_you_mean(name: str, keys: Collection[str]) -> str:
    # 0.8, not difflib's 0.6: a typo (learning_rte, lora_alhpa) scores above 0.8; a different key that
    # shares a word (tokens / sample_tokens, pad_to_sequence_len / sequence_len) scores below.
    match = difflib.get_close_matches(name, [*keys, *ALIASES], n=1, cutoff=0.8)
    if not match:
        return ""
    hint = match[0]
    return f" (did you mean {hint!r}?)" if hint in keys else f" (did you mean {hint!r}, peftko's {ALIASES[hint].key}?)"
