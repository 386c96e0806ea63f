"""Finding corpus files and reading them as normalised documents, streamed.

Every reader here streams: a file is read in ~1 MB chunks through an incremental decoder in the
encoding that peftko.corpus.encoding found, so a 2 GB corpus never needs to sit in memory at
once, and a line or document too long to hold is cut where the text allows (a sentence end,
never inside a marker).
"""

from __future__ import annotations

import codecs
import json
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from peftko.core.config import DEFAULT_DOC_END
from peftko.core.errors import UserError
from peftko.corpus.encoding import BOM, CHUNK_BYTES, NOT_SPACE, detect_file, normalize_text

SUFFIXES = (".txt", ".md", ".jsonl")
PREVIEW_CHARS = 200
# Training documents are cut at this length (at a line end): the tokenizer holds 100-350 bytes per
# character of the text it is given, so 256k characters (a long book) keep it under ~100 MB.
MAX_DOC_CHARS = 1 << 18
# A line longer than this is read in pieces (see _cut_point): a file with no line breaks must not
# become one string the size of the file.
MAX_LINE_CHARS = 1 << 20
# How far back from MAX_LINE_CHARS a piece may end: room enough to find a sentence end.
CUT_WINDOW = 1 << 16
# A .jsonl record is one JSON value and cannot be cut; longer lines are refused with their number.
MAX_RECORD_CHARS = 1 << 25
# Where a long line is best cut, in order of preference; each cut falls after the whitespace.
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f\u2026][\"'\u201d\u2019)\]]*\s+")
_KOREAN_END = re.compile(r"(?:니다|[어아에해예]요|[었였했한는이]다|죠)\s+")  # sentence-final forms
_SPACE = re.compile(r"\s+")
# Characters a cut may fall just before without changing NFC: none of them composes with what
# precedes it (Latin/ASCII below U+0300, CJK, kana, precomposed Hangul, leading jamo).
_SAFE_START = re.compile("[\x00-\u02ff\u1100-\u1112\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff\uac00-\ud7a3]")
# Anything shaped like a marker or a slip of one (`|SOUND|>`, `|SOUND |>`), matched from its first
# bar: never cut inside. No '>' inside, so a match never starts at the closing bar of a marker.
_MARKER_SHAPE = re.compile(r"\|+[^|\n>]{0,80}\|+>?")


@dataclass(frozen=True)
class FileScan:
    """What one corpus file turned out to be."""

    path: Path
    encoding: str | None  # "utf-8", "utf-8-sig", "utf-16", "cp949", or None when not text
    status: str  # "ok" | "empty" | "binary" | "undecodable" | "unreadable"
    chars: int  # characters after decoding + normalising (for .jsonl: of the text fields)
    preview: str  # first 200 characters after decoding + NFC ("" unless ok)
    detail: str = ""  # why, for undecodable ("invalid UTF-8 at line ...") and unreadable (the OS reason)

    def describe(self) -> str:
        """The status with its reason, as messages show it."""
        return f"{self.status}: {self.detail}" if self.detail else self.status


@dataclass(frozen=True)
class Document:
    """One training document and where it starts, so lint can name a file line."""

    text: str
    line: int  # 1-based file line of the document's first character
    one_line: bool = False  # .jsonl: the whole text comes from file line `line`


# --- finding files


def find_files(paths: Sequence[str | Path]) -> list[Path]:
    """Corpus files under `paths`, in the order given, folders walked recursively and sorted.

    A file named directly is taken even if hidden, but must have a corpus suffix: silently
    skipping something the user asked for would train on less than they think.
    """
    found: dict[Path, None] = {}  # ordered set: a file given twice is read once
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"no such file or folder: {raw}")
        if path.is_dir():
            found.update(dict.fromkeys(_walk(path)))
        elif _has_suffix(path):
            found[path] = None
        else:
            raise UserError(f"{raw}: not a corpus file (expected {', '.join(SUFFIXES)})")
    if not found:
        shown = ", ".join(str(p) for p in paths) or "(no paths)"
        raise UserError(f"no corpus files ({', '.join(SUFFIXES)}) found in: {shown}")
    return list(found)


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        # Pruning in place keeps os.walk out of .git, .cache and friends entirely.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _has_suffix(Path(name)):
                yield Path(root) / name


