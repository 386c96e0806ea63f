"""From files to packed blocks: encodings give identical ids, documents stay apart, held-out
books never reach training, and the cache is reused only when nothing changed."""

from __future__ import annotations

import re
import unicodedata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.data.collate import PackedCollator
from peftko.core.config import TrainConfig
from peftko.data.packing import choose_val_docs, pack_blocks, prepare_data
from peftko.corpus.documents import find_files, scan_file
from peftko.core.paths import sample_corpus_dir
from peftko.model.token_rows import register_markers

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
    return prepare_data(files, tokenizer, cfg.blocks(), cache)


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
    from peftko.data.packing import even_block_len

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


def _reference_blocks(docs: list[list[int]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """The plain definition: concatenate, cut every seq_len; positions count from each document
    start and restart at each block start."""
    ids = [t for d in docs for t in d]
    pos = [p for d in docs for p in range(len(d))]
    blocks = []
    for b in range(0, len(ids), seq_len):
        chunk_pos = pos[b : b + seq_len]
        shift, fixed = chunk_pos[0], []
        for k, p in enumerate(chunk_pos):
            if p == 0 and k > 0:
                shift = 0
            fixed.append(p - shift)
        blocks.append((ids[b : b + seq_len], fixed))
    return blocks


@pytest.mark.parametrize("seed", range(6))
def test_pack_blocks_matches_the_plain_definition_on_random_documents(seed):
    import random

    rng = random.Random(seed)
    seq_len = rng.choice([1, 2, 7, 64, 128])
    lengths = [rng.choice([1, 2, rng.randint(1, 40), rng.randint(100, 700)]) for _ in range(rng.randint(1, 60))]
    docs = [[rng.randint(0, 999) for _ in range(n)] for n in lengths]
    batches = [{"input_ids": docs[i : i + 5]} for i in range(0, len(docs), 5)]
    got = [(b["input_ids"], b["position_ids"]) for b in pack_blocks(batches, seq_len)]
    assert got == _reference_blocks(docs, seq_len)


def test_pack_blocks_handles_a_long_document_in_one_pass():
    # One 300k-token document used to be re-concatenated per block (quadratic); now it streams.
    doc = list(range(300_000))
    blocks = list(pack_blocks([{"input_ids": [doc]}], seq_len=64))
    assert len(blocks) == -(-300_000 // 64)
    assert blocks[-1]["input_ids"] == doc[-(300_000 % 64):]
    assert all(b["position_ids"] == list(range(len(b["input_ids"]))) for b in blocks[:3] + blocks[-2:])


# --- the build folder: nothing outside it, nothing left behind


def _builds(cache) -> list:
    return sorted(p.name for p in cache.glob(".build-*")) if cache.exists() else []


def test_an_interrupted_build_writes_nothing_outside_its_folder_and_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    import datasets
    import tempfile

    from peftko.data import packing

    scratch, hf_cache, cache = tmp_path / "tmp", tmp_path / "hf", tmp_path / "cache"
    scratch.mkdir()
    hf_cache.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    seen = {}
    real_pack = packing._packed_arrays

    def pack_then_interrupt(token_ds, seq_len):
        yield from real_pack(token_ds, seq_len)
        # Mid-build, after documents, tokens and blocks were written: where did datasets write?
        seen["builds"] = _builds(cache)
        seen["outside"] = [p for p in tmp_path.rglob("*") if ".build-" not in str(p) and p.is_file()
                           and "corpus" not in p.parts]
        raise KeyboardInterrupt  # what Ctrl-C / SIGTERM become before training starts

    monkeypatch.setattr(packing, "_packed_arrays", pack_then_interrupt)
    corpus = tmp_path / "corpus"
    for i in range(3):
        write(corpus, f"{i}.txt", story(i), "utf-8")
    with pytest.raises(KeyboardInterrupt):
        packed(corpus, tokenizer, cache, val_fraction=0.3)
    assert len(seen["builds"]) == 1 and seen["outside"] == []
    assert _builds(cache) == [] and list(cache.iterdir()) == []
    assert list(scratch.iterdir()) == [] and list(hf_cache.iterdir()) == []


def test_stale_builds_of_dead_processes_are_removed_but_not_live_ones(tmp_path):
    import socket
    import subprocess
    import sys

    from peftko.data.packing import BUILD_PREFIX, remove_stale_builds

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cache = tmp_path / "cache"
        names = {
            "dead": f"{BUILD_PREFIX}{host}-{dead.pid}-abc",
            "live": f"{BUILD_PREFIX}{host}-{live.pid}-def",
            "other-host": f"{BUILD_PREFIX}elsewhere-{dead.pid}-ghi",
            "unnamed": f"{BUILD_PREFIX}x1y2z3",  # not ours to judge
            "finished": "0123456789abcdef0123",
        }
        for name in names.values():
            (cache / name).mkdir(parents=True)
            (cache / name / "part.arrow").write_bytes(b"x")
        assert remove_stale_builds(cache) == [cache / names["dead"]]
        assert sorted(p.name for p in cache.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
    finally:
        live.kill()
        live.wait()


def test_a_build_killed_outright_is_cleaned_up_by_the_next_run(tokenizer, tmp_path):
    """SIGKILL runs no finally: the next run sees the dead pid in the folder name and removes it."""
    import signal
    import subprocess
    import sys
    import time

    corpus = write(tmp_path / "corpus", "a.txt", story(0), "utf-8")
    tokenizer.save_pretrained(tmp_path / "tok")
    cache, started = tmp_path / "cache", tmp_path / "started"
    child = f"""
import sys, time
from pathlib import Path
from transformers import AutoTokenizer
from peftko.data import packing
from peftko.core.config import TrainConfig
from peftko.corpus.documents import find_files, scan_file
def stuck(token_ds, seq_len):
    Path({str(started)!r}).write_text("x")
    time.sleep(120)
    yield {{}}
packing._packed_arrays = stuck
tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
files = [scan_file(p) for p in find_files([{str(corpus)!r}])]
packing.prepare_data(files, tok, TrainConfig(seq_len=128, val_fraction=0.0).blocks(), Path({str(cache)!r}))
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), "the child never reached the packing step"
        assert len(_builds(cache)) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert len(_builds(cache)) == 1  # left behind, as after a power cut
    data = packed(corpus, tokenizer, cache)
    assert _builds(cache) == [] and not data.from_cache


def test_tokenising_in_several_processes_gives_the_same_blocks(tokenizer, tmp_path):
    corpus = tmp_path / "c"
    for i in range(6):
        write(corpus, f"{i}.txt", story(i), "utf-8")
    one = packed(corpus, tokenizer, tmp_path / "cache1", val_fraction=0.2)
    two = packed(corpus, tokenizer, tmp_path / "cache2", val_fraction=0.2, num_proc=2)
    assert one.train["input_ids"] == two.train["input_ids"] and one.val["input_ids"] == two.val["input_ids"]
    assert one.train["position_ids"] == two.train["position_ids"]


def test_long_documents_are_tokenised_in_bounded_groups(tokenizer, monkeypatch):
    from peftko.data import packing

    monkeypatch.setattr(packing, "TOKENIZE_BATCH_CHARS", 10)
    groups = list(packing._char_groups(["abcd", "efgh", "ij", "a" * 30, "k"]))
    assert groups == [["abcd", "efgh", "ij"], ["a" * 30], ["k"]]
