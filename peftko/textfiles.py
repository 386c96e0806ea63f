"""Finding corpus files, telling their encoding, and reading them as normalised documents.

Korean corpora arrive as UTF-8 (with or without a BOM), UTF-16 from Windows tools, and CP949
from older Korean software. Every reader here streams: a file is read in ~1 MB chunks through
an incremental decoder, so a 2 GB corpus never needs to sit in memory at once. Text is always
normalised the same way (BOM dropped, CRLF/CR -> LF, NFC), because the same syllable written as
NFD jamo would otherwise become different tokens.
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

from peftko.errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl")
CHUNK_BYTES = 1 << 20
PREVIEW_CHARS = 200
MAX_DOC_CHARS = 1 << 22  # 4M characters, about ten long novels
BOM = "\ufeff"
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Bytes that never appear in text files except as damage: C0 controls other than tab, LF, FF,
# CR, ESC (ANSI colours in logs), and DEL.
CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
# Above this share of control bytes a file that decodes is still treated as binary.
BINARY_CONTROL_FRACTION = 0.1
_NOT_SPACE = re.compile(r"[^\s\ufeff]")


@dataclass(frozen=True)
class FileScan:
    """What one corpus file turned out to be."""

    path: Path
    encoding: str | None  # "utf-8", "utf-8-sig", "utf-16", "cp949", or None when not text
    status: str  # "ok" | "empty" | "binary" | "undecodable"
    chars: int  # characters after decoding + normalising (for .jsonl: of the text fields)
    preview: str  # first 200 characters after decoding + NFC ("" unless ok)


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


# --- decoding


def normalize_text(text: str) -> str:
    """Drop leading BOMs, turn CRLF and CR into LF, compose to NFC (never NFKC: it rewrites
    full-width punctuation and compatibility jamo that authors chose on purpose)."""
    text = text.lstrip(BOM).replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


class _Trial:
    """One candidate decoding fed chunk by chunk; remembers failure and whether any text was seen."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.failed = False
        self.has_text = False

    def feed(self, chunk: bytes, final: bool = False) -> None:
        if self.failed:
            return
        try:
            text = self.decoder.decode(chunk, final=final)
        except UnicodeDecodeError:
            self.failed = True
            return
        if not self.has_text and _NOT_SPACE.search(text):
            self.has_text = True


def detect_encoding(path: Path) -> tuple[str | None, str]:
    """(encoding, status) after reading the whole file once, in chunks.

    UTF-8 and CP949 are tried side by side over every chunk: CP949 bytes are rarely valid UTF-8,
    but "rarely" is decided by the whole file, not a prefix.
    """
    with Path(path).open("rb") as f:
        head = f.read(CHUNK_BYTES)
        if not head:
            return None, "empty"
        if head.startswith(UTF16_BOMS):
            trials = [_Trial("utf-16")]
        else:
            sig = "utf-8-sig" if head.startswith(codecs.BOM_UTF8) else "utf-8"
            trials = [_Trial(sig), _Trial("cp949")]
        size, nul, control = 0, False, 0
        chunk = head
        while chunk:
            size += len(chunk)
            nul = nul or b"\x00" in chunk
            control += len(chunk) - len(chunk.translate(None, CONTROL_BYTES))
            for trial in trials:
                trial.feed(chunk)
            chunk = f.read(CHUNK_BYTES)
    for trial in trials:
        trial.feed(b"", final=True)
    return _verdict(trials, nul, control / size)


def _verdict(trials: list[_Trial], nul: bool, control_fraction: float) -> tuple[str | None, str]:
    # UTF-16 text is full of NUL bytes by design, so only BOM-less files are judged by bytes.
    utf16 = trials[0].encoding == "utf-16"
    if not utf16 and (nul or control_fraction > BINARY_CONTROL_FRACTION):
        return None, "binary"
    for trial in trials:
        if not trial.failed:
            return trial.encoding, "ok" if trial.has_text else "empty"
    return None, "undecodable"


# --- reading


