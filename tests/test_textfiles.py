"""Finding and decoding corpus files: every encoding Korean corpora arrive in, and the failures."""

from __future__ import annotations

import codecs
import json
import os
import unicodedata
from pathlib import Path

import pytest

from peftko.core.errors import UserError
from peftko.corpus import documents, encoding
from peftko.corpus.documents import find_files, iter_documents, iter_located_documents, scan_file
from peftko.corpus.encoding import UTF16_HINT, detect_file, normalize_text
from tests.conftest import deny_open


def detect_encoding(path: Path) -> tuple[str | None, str]:
    """(encoding, status) of a file, as scan_file reads them."""
    return detect_file(path)[:2]

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
    monkeypatch.setattr(encoding, "CHUNK_BYTES", 64)
    path = write(tmp_path / "late.txt", ("abc " * 100 + "똠\n").encode("cp949"))
    assert detect_encoding(path) == ("cp949", "ok")


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_crlf_and_cr_become_lf(tmp_path, newline):
    path = write(tmp_path / "nl.txt", KOREAN.replace("\n", newline))
    assert scan_file(path).preview == KOREAN
    assert list(iter_documents(path, "utf-8")) == [KOREAN.rstrip("\n")]


def test_crlf_split_across_chunks_is_one_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "CHUNK_BYTES", 4)
    path = write(tmp_path / "nl.txt", b"abc\r\ndef\r\n\r\nghi")  # "\r" ends the first chunk
    assert list(documents.iter_lines(path, "utf-8")) == ["abc\n", "def\n", "\n", "ghi"]


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


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_its_byte_order_mark_is_refused_with_the_reason(tmp_path, encoding):
    """Not guessed (the wrong byte order trains on garbage), but said, so the user knows what to fix."""
    text = "|START_OF_TITLE|>반딧불이 숲|END_OF_TITLE|>\n\"안녕?\" 쉿!\n" * 3
    scan = scan_file(write(tmp_path / "x.txt", text.encode(encoding)))
    assert (scan.status, scan.detail) == ("binary", UTF16_HINT)
    assert "UTF-16" in scan.describe() and "byte-order mark" in scan.describe()


@pytest.mark.parametrize("data", [PNG_HEADER, b"text\x00with a NUL", bytes(range(256)) * 4,
                                  "반딧불이 숲\x01".encode("utf-16-le")])
