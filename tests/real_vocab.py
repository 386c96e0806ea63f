"""Real tokenizers of the bases Korean users train (Llama-3, Qwen2, Llama-2, Gemma), built offline.

Where they come from: llama.cpp keeps vocabulary-only GGUF files of many base models in its
`models/` folder, each with `.inp`/`.out` files holding test texts and the ids the ORIGINAL
Hugging Face tokenizer gave them. The `llama-cpp-python` source distribution on PyPI vendors that
folder, so it is fetched once per machine with pip (about 77 MB) and cached; nothing from it is
committed here (the vocabularies are under their models' own licences).

transformers turns each GGUF vocabulary into a `tokenizers` pipeline. Where that pipeline differs
from the one the real model repository ships, `FAMILIES` says what is changed and why; every
built tokenizer is then checked against the reference ids, so a fix that is wrong shows up.

The tokenizer folders are cached beside the sdist, keyed by the transformers version and
`BUILD_VERSION`, and are written atomically: an interrupted build never looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME, SDIST_VERSION = "llama-cpp-python", "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
MODELS_IN_SDIST = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models/"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"  # how llama.cpp's test-tokenizer-0 splits a .inp file
BUILD_VERSION = 2  # bump when the way a tokenizer folder is built changes


@dataclass(frozen=True)
class Family:
    gguf: str  # file stem in llama.cpp's models/ folder
    tokenizer_class: str  # what the real repository's tokenizer_config.json names
    arch: str | None = None  # builder transformers should pick, where the file's own is wrong
    ignore_merges: bool = False
    drop_padding_tokens: bool = False
    # transformers 5 rebuilds this class's pipeline from its own code (Metaspace, prepend "first")
    # instead of the repository's normalizer, which changes ids only for text that STARTS with
    # whitespace. That is what users of the real repository get, so the folder keeps the class and
    # the reference check through AutoTokenizer leaves those texts to the tokenizer.json check.
    leading_space_differs: bool = False


FAMILIES = {
    # Llama-3's tokenizer.json sets BPE `ignore_merges` (a word found whole in the vocabulary is one
    # token); the GGUF does not record it, and without it "Cửa Việt" splits differently.
    "llama3": Family("llama-bpe", "PreTrainedTokenizerFast", ignore_merges=True),
    # The file pads the vocabulary with "[PAD151646]".. tokens up to the embedding size; the real
    # tokenizer has 151,646 tokens and leaves those rows to the model, so they are dropped.
    "qwen2": Family("qwen2", "Qwen2Tokenizer", drop_padding_tokens=True),
    # Llama-2's tokenizer.json prepends "▁" with a normalizer (as Phi-3's does, whose builder this is).
    "llama2": Family("llama-spm", "LlamaTokenizer", arch="phi3", leading_space_differs=True),
    # The same Llama-2 vocabulary with its tokenizer.json used as shipped, as transformers loads it
    # when tokenizer_config.json names PreTrainedTokenizerFast: it matches the original exactly,
    # leading spaces included, and its "▁" normalizer runs on every piece of text between markers.
    "llama2-json": Family("llama-spm", "PreTrainedTokenizerFast", arch="phi3"),
    "gemma": Family("gemma-4", "GemmaTokenizer"),
}


class RealVocabUnavailable(RuntimeError):
    """The sdist could not be fetched or read: tests skip, or fail under CI."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftko-test"


def fetch_sdist(root: Path | None = None) -> Path:
    """The llama-cpp-python sdist, downloaded with pip the first time (into a temp dir, then renamed)."""
    root = root or cache_root()
    target = root / SDIST_FILE
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        # --no-binary for this package alone: its build dependencies (needed to read its metadata)
        # come as wheels, not built from source too, which took minutes.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME,
               "--disable-pip-version-check", "--dest", tmp, f"{SDIST_NAME}=={SDIST_VERSION}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RealVocabUnavailable(f"`{' '.join(cmd[2:])}` failed: {e}") from e
        got = Path(tmp) / SDIST_FILE
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RealVocabUnavailable(f"`{' '.join(cmd[2:])}` failed: {' / '.join(tail) or 'no file written'}")
        os.replace(got, target)
    return target


