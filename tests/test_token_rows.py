"""Registering markers and initialising their rows, on byte-level and SentencePiece-style tokenizers."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from peftko.tiny_base import sample_texts, tiny_config
from peftko.token_rows import grow_embeddings, init_marker_rows, register_markers

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
    assert all(len(t.pieces) > 1 and t.init_ids == t.pieces for t in tokens)
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
