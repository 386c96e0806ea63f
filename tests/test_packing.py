"""From files to packed blocks: encodings give identical ids, documents stay apart, held-out
books never reach training, and the cache is reused only when nothing changed."""

from __future__ import annotations

import re
import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.collate import PackedCollator
from peftko.config import TrainConfig
from peftko.packing import choose_val_docs, pack_blocks, prepare_data
from peftko.textfiles import find_files, scan_file
from peftko.paths import sample_corpus_dir
from peftko.token_rows import register_markers

MARKERS = ["|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>",
           "|START_OF_DIALOGUE|>", "|END_OF_DIALOGUE|>", "|SOUND|>"]


@pytest.fixture(scope="module")
def tokenizer(tiny_bases):
    tok = AutoTokenizer.from_pretrained(tiny_bases["llama-untied"])
    register_markers(tok, MARKERS)
    return tok


def packed(folder, tokenizer, cache, **overrides):
    cfg = TrainConfig(seq_len=128, val_fraction=overrides.pop("val_fraction", 0.0), **overrides)
    files = [scan_file(p, cfg.jsonl_field) for p in find_files([folder])]
    return prepare_data(files, tokenizer, cfg, cache)


def story(i: int = 0) -> str:
    return sorted(sample_corpus_dir().glob("*.txt"))[i].read_text(encoding="utf-8")


def write(folder, name, text, encoding):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text.encode(encoding))
    return folder


@pytest.mark.parametrize("variant", ["cp949", "nfd", "utf-16-bom-crlf"])
def test_encoding_twins_give_identical_ids(variant, tokenizer, tmp_path):
    text = story(2)  # holds the CP949-only syllable 똠
    assert "똠" in text
    utf8 = write(tmp_path / "utf8", "s.txt", text, "utf-8")
    if variant == "cp949":
        twin = write(tmp_path / "twin", "s.txt", text, "cp949")
    elif variant == "nfd":
        twin = write(tmp_path / "twin", "s.txt", unicodedata.normalize("NFD", text), "utf-8")
    else:
        twin = write(tmp_path / "twin", "s.txt", "\ufeff" + text.replace("\n", "\r\n"), "utf-16")
    a = packed(utf8, tokenizer, tmp_path / "cache")
    b = packed(twin, tokenizer, tmp_path / "cache")
    assert a.train["input_ids"] == b.train["input_ids"]
    assert len(a.train) > 1


def test_blocks_are_full_and_positions_restart_per_document(tokenizer, tmp_path):
    corpus = tmp_path / "c"
    for i in range(3):
        write(corpus, f"{i}.txt", story(i), "utf-8")
    data = packed(corpus, tokenizer, tmp_path / "cache")
    lengths = [len(x) for x in data.train["input_ids"]]
    assert data.block_len <= 128 and all(n == data.block_len for n in lengths[:-1])
    assert data.block_len - len(lengths) < lengths[-1] <= data.block_len
    assert data.real_token_fraction >= 0.99
    flat = [t for ids in data.train["input_ids"] for t in ids]
    assert flat.count(tokenizer.eos_token_id) == 3  # one end-of-document token after each story
    for ids, pos in zip(data.train["input_ids"], data.train["position_ids"]):
        for k in range(1, len(ids)):  # positions restart right after each end-of-document token
            assert pos[k] == (0 if ids[k - 1] == tokenizer.eos_token_id else pos[k - 1] + 1)


def test_pack_blocks_cuts_long_documents_and_rebases_positions():
    blocks = list(pack_blocks([{"input_ids": [list(range(10)), [7, 7, 7]]}], seq_len=4))
    assert [b["input_ids"] for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 7, 7], [7]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1], [0]]