def extract_vocab_files(stems: list[str], root: Path | None = None) -> Path:
    """Only the .gguf/.inp/.out files of `stems`, out of the sdist, into root/vocab/."""
    root = root or cache_root()
    folder = root / "vocab"
    wanted = {f"ggml-vocab-{s}.gguf{ext}" for s in stems for ext in ("", ".inp", ".out")}
    missing = {name for name in wanted if not (folder / name).is_file()}
    if not missing:
        return folder
    sdist = fetch_sdist(root)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = member.name.removeprefix(MODELS_IN_SDIST)
                if name in missing and member.isfile():
                    tmp = folder / f".{name}.part"
                    with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, folder / name)
                    missing.discard(name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RealVocabUnavailable(f"cannot read {sdist}: {e}; delete it to fetch it again") from e
    if missing:
        raise RealVocabUnavailable(f"{sdist} lacks {sorted(missing)}")
    return folder


def reference_cases(family: str, root: Path | None = None) -> list[tuple[str, list[int]]]:
    """(text, ids of the original tokenizer without special tokens), from llama.cpp's .inp/.out."""
    folder = extract_vocab_files([FAMILIES[family].gguf], root)
    stem = f"ggml-vocab-{FAMILIES[family].gguf}.gguf"
    # Most files end with the separator, a few (gemma-4) end with the last text.
    texts = (folder / f"{stem}.inp").read_text(encoding="utf-8").removesuffix(TEST_SEPARATOR).split(TEST_SEPARATOR)
    lines = (folder / f"{stem}.out").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    assert len(texts) == len(lines), f"{stem}: {len(texts)} texts but {len(lines)} id lines"
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines)]


def tokenizer_dir(family: str, root: Path | None = None) -> Path:
    """A Hugging Face tokenizer folder for `family`, laid out as its model repository lays it out."""
    import transformers

    root = root or cache_root()
    target = root / f"tokenizers-{transformers.__version__}-v{BUILD_VERSION}" / family
    if (target / "tokenizer_config.json").is_file():
        return target
    vocab = extract_vocab_files([FAMILIES[family].gguf], root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        _build_tokenizer(FAMILIES[family], vocab / f"ggml-vocab-{FAMILIES[family].gguf}.gguf", tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_tokenizer(family: Family, gguf: Path, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, spec, config = get_gguf_tokenizer(str(gguf))
    if family.drop_padding_tokens:
        n = next((i for i, t in enumerate(spec["tokens"]) if re.fullmatch(r"\[PAD\d+\]", t)), len(spec["tokens"]))
        spec = {k: (v[:n] if k in ("tokens", "token_type", "scores") else v) for k, v in spec.items()}
    backend, _ = convert_gguf_tokenizer(family.arch or arch, spec)
    backend = _without_tokens_past(backend, len(spec["tokens"]))
    if family.ignore_merges:
        backend.model.ignore_merges = True
    kwargs = {k: v for k, v in config.items() if k != "chat_template" and v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)
    tok.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = family.tokenizer_class
    cfg.update({k: config[k] for k in ("add_bos_token", "add_eos_token") if k in config})
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _without_tokens_past(backend, size: int):
    """Drop added tokens the builder invented past the file's vocabulary.

    transformers' byte-level builder wraps GPT-2's tokenizer class, which adds its default
    "<|endoftext|>" as id 128,256 to Llama-3's 128,256-token vocabulary.
    """
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < size]
    return Tokenizer.from_str(json.dumps(data))


# family -> (transformers config class, tied embeddings, embedding rows when not the tokenizer's size)
MODELS = {
    "llama3": ("LlamaConfig", False, None),
    "qwen2": ("Qwen2Config", False, 152_064),  # Qwen2.5-7B pads 151,646 tokens to 152,064 rows
    "llama2": ("LlamaConfig", False, None),
    "llama2-json": ("LlamaConfig", False, None),
    "gemma": ("Gemma2Config", True, None),
}


def build_base(folder: Path, family: str, tokenizer_folder: Path) -> Path:
    """A tiny random 2-layer model (hidden 64) of the family's architecture around its real tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    cls, tied, rows = MODELS[family]
    # The backend alone: AutoTokenizer would parse Gemma's 32 MB tokenizer.json for a few ids.
    backend = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    special = json.loads((tokenizer_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {f"{k}_id": backend.token_to_id(special[k]) if special.get(k) else None
           for k in ("bos_token", "eos_token", "pad_token")}
    extra = {"head_dim": 16} if cls.startswith("Gemma") else {}
    config = getattr(transformers, cls)(
        vocab_size=rows or backend.get_vocab_size(with_added_tokens=True), hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=tied, **ids, **extra,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for f in tokenizer_folder.iterdir():  # the files as a model repository has them, not re-saved
        shutil.copy(f, folder / f.name)
    return folder