def _has_suffix(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


# --- reading


def iter_lines(path: Path, encoding: str, max_chars: int | None = None) -> Iterator[str]:
    """Normalised lines, each ending in "\\n" except possibly the last, streamed in chunks.

    max_chars: a longer line comes in pieces of at most max_chars (see _cut_point), only the last
    of which ends in "\\n"; memory then stays bounded however long a line is.
    """
    for text, _ in iter_pieces(path, encoding, max_chars):
        yield text


def iter_pieces(
    path: Path, encoding: str, max_chars: int | None, protect: str = ""
) -> Iterator[tuple[str, bool]]:
    """(text, ends_line): lines as iter_lines gives them; ends_line is False for a piece of a
    line longer than max_chars that the next piece continues. No cut splits `protect`."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    partial: list[str] = []
    size = 0
    held_cr = ""
    at_start = True
    try:
        with Path(path).open("rb") as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                text = held_cr + decoder.decode(chunk, final=not chunk)
                if at_start:  # BOMs at the start of the file are encoding marks, not text
                    text = text.lstrip(BOM)
                    at_start = not text
                # A CR at a chunk edge may be half of a CRLF: decide once the next chunk is in.
                held_cr = "\r" if chunk and text.endswith("\r") else ""
                text = text[:-1] if held_cr else text
                lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                for line in lines[:-1]:
                    partial.append(line)
                    yield from _pieces_of("".join(partial) + "\n", max_chars, protect)
                    partial, size = [], 0
                partial.append(lines[-1])
                size += len(lines[-1])
                if max_chars and size > max_chars:
                    rest = yield from _pieces_of("".join(partial), max_chars, protect, last_ends_line=None)
                    partial, size = [rest], len(rest)
                if not chunk:
                    break
    except UnicodeDecodeError as e:
        # Detection read the same bytes cleanly, so the file changed while we were reading it.
        raise UserError(f"{path}: cannot decode as {encoding} ({e.reason}); did it change?") from None
    if last := "".join(partial):
        yield _nfc(last), True


def _pieces_of(line: str, max_chars: int | None, protect: str, last_ends_line: bool | None = True):
    """Yield `line` in pieces of at most max_chars; with last_ends_line None, keep the final
    piece back (more of the line is still to come) and return it."""
    while max_chars and len(line) > max_chars:
        cut = _cut_point(line, max_chars, protect)
        yield _nfc(line[:cut]), False
        line = line[cut:]
    if last_ends_line is None:
        return line
    yield _nfc(line), True
    return ""


def _cut_point(line: str, limit: int, protect: str = "") -> int:
    """Where to end a piece of an over-long line: 0 < cut <= limit.

    Prefer the last sentence end (. ! ? 。, then a Korean sentence-final form) followed by space,
    then any space, then a character boundary that NFC cannot join across. Never inside anything
    shaped like a marker, so `|END_OF_TITLE|>` stays one piece of text, nor inside `protect`.
    """
    low = max(1, limit - CUT_WINDOW)
    for rx in (_SENTENCE_END, _KOREAN_END, _SPACE):
        for m in reversed(list(rx.finditer(line, low, limit))):
            if not _inside_marker(line, m.end(), protect):
                return m.end()
    for cut in range(limit, low - 1, -1):
        if _SAFE_START.match(line, cut) and not _inside_marker(line, cut, protect):
            return cut
    return limit  # no safe boundary in the window: text this odd is cut where it stands


def _inside_marker(line: str, cut: int, protect: str = "") -> bool:
    # Try a match at every bar shortly before the cut: a scan that started mid-marker could pair
    # that marker's closing bar with the next marker's opening one and miss the marker at the cut.
    if line.startswith("<|", cut - 1):  # `<|SOUND|>`, a slip the lint should still see whole
        return True
    bar = line.find("|", max(0, cut - 90), cut)
    while bar >= 0:
        m = _MARKER_SHAPE.match(line, bar)
        if m and m.end() > cut:
            return True
        bar = line.find("|", bar + 1, cut)
    if not protect:
        return False
    found = line.find(protect, max(0, cut - len(protect) + 1), cut + len(protect) - 1)
    return 0 <= found < cut < found + len(protect)


def _nfc(text: str) -> str:
    # Per-line NFC equals whole-text NFC: a newline never composes with its neighbours, and a
    # piece of a long line is cut only before a character nothing composes with.
    return unicodedata.normalize("NFC", text)


def iter_documents(
    path: Path,
    encoding: str,
    jsonl_field: str = "text",
    doc_end_marker: str = DEFAULT_DOC_END,
) -> Iterator[str]:
    """Normalised documents of one file (see iter_located_documents for the rules).

    For training, a document longer than MAX_DOC_CHARS is cut into pieces, so memory stays bounded
    whatever the file; each piece is then packed as a document of its own.
    """
    for doc in iter_located_documents(path, encoding, jsonl_field, doc_end_marker, MAX_DOC_CHARS):
        yield doc.text


def iter_located_documents(
    path: Path,
    encoding: str,
    jsonl_field: str = "text",
    doc_end_marker: str = DEFAULT_DOC_END,
    max_chars: int | None = None,
) -> Iterator[Document]:
    """Documents with the file line they start on.

    .jsonl: one document per record's `jsonl_field`. .txt/.md: split after each
    `doc_end_marker` (which stays at the end of its document); "" means one document per file.
    Leading and trailing blank lines are dropped; whitespace-only documents are skipped.
    max_chars: cut a longer .txt/.md document at the next line end, or, on a line longer than
    MAX_LINE_CHARS, at the next piece of it (a sentence end where there is one; None: never).
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, encoding, jsonl_field)
    else:
        yield from _text_documents(path, encoding, doc_end_marker, max_chars)


