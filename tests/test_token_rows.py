"""Registering markers and initialising their rows, on byte-level and SentencePiece-style tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from peftko.core.errors import UserError
from peftko.model.tiny_base import sample_texts, tiny_config
from peftko.model.token_rows import grow_embeddings, init_marker_rows, register_markers, round_trip_problems

MARKERS = ["|START_OF_TITLE|>", "|END_OF_TITLE|>", "|SOUND|>"]
TEXT = '|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n|SOUND|>똑똑 그리고 |SOUND|> 쾅, 끝.'


def metaspace_tokenizer():
    """Llama-2/Mistral style: Metaspace pieces, no byte fallback, so '|' and '>' become <unk>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(sample_texts(), trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def test_byte_level_markers_become_one_token_and_round_trip(tiny_bases):
    tok = AutoTokenizer.from_pretrained(tiny_bases["llama-tied"])
    before = len(tok)
    tokens = register_markers(tok, MARKERS)
    assert [t.id for t in tokens] == list(range(before, before + 3))
    assert all(len(t.pieces) > 1 for t in tokens)
    for t in tokens:  # rows start from the pieces with letters (START, TITLE), not the shared |, _ and |>
        has_letters = {p: any(c.isalnum() for c in tok.decode([p])) for p in t.pieces}
        assert t.init_ids == [p for p in t.pieces if has_letters[p]] and t.init_ids, (t, has_letters)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    assert ids.count(tokens[2].id) == 2
    again = register_markers(tok, MARKERS)  # idempotent: same ids, nothing added
    assert [t.id for t in again] == [t.id for t in tokens] and len(tok) == before + 3


def test_unknown_pieces_do_not_shape_the_new_row():
    tok = metaspace_tokenizer()
    tokens = register_markers(tok, MARKERS)
    assert tok.unk_token_id in tokens[2].pieces and tok.unk_token_id not in tokens[2].init_ids
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids).count("|SOUND|>") == 2
    assert tok.decode(ids) == TEXT

    config = tiny_config("llama", len(tok) - 3, tie=False, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert grow_embeddings(model, tok) == (len(tok) - 3, len(tok))
    init_marker_rows(model, tokens)
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for t in tokens:
            expected = w[t.init_ids].mean(0) if t.init_ids else w[: len(tok) - 3].mean(0)
            assert torch.allclose(w[t.id], expected, atol=1e-6)


# --- Legacy SentencePiece tokenizers: no space may appear after a marker ---------------------------

BRIEF = "|START_OF_TITLE|>반딧불이 숲|END_OF_TITLE|>\n|SOUND|>쉿!"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _bpe(byte_fallback: bool) -> Tokenizer:
    return Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=True))


def _train_bpe(tok: Tokenizer, byte_fallback: bool, texts=None) -> Tokenizer:
    specials = SPECIALS + (BYTES if byte_fallback else [])
    tok.train_from_iterator(texts or sample_texts(),
                            trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False))
    return tok


def normalizer_prepend(byte_fallback: bool, texts=None) -> PreTrainedTokenizerFast:
    """Llama-2's tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer."""
    tok = _bpe(byte_fallback)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _wrap(_train_bpe(tok, byte_fallback, texts))


