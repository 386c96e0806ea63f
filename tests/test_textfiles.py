"""Finding and decoding corpus files: every encoding Korean corpora arrive in, and the failures."""

from __future__ import annotations

import codecs
import json
import unicodedata
from pathlib import Path

import pytest

from peftko import textfiles
from peftko.errors import UserError
from peftko.textfiles import (
    detect_encoding,
    find_files,
    iter_documents,
    iter_located_documents,
    normalize_text,
    scan_file,
)

KOREAN = "|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n하늘이는 창문을 열었습니다.\n"
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- encodings


@pytest.mark.parametrize(
    "data, encoding",
    [
        (KOREAN.encode("utf-8"), "utf-8"),
        (codecs.BOM_UTF8 + KOREAN.encode("utf-8"), "utf-8-sig"),
        (codecs.BOM_UTF16_LE + KOREAN.encode("utf-16-le"), "utf-16"),
        (codecs.BOM_UTF16_BE + KOREAN.encode("utf-16-be"), "utf-16"),
        (KOREAN.encode("cp949"), "cp949"),
    ],
    ids=["utf-8", "utf-8-bom", "utf-16-le", "utf-16-be", "cp949"],
)
def test_each_encoding_is_detected_and_decodes_to_the_same_text(tmp_path, data, encoding):
    path = write(tmp_path / "a.txt", data)
    assert detect_encoding(path) == (encoding, "ok")
    scan = scan_file(path)
    assert (scan.encoding, scan.status) == (encoding, "ok")
    assert scan.preview == KOREAN  # no BOM left, whatever the encoding
    assert scan.chars == len(KOREAN)
    assert list(iter_documents(path, encoding)) == [KOREAN.rstrip("\n")]


def test_cp949_only_syllable_decodes(tmp_path):
    text = "똠이는 장터에 갔습니다.\n"
    with pytest.raises(UnicodeDecodeError):
        text.encode("cp949").decode("euc-kr")  # the reason CP949, not EUC-KR, is the fallback
    path = write(tmp_path / "ttom.txt", text.encode("cp949"))
    assert detect_encoding(path) == ("cp949", "ok")
    assert list(iter_documents(path, "cp949")) == ["똠이는 장터에 갔습니다."]


def test_cp949_bytes_late_in_a_big_file_are_not_missed(tmp_path, monkeypatch):
    # Small chunks make the file span many of them: the CP949 byte sits after the first chunk.
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 64)
    path = write(tmp_path / "late.txt", ("abc " * 100 + "똠\n").encode("cp949"))
    assert detect_encoding(path) == ("cp949", "ok")


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_become_lf(tmp_path, newline):
    path = write(tmp_path / "nl.txt", KOREAN.replace("\n", newline))
    assert scan_file(path).preview == KOREAN
    assert list(iter_documents(path, "utf-8")) == [KOREAN.rstrip("\n")]


def test_crlf_split_across_chunks_is_one_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 4)
    path = write(tmp_path / "nl.txt", b"abc\r\ndef\r\n\r\nghi")  # "\r" ends the first chunk
    assert list(textfiles.iter_lines(path, "utf-8")) == ["abc\n", "def\n", "\n", "ghi"]


def test_nfd_korean_reads_as_its_nfc_twin(tmp_path):
    nfc = "할머니의 부엌에는 노래가 산다\n"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    a = write(tmp_path / "nfd.txt", nfd)
    b = write(tmp_path / "nfc.txt", nfc)
    assert list(iter_documents(a, "utf-8")) == list(iter_documents(b, "utf-8"))
    assert scan_file(a).preview == nfc


def test_normalize_text():
    assert normalize_text("\ufeff가\r\n나\r다") == "가\n나\n다"
    assert normalize_text(unicodedata.normalize("NFD", "한글")) == "한글"
    assert normalize_text("ｆｕｌｌ") == "ｆｕｌｌ"  # NFC, not NFKC: full-width stays


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", (None, "empty")),
        (b"  \n\t\r\n", ("utf-8", "empty")),
        (codecs.BOM_UTF8 + b"\n", ("utf-8-sig", "empty")),
        (PNG_HEADER, (None, "binary")),
        (b"text\x00with a NUL", (None, "binary")),
        (b"abc \xff\xfe\xff def", (None, "undecodable")),
    ],
    ids=["zero-bytes", "whitespace", "bom-only", "png", "nul", "undecodable"],
)
def test_not_text_statuses(tmp_path, data, expected):
    path = write(tmp_path / "x.txt", data)
    assert detect_encoding(path) == expected
    scan = scan_file(path)
    assert (scan.encoding, scan.status, scan.chars, scan.preview) == (*expected, 0, "")


# --- finding files


def test_find_files_walks_sorted_and_skips_hidden_and_other_suffixes(tmp_path):
    for name in ["b.txt", "a.md", "sub/c.jsonl", "sub/d.TXT", "notes.csv", ".hidden.txt", ".git/e.txt", "sub/.cache/f.txt"]:
        write(tmp_path / name, "가")
    found = [p.relative_to(tmp_path).as_posix() for p in find_files([tmp_path])]
    assert found == ["a.md", "b.txt", "sub/c.jsonl", "sub/d.TXT"]