def _text_documents(path: Path, encoding: str, marker: str, max_chars: int | None = None) -> Iterator[Document]:
    parts: list[str] = []
    size, start, number = 0, 1, 1  # number: the file line the next piece starts on
    for piece, ends_line in iter_pieces(path, encoding, min(MAX_LINE_CHARS, max_chars or MAX_LINE_CHARS), marker):
        rest = piece
        while marker and (cut := rest.find(marker)) >= 0:
            cut += len(marker)
            if not parts:
                start = number
            parts.append(rest[:cut])
            if doc := _trim("".join(parts), start):
                yield doc
            parts, rest, size = [], rest[cut:], 0
        if rest:
            if not parts:
                start = number
            parts.append(rest)
            size += len(rest)
        if max_chars and (size >= max_chars or not ends_line):
            # A file with no end marker must not become one multi-GB string: cut at a line end, or
            # where iter_pieces cut an over-long line (no longer than max_chars, so a document of
            # a line-free file is one piece).
            if doc := _trim("".join(parts), start):
                yield doc
            parts, size = [], 0
        number += ends_line
    if doc := _trim("".join(parts), start):
        yield doc


def _trim(text: str, start: int, one_line: bool = False) -> Document | None:
    """Drop leading/trailing blank lines but keep the first and last content lines whole."""
    first = NOT_SPACE.search(text)
    if first is None:
        return None
    begin = text.rfind("\n", 0, first.start()) + 1
    last = len(text.rstrip()) - 1
    end = text.find("\n", last)
    body = text[begin : end if end >= 0 else len(text)]
    line = start if one_line else start + text.count("\n", 0, begin)
    return Document(body, line, one_line)


def _jsonl_documents(path: Path, encoding: str, field: str) -> Iterator[Document]:
    for number, line in _jsonl_lines(path, encoding):
        if not line.strip():
            continue  # blank lines between records are common and harmless
        value = _jsonl_text(path, number, line, field)
        if doc := _trim(normalize_text(value), number, one_line=True):
            yield doc


def _jsonl_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line): whole lines, or a UserError for one too long to be a record."""
    for number, (line, ends_line) in enumerate(iter_pieces(path, encoding, MAX_RECORD_CHARS), start=1):
        if not ends_line:
            raise UserError(f"{path}:{number}: a record longer than {MAX_RECORD_CHARS:,} characters; "
                            "split it into several records (one document each)")
        yield number, line


def _jsonl_text(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}:{number}: no {field!r} field (found: {keys}); set --jsonl-field")
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{path}:{number}: field {field!r} is {type(value).__name__}, not text")
    return value


# --- one file


def scan_file(path: Path, jsonl_field: str = "text") -> FileScan:
    """Encoding, status, size and a preview of one file (two streamed passes when it is text)."""
    path = Path(path)
    try:
        encoding, status, detail = detect_file(path)
        if status != "ok":
            return FileScan(path, encoding, status, 0, "", detail)
        chars, preview, has_text = _measure(path, encoding, jsonl_field)
    except OSError as e:
        # Permission denied, a dangling link, an I/O error: reported like binary files, so
        # --skip-bad-files can train on the rest and the refusal lists every such file.
        return FileScan(path, None, "unreadable", 0, "", e.strerror or str(e))
    if not has_text:  # e.g. a .jsonl whose text fields are all blank
        return FileScan(path, encoding, "empty", 0, "")
    return FileScan(path, encoding, "ok", chars, preview)


def _measure(path: Path, encoding: str, jsonl_field: str) -> tuple[int, str, bool]:
    """(chars, preview, any non-space text); for .jsonl only the text fields count."""
    jsonl = path.suffix.lower() == ".jsonl"
    chars, head, has_text = 0, [], False
    for text in _jsonl_texts(path, encoding, jsonl_field) if jsonl else iter_lines(path, encoding, MAX_LINE_CHARS):
        if chars < PREVIEW_CHARS:
            head.append(text)
        chars += len(text)
        has_text = has_text or bool(NOT_SPACE.search(text))
    return chars, ("\n" if jsonl else "").join(head)[:PREVIEW_CHARS], has_text


def _jsonl_texts(path: Path, encoding: str, field: str) -> Iterator[str]:
    for number, line in _jsonl_lines(path, encoding):
        if line.strip():
            yield normalize_text(_jsonl_text(path, number, line, field))