def metaspace_always_bpe() -> PreTrainedTokenizerFast:
    """Legacy Metaspace (prepend_scheme "always"), BPE with byte fallback."""
    tok = _bpe(True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _wrap(_train_bpe(tok, True))


def metaspace_always_unigram() -> PreTrainedTokenizerFast:
    """Legacy Metaspace (prepend_scheme "always"), Unigram without byte fallback (T5/ALBERT-like)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(sample_texts(), trainers.UnigramTrainer(vocab_size=800, special_tokens=SPECIALS,
                                                                    unk_token="<unk>", show_progress=False))
    return _wrap(tok)


def llama_legacy_class() -> LlamaTokenizer:
    """transformers' own LlamaTokenizer with legacy=True: it rebuilds its backend from that flag on load."""
    tok = _bpe(True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    spec = json.loads(_train_bpe(tok, True).to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    return LlamaTokenizer(vocab=spec["vocab"], merges=merges, legacy=True)


LEGACY = {
    "normalizer-prepend-bytefallback": lambda: normalizer_prepend(True),
    "normalizer-prepend-no-bytefallback": lambda: normalizer_prepend(False),
    "metaspace-always-bpe": metaspace_always_bpe,
    "metaspace-always-unigram": metaspace_always_unigram,
    "llama-legacy-class": llama_legacy_class,
}
MARKER_FREE = sample_texts()[:3] + ["반딧불이 숲에는 작은 불빛이 산다.\n쉿! 조용히 해.",
                                   "두 칸  띄운 줄\n\n빈 줄 뒤 "]
# Known difference, as with transformers' legacy=False: under the normalizer style, a text that
# STARTS with a space gets one "▁" less (Metaspace never doubles a leading "▁"). Checked elsewhere.
LEADING_SPACE = "  두 칸 띄우고 시작하는 줄"


def tokenizer_family(name, tiny_bases):
    return AutoTokenizer.from_pretrained(tiny_bases["llama-tied"]) if name == "byte-level" else LEGACY[name]()


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_tokenizers_add_a_space_after_a_plain_added_token(name):
    """The premise: registered the plain way, these fixtures show the bug peftko fixes."""
    tok = LEGACY[name]()
    tok.add_tokens([AddedToken(m, normalized=False) for m in MARKERS])
    assert round_trip_problems(tok, MARKERS)
    assert tok.decode(tok(BRIEF, add_special_tokens=False)["input_ids"]) != BRIEF


@pytest.mark.parametrize("name", [*LEGACY, "byte-level"])
def test_markers_read_back_exactly_and_marker_free_text_is_unchanged(name, tiny_bases):
    tok = tokenizer_family(name, tiny_bases)
    texts = MARKER_FREE + ([] if name.startswith("normalizer-prepend") else [LEADING_SPACE])
    before = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    tokens = register_markers(tok, MARKERS)
    assert round_trip_problems(tok, MARKERS) == []
    ids = tok(BRIEF, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == BRIEF
    assert [i for i in ids if i in {t.id for t in tokens}] == [tokens[0].id, tokens[1].id, tokens[2].id]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == before


@pytest.mark.parametrize("name", [*LEGACY, "byte-level"])
def test_the_saved_tokenizer_keeps_the_fix(name, tiny_bases, tmp_path):
    tok = tokenizer_family(name, tiny_bases)
    register_markers(tok, MARKERS)
    expected = tok(TEXT, add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert round_trip_problems(again, MARKERS) == []
    assert again(TEXT, add_special_tokens=False)["input_ids"] == expected


def test_refuses_a_tokenizer_that_cannot_read_a_marker_back():
    """No byte fallback and no Korean in the vocabulary: the text around a marker is lost."""
    english = ["The quick brown fox jumps over the lazy dog.\nShh! Quiet now, little one."] * 50
    tok = normalizer_prepend(False, texts=english)
    with pytest.raises(UserError, match=r"marker '\|START_OF_TITLE\|>' \(and 2 more markers\) does not read back"):
        register_markers(tok, MARKERS)


def test_lora_train_refuses_such_a_tokenizer_before_loading_the_model(tmp_path, small_corpus):
    """Exit 2, one message naming the marker and the reason, no traceback."""
    from click.testing import CliRunner

    from peftko.cli import main
    from tests.conftest import train_args

    english = ["The quick brown fox jumps over the lazy dog.\nShh! Quiet now, little one."] * 50
    tok = normalizer_prepend(False, texts=english)
    config = tiny_config("llama", len(tok), tie=True, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    base = tmp_path / "english-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    r = CliRunner().invoke(main, train_args(base, small_corpus, tmp_path / "run", "--quant", "none"))
    assert r.exit_code == 2, r.output
    assert "does not read back as written" in r.output and "|END_OF_BOOK|>" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_the_piece_rows_of_the_markers_are_trained_and_only_they(tiny_bases):
    """Registering leaves `|`, `|>`, `_` in the vocabulary; their rows train with the markers' so the loss
    can push them down (a real base wrote `|` where `|END_OF_TITLE|>` belonged). Word pieces stay frozen."""
    from peftko.model.token_rows import piece_rows, trainable_token_indices

    tok = AutoTokenizer.from_pretrained(tiny_bases["llama-tied"])
    tokens = register_markers(tok, MARKERS)
    pieces = piece_rows(tok, tokens)
    every_piece = {p for t in tokens for p in t.pieces}
    assert pieces and set(pieces) <= every_piece
    assert all(not any(c.isalnum() for c in tok.decode([p])) for p in pieces)
    assert {p for p in every_piece if not any(c.isalnum() for c in tok.decode([p]))} == set(pieces)
    assert "|" in "".join(tok.decode([p]) for p in pieces)
    model = AutoModelForCausalLM.from_pretrained(tiny_bases["llama-tied"])
    grow_embeddings(model, tok)
    spec = trainable_token_indices(model, tokens, pieces)
    assert list(spec.values()) == [sorted({t.id for t in tokens} | set(pieces))]  # tied: one matrix