def test_other_binary_files_get_no_utf16_hint(tmp_path, data):
    assert scan_file(write(tmp_path / "x.bin.txt", data)).detail == ""


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
    monkeypatch.setattr(documents, "CHUNK_BYTES", 7)
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
    monkeypatch.setattr(documents, "MAX_DOC_CHARS", 50)
    path = tmp_path / "long.txt"
    lines = [f"{i:02d} 긴 책의 한 줄입니다. 끝없이 이어집니다." for i in range(20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(documents.iter_documents(path, "utf-8", doc_end_marker=""))
    assert len(docs) > 5
    assert "\n".join(docs) == "\n".join(lines)  # nothing lost, every cut at a line end
    located = list(documents.iter_located_documents(path, "utf-8", doc_end_marker=""))
    assert len(located) == 1  # lint still sees the whole document


# --- over-long lines: bounded memory, cuts that change nothing


def _one_line(repeats: int) -> str:
    sentence = "|START_OF_DIALOGUE|>\"엄마, 우산 어디 있어요?\"|END_OF_DIALOGUE|> 하늘이는 창문을 열었습니다. |SOUND|>쿵! "
    return sentence * repeats


def test_a_line_without_line_breaks_is_read_in_pieces_cut_after_sentence_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_LINE_CHARS", 300)
    text = _one_line(40)
    path = write(tmp_path / "one.txt", text)
    pieces = list(documents.iter_pieces(path, "utf-8", documents.MAX_LINE_CHARS))
    assert len(pieces) > 5 and all(len(p) <= 300 for p, _ in pieces)
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _ in pieces) == text
    for piece, _ in pieces[:-1]:
        assert piece.endswith(("다. ", "! ", "? ")), piece[-20:]


@pytest.mark.parametrize("form", ["NFC", "NFD"])
def test_a_line_without_spaces_is_cut_between_characters_never_inside_a_marker(tmp_path, monkeypatch, form):
    monkeypatch.setattr(documents, "MAX_LINE_CHARS", 97)
    unit = "달빛우체부|END_OF_TITLE|>하늘이는창문을열었습니다"  # no space, no sentence end
    text = unit * 60
    path = write(tmp_path / "dense.txt", unicodedata.normalize(form, text))
    pieces = [p for p, _ in documents.iter_pieces(path, "utf-8", documents.MAX_LINE_CHARS)]
    assert len(pieces) > 10
    assert "".join(pieces) == text  # NFD jamo are never cut apart from the syllable they build
    assert sum(p.count("|END_OF_TITLE|>") for p in pieces) == 60
    assert all(unicodedata.is_normalized("NFC", p) for p in pieces)


def test_a_custom_document_end_marker_is_never_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_LINE_CHARS", 50)
    monkeypatch.setattr(documents, "MAX_DOC_CHARS", 50)
    books = [f"이야기{i}" * 7 + "<<끝>>" for i in range(30)]  # not marker-shaped, no spaces
    path = write(tmp_path / "books.txt", "".join(books))
    assert list(iter_documents(path, "utf-8", doc_end_marker="<<끝>>"))[-1].endswith("<<끝>>")
    docs = list(iter_documents(path, "utf-8", doc_end_marker="<<끝>>"))
    assert "".join(docs) == "".join(books)
    assert sum(d.count("<<끝>>") for d in docs) == 30 and all(len(d) <= 100 for d in docs)


def test_training_documents_of_a_one_line_file_are_bounded_and_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_LINE_CHARS", 1000)
    monkeypatch.setattr(documents, "MAX_DOC_CHARS", 3000)
    text = _one_line(300)
    path = write(tmp_path / "one.txt", text)
    docs = list(documents.iter_located_documents(path, "utf-8", doc_end_marker="", max_chars=3000))
    assert len(docs) > 5 and all(len(d.text) <= 4000 for d in docs)
    assert all(d.line == 1 for d in docs)
    assert "".join(d.text for d in docs) == text
    # Lines after a cut line keep their numbers.
    path = write(tmp_path / "two.txt", text + "\n둘째 줄\n")
    last = list(documents.iter_located_documents(path, "utf-8", doc_end_marker="", max_chars=3000))[-1]
    assert last.text.endswith("둘째 줄") and last.line <= 2


def _peak_bytes(path: Path) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        for _ in iter_documents(path, "utf-8", doc_end_marker=""):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_length_of_a_line(tmp_path, monkeypatch):
    # Small caps keep the test quick; the property is the same with the real ones.
    monkeypatch.setattr(documents, "MAX_LINE_CHARS", 1 << 16)
    monkeypatch.setattr(documents, "MAX_DOC_CHARS", 1 << 18)
    unit = _one_line(1).encode("utf-8")
    small = write(tmp_path / "small.txt", unit * ((1 << 20) // len(unit)))
    big = write(tmp_path / "big.txt", unit * ((8 << 20) // len(unit)))
    small_peak, big_peak = _peak_bytes(small), _peak_bytes(big)
    # Read whole, the 8 MB line alone would take over 8 MB as a str (2.7 M Hangul-wide chars).
    assert big_peak < small_peak * 1.5 + (1 << 20), (small_peak, big_peak)
    assert big_peak < 8 << 20


def test_a_jsonl_record_longer_than_the_cap_is_refused_with_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_RECORD_CHARS", 100)
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "짧다"}, {"text": "길다" * 200}], blank_lines=False)
    with pytest.raises(UserError, match=r"d\.jsonl:2: a record longer than 100 characters"):
        list(iter_documents(path, "utf-8"))


# --- where an undecodable file goes wrong


def test_invalid_utf8_names_line_and_byte_offset(tmp_path, monkeypatch):
    lines = [f"{i}번째 줄: 하늘이는 창문을 열었습니다.\r\n" for i in range(40)]
    good = "".join(lines).encode("utf-8")
    cut = len("".join(lines[:25]).encode("utf-8")) + len("25번".encode("utf-8"))
    path = write(tmp_path / "bad.txt", good[:cut] + b"\xff" + good[cut:])
    expected = f"invalid UTF-8 at line 26, byte offset {cut} (0xff)"
    scan = scan_file(path)
    assert (scan.encoding, scan.status) == (None, "undecodable")
    assert scan.detail.startswith(expected), scan.detail
    assert scan.describe().startswith("undecodable: " + expected)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 5)  # the bad byte after a held-back partial character
    assert scan_file(path).detail.startswith(expected)


def test_damaged_utf8_that_cp949_would_read_is_not_taken_for_cp949(tmp_path):
    data = "각각각각 각각각각 각각\n".encode("utf-8") + b"\xb0\xa1\n"  # then CP949 "가"
    data.decode("cp949")  # the whole file is valid CP949: it used to be read as mojibake
    path = write(tmp_path / "mixed.txt", data)
    scan = scan_file(path)
    assert scan.status == "undecodable"
    assert scan.detail.startswith("invalid UTF-8 at line 2, byte offset 33 (0xb0)"), scan.detail


def test_damaged_cp949_names_where_cp949_fails(tmp_path):
    data = ("똠이는 장터에 갔습니다.\n" * 3).encode("cp949") + b"\xff\xff\n"
    scan = scan_file(write(tmp_path / "old.txt", data))
    assert scan.status == "undecodable"
    assert scan.detail == f"invalid CP949 at line 4, byte offset {len(data) - 3} (0xff)"


def test_damaged_utf16_names_where_it_fails(tmp_path):
    data = codecs.BOM_UTF16_BE + "가\n나\n".encode("utf-16-be") + b"\xdc\x00" + "다".encode("utf-16-be")
    scan = scan_file(write(tmp_path / "u16.txt", data))
    assert scan.status == "undecodable" and scan.detail.startswith("invalid UTF-16 at line 3, byte offset 10")


# --- files that cannot be opened


def test_a_file_that_cannot_be_opened_is_unreadable_with_the_reason(tmp_path, monkeypatch):
    path = write(tmp_path / "locked.txt", KOREAN)
    deny_open(monkeypatch, path)
    scan = scan_file(path)
    assert (scan.status, scan.encoding, scan.detail) == ("unreadable", None, "Permission denied")


def test_a_dangling_link_in_a_folder_is_unreadable(tmp_path):
    write(tmp_path / "c" / "a.txt", KOREAN)
    (tmp_path / "c" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    scans = {p.name: scan_file(p) for p in find_files([tmp_path / "c"])}
    assert scans["a.txt"].status == "ok"
    assert (scans["gone.txt"].status, scans["gone.txt"].detail) == ("unreadable", "No such file or directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; see the two tests above")
def test_a_file_without_read_permission_is_unreadable(tmp_path):
    path = write(tmp_path / "locked.txt", KOREAN)
    path.chmod(0)
    try:
        assert scan_file(path).describe() == "unreadable: Permission denied"
    finally:
        path.chmod(0o644)


def test_no_cut_falls_inside_a_marker_wherever_the_limit_falls():
    import re

    line = "달빛우체부|END_OF_TITLE|>하늘이는창문을열었습니다<|SOUND|>" * 40  # no space to cut after
    spans = [m.span() for m in re.finditer(r"<?\|[A-Z_]+\|>", line)]
    for limit in range(40, 600):
        cut = documents._cut_point(line, limit)
        assert 0 < cut <= limit
        assert not any(start < cut < end for start, end in spans), (limit, line[cut - 15 : cut + 15])