def test_find_files_takes_a_named_file_once_in_given_order(tmp_path):
    a = write(tmp_path / "x" / "a.txt", "가")
    z = write(tmp_path / "z.txt", "가")
    hidden = write(tmp_path / ".h.txt", "가")
    assert find_files([z, tmp_path / "x", a, str(hidden)]) == [z, a, hidden]


def test_missing_path_names_it(tmp_path):
    with pytest.raises(UserError, match="no such file or folder: .*nowhere"):
        find_files([tmp_path / "nowhere"])


def test_no_corpus_files_names_paths_and_suffixes(tmp_path):
    write(tmp_path / "data.csv", "a,b")
    with pytest.raises(UserError) as e:
        find_files([tmp_path])
    assert str(tmp_path) in str(e.value) and ".txt, .md, .jsonl" in str(e.value)


def test_named_file_with_other_suffix_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a corpus file"):
        find_files([write(tmp_path / "data.csv", "a,b")])


# --- documents


def test_text_splits_after_doc_end_marker_and_keeps_it(tmp_path):
    body = (
        "\n\n|START_OF_BOOK|>\n  첫째 책\n|END_OF_BOOK|>  \n\n"
        "|START_OF_BOOK|>\n둘째 책  \n|END_OF_BOOK|>|START_OF_BOOK|>셋째|END_OF_BOOK|>\n  \n"
    )
    path = write(tmp_path / "books.txt", body)
    docs = list(iter_located_documents(path, "utf-8"))
    assert [d.text for d in docs] == [
        "|START_OF_BOOK|>\n  첫째 책\n|END_OF_BOOK|>",
        "|START_OF_BOOK|>\n둘째 책  \n|END_OF_BOOK|>",
        "|START_OF_BOOK|>셋째|END_OF_BOOK|>",
    ]
    assert [d.line for d in docs] == [3, 7, 9]


def test_without_doc_end_marker_a_file_is_one_document(tmp_path):
    path = write(tmp_path / "one.md", "가\n|END_OF_BOOK|>\n나\n")
    assert list(iter_documents(path, "utf-8", doc_end_marker="")) == ["가\n|END_OF_BOOK|>\n나"]
    assert list(iter_documents(path, "utf-8", doc_end_marker="|END_OF_STORY|>")) == ["가\n|END_OF_BOOK|>\n나"]


def test_documents_stream_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 7)
    books = [f"|START_OF_BOOK|>\n이야기 {i}\r\n|END_OF_BOOK|>" for i in range(5)]
    path = write(tmp_path / "many.txt", "\n".join(books))
    assert list(iter_documents(path, "utf-8")) == [b.replace("\r\n", "\n") for b in books]


def _jsonl(path: Path, records: list, blank_lines: bool = True) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r for r in records]
    return write(path, ("\n\n" if blank_lines else "\n").join(lines) + "\n")


def test_jsonl_default_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "가\r\n나", "id": 1}, {"text": "   "}, {"text": "다"}])
    assert list(iter_documents(path, "utf-8")) == ["가\n나", "다"]
    assert [d.line for d in iter_located_documents(path, "utf-8")] == [1, 5]
    scan = scan_file(path)
    assert (scan.status, scan.chars, scan.preview) == ("ok", 7, "가\n나\n   \n다")


def test_jsonl_custom_field(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "이야기", "text": "아님"}])
    assert list(iter_documents(path, "utf-8", jsonl_field="body")) == ["이야기"]
    assert scan_file(path, jsonl_field="body").preview == "이야기"


@pytest.mark.parametrize(
    "bad, message",
    [("{not json", "not a JSON record"), ('{"body": "x"}', "no 'text' field"), ('{"text": 3}', "is int")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "가"}, bad], blank_lines=False)
    with pytest.raises(UserError, match=rf"d\.jsonl:2: .*{message}"):
        list(iter_documents(path, "utf-8"))
    with pytest.raises(UserError, match=r"d\.jsonl:2: "):
        scan_file(path)


def test_jsonl_with_only_blank_texts_is_empty(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": " \n "}])
    assert scan_file(path).status == "empty"


def test_training_documents_are_cut_at_line_ends_when_huge(tmp_path, monkeypatch):
    import peftko.textfiles as textfiles

    monkeypatch.setattr(textfiles, "MAX_DOC_CHARS", 50)
    path = tmp_path / "long.txt"
    lines = [f"{i:02d} 긴 책의 한 줄입니다. 끝없이 이어집니다." for i in range(20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(textfiles.iter_documents(path, "utf-8", doc_end_marker=""))
    assert len(docs) > 5
    assert "\n".join(docs) == "\n".join(lines)  # nothing lost, every cut at a line end
    located = list(textfiles.iter_located_documents(path, "utf-8", doc_end_marker=""))
    assert len(located) == 1  # lint still sees the whole document