def test_even_block_length_leaves_at_most_a_token_of_padding_per_block():
    from peftko.packing import even_block_len

    assert even_block_len(13_670, 256) == 254  # 54 blocks either way; the last is no longer short
    assert even_block_len(1_000, 256) == 250 and even_block_len(512, 256) == 256
    assert even_block_len(10, 256) == 10 and even_block_len(0, 256) == 1
    for total in (1, 255, 257, 9_999, 123_457):
        n = even_block_len(total, 256)
        blocks = -(-total // n)
        assert n <= 256 and blocks == -(-total // 256) and blocks * n - total < blocks


def test_held_out_books_never_appear_in_training_blocks(tokenizer, tmp_path):
    corpus = tmp_path / "c"
    for i in range(8):
        write(corpus, f"{i}.txt", story(i), "utf-8")
    data = packed(corpus, tokenizer, tmp_path / "cache", val_fraction=0.25, seed=7)
    val = choose_val_docs(8, 0.25, 7)
    assert len(val) == 2 and data.val_docs == 2 and data.train_docs == 6
    train_text = "".join(tokenizer.decode(ids) for ids in data.train["input_ids"])
    val_text = "".join(tokenizer.decode(ids) for ids in data.val["input_ids"])
    for i in range(8):
        title = re.search(r"\|START_OF_TITLE\|>(.*?)\|END_OF_TITLE\|>", story(i)).group(1)
        assert (title in val_text) == (i in val)
        assert (title in train_text) == (i not in val)
    assert data.val_chars == sum(len(story(i).strip()) for i in val)


def test_val_split_depends_on_seed_and_keeps_one_document():
    assert choose_val_docs(2, 0.01, 0) and len(choose_val_docs(2, 0.5, 0)) == 1
    assert choose_val_docs(1, 0.5, 0) == set()
    assert choose_val_docs(40, 0.1, 1) != choose_val_docs(40, 0.1, 2)


def test_cache_is_reused_until_the_corpus_or_tokenizer_changes(tokenizer, tmp_path):
    corpus = write(tmp_path / "c", "a.txt", story(0), "utf-8")
    cache = tmp_path / "cache"
    assert not packed(corpus, tokenizer, cache).from_cache
    assert packed(corpus, tokenizer, cache).from_cache
    write(corpus, "a.txt", story(0) + "\n덧붙인 문장.", "utf-8")
    assert not packed(corpus, tokenizer, cache).from_cache
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # without the markers
    assert not packed(corpus, other, cache).from_cache


@pytest.mark.parametrize("base,attn", [("llama-untied", "sdpa"), ("llama-untied", "eager"),
                                       ("gpt-neox", "sdpa"), ("qwen2-padded", "eager")])
def test_second_document_does_not_see_the_first(tiny_bases, base, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_bases[base], attn_implementation=attn).eval()
    collate = PackedCollator(pad_id=0, attn_implementation=attn)
    first, second = list(range(5, 25)), list(range(40, 70))
    alone = collate([{"input_ids": second, "position_ids": list(range(len(second)))}])
    packed_row = {"input_ids": first + second,
                  "position_ids": list(range(len(first))) + list(range(len(second)))}
    together = collate([packed_row])
    with torch.no_grad():
        a = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
        b = model(**{k: v for k, v in together.items() if k != "labels"}).logits[0, len(first):]
        # Without the mask, the same block leaks: the check above is not vacuous.
        leak = model(input_ids=together["input_ids"], position_ids=together["position_ids"]).logits[0, len(first):]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, leak, atol=1e-3)


def test_jsonl_records_are_documents_with_a_custom_field(tokenizer, tmp_path):
    import json

    folder = tmp_path / "j"
    folder.mkdir()
    rows = [{"body": story(i), "id": i} for i in range(3)]
    (folder / "books.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                        encoding="utf-8")
    data = packed(folder, tokenizer, tmp_path / "cache", jsonl_field="body")
    txt = packed(write(tmp_path / "t", "all.txt", "".join(story(i) for i in range(3)), "utf-8"),
                 tokenizer, tmp_path / "cache")
    assert data.train_docs == 3 == txt.train_docs
    assert data.train["input_ids"] == txt.train["input_ids"]
