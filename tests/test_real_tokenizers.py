"""Markers on the real tokenizers of the bases Korean users train: Llama-3 and Qwen2 (byte-level
BPE), Llama-2 and Gemma (SentencePiece BPE with byte fallback).

Each tokenizer is first checked against the ids its original gave on llama.cpp's reference texts,
then a tiny random model around it goes through `lora-train --quant 4bit` and `merge`, and the
markers must come out as one token each, Korean must survive encode/decode unchanged, marker-free
text must tokenize as the base does, and the merged embedding must have the right row count.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main
from peftko.core.config import DEFAULT_MARKER_PATTERN
from tests.real_vocab import FAMILIES, MODELS, reference_cases

pytestmark = pytest.mark.slow  # the llama-cpp-python sdist (77 MB) once per machine, 128k-262k-token vocabularies

SAMPLE = "|START_OF_TITLE|>반딧불이 숲|END_OF_TITLE|>\n|SOUND|>쉿! 누가 왔을까요?"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokenizer_gives_the_original_ids(family, real_tokenizer_dir):
    folder = real_tokenizer_dir(family)
    cases = reference_cases(family)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    wrong = [(t, ids) for t, ids in cases if backend.encode(t, add_special_tokens=False).ids != ids]
    assert not wrong, f"tokenizer.json differs from the original on {len(wrong)} of {len(cases)}: {wrong[:3]}"
    # As users load it. transformers 5 rebuilds Llama-2's pipeline itself (see FAMILIES).
    tok = AutoTokenizer.from_pretrained(folder)
    if FAMILIES[family].leading_space_differs:
        cases = [(t, ids) for t, ids in cases if not t[:1].isspace()]
    wrong = [(t, ids) for t, ids in cases if tok(t, add_special_tokens=False)["input_ids"] != ids]
    assert not wrong, f"AutoTokenizer differs from the original on {len(wrong)} of {len(cases)}: {wrong[:3]}"


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request, real_base, real_run, small_corpus, tmp_path_factory):
    family = request.param
    base, run = real_base(family), real_run(family)
    out = tmp_path_factory.mktemp(f"real-{family}")
    r = CliRunner().invoke(main, ["merge", str(run), "--output", str(out / "merged"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    story = sorted(small_corpus.glob("*.txt"))[0].read_text(encoding="utf-8")
    return {
        "family": family, "base": base, "run": run, "merged": out / "merged", "story": story,
        "manifest": json.loads((run / "peftko.json").read_text(encoding="utf-8")),
        "tokenizers": {"run": AutoTokenizer.from_pretrained(run), "merged": AutoTokenizer.from_pretrained(out / "merged")},
        "base_tokenizer": AutoTokenizer.from_pretrained(base),
    }


def test_each_marker_is_one_token_with_the_same_id(trained):
    markers = trained["manifest"]["markers"]
    assert {"|START_OF_TITLE|>", "|END_OF_TITLE|>", "|SOUND|>"} <= {m["marker"] for m in markers}
    for where, tok in trained["tokenizers"].items():
        for m in markers:
            assert tok(m["marker"], add_special_tokens=False)["input_ids"] == [m["id"]], (where, m["marker"])
    base = trained["base_tokenizer"]
    for m in markers:  # each really was several pieces before, and its id is new
        assert len(base(m["marker"], add_special_tokens=False)["input_ids"]) == m["pieces_before"] > 1, m
        assert m["id"] >= len(base), m


@pytest.mark.parametrize("text", ["sample", "story"])
def test_korean_with_markers_round_trips(trained, text):
    text = SAMPLE if text == "sample" else trained["story"]
    for where, tok in trained["tokenizers"].items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, where


def test_marker_free_text_tokenizes_as_the_base_does(trained):
    base = trained["base_tokenizer"]
    plain = re.sub(DEFAULT_MARKER_PATTERN, "", trained["story"])
    want = base(plain, add_special_tokens=False)["input_ids"]
    for where, tok in trained["tokenizers"].items():
        assert tok(plain, add_special_tokens=False)["input_ids"] == want, where


def test_merged_embedding_has_the_right_rows(trained):
    _cls, tied, padded_rows = MODELS[trained["family"]]
    n_markers = len(trained["manifest"]["markers"])
    base_tokens = len(trained["base_tokenizer"])
    # New markers take spare rows of a padded matrix (Qwen); otherwise the matrix grows by one per marker.
    want = padded_rows if padded_rows else base_tokens + n_markers
    assert len(trained["tokenizers"]["merged"]) == base_tokens + n_markers
    model = AutoModelForCausalLM.from_pretrained(trained["merged"], dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == want
    out = model.get_output_embeddings().weight
    assert out.shape[0] == want
    assert (out.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    ids = trained["tokenizers"]["merged"](SAMPLE, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()
