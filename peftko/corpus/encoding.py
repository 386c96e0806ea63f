"""Telling a corpus file's encoding, as Korean corpora arrive: UTF-8 (with or without a BOM),
UTF-16 from Windows tools, and CP949 from older Korean software.

A file is read once, in ~1 MB chunks, through incremental decoders tried side by side, so a 2 GB
corpus never sits in memory and a stray byte late in a file is not missed. Text is always
normalised the same way (BOM dropped, CRLF/CR -> LF, NFC), because the same syllable written as
NFD jamo would otherwise become different tokens.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from pathlib import Path

CHUNK_BYTES = 1 << 20
# Decoding this many Hangul syllables as UTF-8 before the first invalid byte means the file is
# damaged UTF-8: CP949 text fails UTF-8 at (nearly) its first syllable, and reading UTF-8 as CP949
# would train on mojibake.
UTF8_EVIDENCE_SYLLABLES = 8
BOM = "\ufeff"
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
UTF16_HINT = "NUL bytes in every other position, as in UTF-16 saved without a byte-order mark: save it as UTF-8"
# Bytes that never appear in text files except as damage: C0 controls other than tab, LF, FF,
# CR, ESC (ANSI colours in logs), and DEL.
CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
# Above this share of control bytes a file that decodes is still treated as binary.
BINARY_CONTROL_FRACTION = 0.1
NOT_SPACE = re.compile(r"[^\s\ufeff]")
_CONTROL_CHARS = re.compile("[" + re.escape(CONTROL_BYTES.decode("latin-1")) + "]")
_HANGUL = re.compile("[\uac00-\ud7a3]")


def normalize_text(text: str) -> str:
    """Drop leading BOMs, turn CRLF and CR into LF, compose to NFC (never NFKC: it rewrites
    full-width punctuation and compatibility jamo that authors chose on purpose)."""
    text = text.lstrip(BOM).replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


class _Trial:
    """One candidate decoding fed chunk by chunk.

    Remembers whether any text was seen, how many Hangul syllables it decoded, and where it first
    failed (byte offset from 0, 1-based line, the byte), so a damaged file can be fixed in place.
    """

    def __init__(self, encoding: str):
        self.encoding = encoding
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.failure: tuple[int, int, int] | None = None  # (byte offset, line, byte value)
        self.has_text = False
        self.syllables = 0  # counted up to UTF8_EVIDENCE_SYLLABLES only
        self.offset = 0  # bytes fed so far
        self.line_ends = 0
        self.last_cr = False

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def feed(self, chunk: bytes, final: bool = False) -> None:
        if self.failed:
            return
        state = self.decoder.getstate()
        try:
            text = self.decoder.decode(chunk, final=final)
        except UnicodeDecodeError as e:
            self._fail(e, state, chunk)
            return
        self.offset += len(chunk)
        self._count(text)

    def _count(self, text: str) -> None:
        if not self.has_text and NOT_SPACE.search(text):
            self.has_text = True
        if self.syllables < UTF8_EVIDENCE_SYLLABLES:
            self.syllables += len(_HANGUL.findall(text, 0, 4096))
        # CRLF, CR and LF each end one line, as iter_lines reads them.
        self.line_ends += text.count("\n") + text.count("\r") - text.count("\r\n")
        if self.last_cr and text.startswith("\n"):
            self.line_ends -= 1
        if text:
            self.last_cr = text.endswith("\r")

    def _fail(self, e: UnicodeDecodeError, state: tuple[bytes, int], chunk: bytes) -> None:
        # e.object is the decoder's held-back bytes followed by this chunk.
        base = self.offset + len(chunk) - len(e.object)
        before = codecs.getincrementaldecoder(self.encoding)(errors="replace")
        before.setstate((b"", state[1]))
        self._count(before.decode(e.object[: e.start]))
        self.failure = (base + e.start, self.line_ends + 1, e.object[e.start])

    def describe_failure(self) -> str:
        assert self.failure is not None
        offset, line, byte = self.failure
        name = {"utf-8-sig": "UTF-8", "cp949": "CP949"}.get(self.encoding, self.encoding.upper())
        return f"invalid {name} at line {line}, byte offset {offset} (0x{byte:02x})"


def detect_file(path: Path) -> tuple[str | None, str, str]:
    """(encoding, status, detail) after reading the whole file once, in chunks.

    UTF-8 and CP949 are tried side by side over every chunk: CP949 bytes are rarely valid UTF-8,
    but "rarely" is decided by the whole file, not a prefix. detail says where an undecodable
    file first goes wrong.
    """
    with Path(path).open("rb") as f:
        head = f.read(CHUNK_BYTES)
        if not head:
            return None, "empty", ""
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
    encoding, status, detail = _verdict(trials, nul, control / size)
    if status == "binary" and _bomless_utf16(head):
        detail = UTF16_HINT
    return encoding, status, detail


def _bomless_utf16(head: bytes) -> bool:
    """NUL bytes at only odd (little-endian) or only even (big-endian) offsets, and the start reads
    in that byte order as text with spaces or newlines and no control characters: UTF-16 saved
    without its byte-order mark.
    Said, not guessed: the wrong byte order would train on garbage, and re-saving takes a second."""
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if (even == 0) == (odd == 0):
        return False
    try:
        text = codecs.getincrementaldecoder("utf-16-le" if odd else "utf-16-be")().decode(head)
    except UnicodeDecodeError:
        return False
    return bool(re.search(r"[ \n]", text)) and not _CONTROL_CHARS.search(text)


def _verdict(trials: list[_Trial], nul: bool, control_fraction: float) -> tuple[str | None, str, str]:
    # UTF-16 text is full of NUL bytes by design, so only BOM-less files are judged by bytes.
    utf16 = trials[0].encoding == "utf-16"
    if not utf16 and (nul or control_fraction > BINARY_CONTROL_FRACTION):
        return None, "binary", ""
    first = trials[0]
    if first.failed and first.syllables >= UTF8_EVIDENCE_SYLLABLES and not utf16:
        # Korean UTF-8 with a damaged stretch: CP949 might decode it, but only as mojibake.
        return None, "undecodable", first.describe_failure() + "; the text before it is UTF-8"
    for trial in trials:
        if not trial.failed:
            return trial.encoding, "ok" if trial.has_text else "empty", ""
    # The encoding that read furthest is the one the file was most likely meant to be in.
    furthest = max(trials, key=lambda t: t.failure[0])  # type: ignore[index]
    return None, "undecodable", furthest.describe_failure()