def iter_lines(path: Path, encoding: str) -> Iterator[str]:
    """Normalised lines, each ending in "\\n" except possibly the last, streamed in chunks."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    partial: list[str] = []
    held_cr = ""
    first = True
    try:
        with Path(path).open("rb") as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                text = held_cr + decoder.decode(chunk, final=not chunk)
                # A CR at a chunk edge may be half of a CRLF: decide once the next chunk is in.
                held_cr = "\r" if chunk and text.endswith("\r") else ""
                text = text[:-1] if held_cr else text
                pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                for piece in pieces[:-1]:
                    partial.append(piece)
                    yield _finish_line("".join(partial) + "\n", first)
                    partial, first = [], False
                partial.append(pieces[-1])
                if not chunk:
                    break
    except UnicodeDecodeError as e:
        # Detection read the same bytes cleanly, so the file changed while we were reading it.
        raise UserError(f"{path}: cannot decode as {encoding} ({e.reason}); did it change?") from None
    last = "".join(partial)
    if last:
        yield _finish_line(last, first)


def _finish_line(line: str, first: bool) -> str:
    # Per-line NFC equals whole-text NFC: a newline never composes with its neighbours.
    return unicodedata.normalize("NFC", line.lstrip(BOM) if first else line)


def iter_documents(
    path: Path,
    encoding: str,
    jsonl_field: str = "text",
    doc_end_marker: str = "|END_OF_BOOK|>",
) -> Iterator[str]:
    """Normalised documents of one file (see iter_located_documents for the rules).

    For training, a document longer than MAX_DOC_CHARS is cut at a line end into pieces, so memory
    stays bounded whatever the file; each piece is then packed as a document of its own.
    """
    for doc in iter_located_documents(path, encoding, jsonl_field, doc_end_marker, MAX_DOC_CHARS):
        yield doc.text


def iter_located_documents(
    path: Path,
    encoding: str,
    jsonl_field: str = "text",
    doc_end_marker: str = "|END_OF_BOOK|>",
    max_chars: int | None = None,
) -> Iterator[Document]:
    """Documents with the file line they start on.

    .jsonl: one document per record's `jsonl_field`. .txt/.md: split after each
    `doc_end_marker` (which stays at the end of its document); "" means one document per file.
    Leading and trailing blank lines are dropped; whitespace-only documents are skipped.
    max_chars: cut a longer .txt/.md document at the next line end (None: never; lint needs whole ones).
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path, encoding, jsonl_field)
    else:
        yield from _text_documents(path, encoding, doc_end_marker, max_chars)


def _text_documents(path: Path, encoding: str, marker: str, max_chars: int | None = None) -> Iterator[Document]:
    parts: list[str] = []
    size, start = 0, 1
    for number, line in enumerate(iter_lines(path, encoding), start=1):
        rest = line
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
        if max_chars and size >= max_chars and rest.endswith("\n"):
            # A file with no end marker must not become one multi-GB string: cut at a line end.
            if doc := _trim("".join(parts), start):
                yield doc
            parts, size = [], 0
    if doc := _trim("".join(parts), start):
        yield doc


def _trim(text: str, start: int, one_line: bool = False) -> Document | None:
    """Drop leading/trailing blank lines but keep the first and last content lines whole."""
    first = _NOT_SPACE.search(text)
    if first is None:
        return None
    begin = text.rfind("\n", 0, first.start()) + 1
    last = len(text.rstrip()) - 1
    end = text.find("\n", last)
    body = text[begin : end if end >= 0 else len(text)]
    line = start if one_line else start + text.count("\n", 0, begin)
    return Document(body, line, one_line)


def _jsonl_documents(path: Path, encoding: str, field: str) -> Iterator[Document]:
    for number, line in enumerate(iter_lines(path, encoding), start=1):
        if not line.strip():
            continue  # blank lines between records are common and harmless
        value = _jsonl_text(path, number, line, field)
        if doc := _trim(normalize_text(value), number, one_line=True):
            yield doc


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
        encoding, status = detect_encoding(path)
        if status != "ok":
            return FileScan(path, encoding, status, 0, "")
        chars, preview, has_text = _measure(path, encoding, jsonl_field)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not has_text:  # e.g. a .jsonl whose text fields are all blank
        return FileScan(path, encoding, "empty", 0, "")
    return FileScan(path, encoding, "ok", chars, preview)


def _measure(path: Path, encoding: str, jsonl_field: str) -> tuple[int, str, bool]:
    """(chars, preview, any non-space text); for .jsonl only the text fields count."""
    jsonl = path.suffix.lower() == ".jsonl"
    chars, head, has_text = 0, [], False
    for text in _jsonl_texts(path, encoding, jsonl_field) if jsonl else iter_lines(path, encoding):
        if chars < PREVIEW_CHARS:
            head.append(text)
        chars += len(text)
        has_text = has_text or bool(_NOT_SPACE.search(text))
    return chars, ("\n" if jsonl else "").join(head)[:PREVIEW_CHARS], has_text


def _jsonl_texts(path: Path, encoding: str, field: str) -> Iterator[str]:
    for number, line in enumerate(iter_lines(path, encoding), start=1):
        if line.strip():
            yield normalize_text(_jsonl_text(path, number, line, field))
