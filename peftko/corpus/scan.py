"""The corpus report behind `peftko markers` and the summary `lora-train` prints first.

One streamed pass per file finds the encoding (peftko.corpus.encoding), a second reads its
documents (peftko.corpus.documents) and feeds the marker lint (peftko.corpus.lint) and, given a
tokenizer, the token statistics. The report renders
as tables for people, one JSON object for scripts, or a few lines before training starts.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftko.core.config import DEFAULT_DOC_END
from peftko.core.errors import UserError
from peftko.core.progress import phase
from peftko.corpus.documents import (MAX_DOC_CHARS, Document, FileScan, find_files, iter_located_documents,
                                     scan_file)
from peftko.corpus.grammar import GrammarLearner
from peftko.corpus.lint import Problem, lint_corpus
from peftko.run.grammar_record import MarkerGrammar

BAD_STATUSES = ("binary", "undecodable", "unreadable")
# The lint needs whole documents (a BOOK pair may span one), so it cuts far later than training
# does: no real book is cut, and a file with no document end marker or no line break still is.
LINT_MAX_DOC_CHARS = 1 << 22
HANGUL_SYLLABLE = re.compile("[\uac00-\ud7a3]")
SUMMARY_MARKERS = 8
SUMMARY_PROBLEMS = 3


@dataclass
class CorpusReport:
    """What `scan_corpus` found; every view (table, JSON, summary) renders from this alone."""

    files: list[FileScan]
    marker_counts: Counter  # marker -> total count
    marker_files: Counter  # marker -> number of files it appears in
    problems: list[Problem]
    pieces: dict[str, int] | None  # with a tokenizer: marker -> pieces the base tokenizer makes now
    tokens_per_syllable: float | None  # with a tokenizer: corpus tokens / Hangul syllables
    grammar: MarkerGrammar | None = None  # the markers' grammar (peftko.corpus.grammar); None without markers

    @property
    def bad_files(self) -> list[FileScan]:
        return [f for f in self.files if f.status in BAD_STATUSES]


    def markers_by_count(self) -> list[tuple[str, int]]:
        return sorted(self.marker_counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [_file_json(f) for f in self.files],
            "markers": dict(self.markers_by_count()),
            "problems": [_problem_json(p) for p in self.problems],
            "marker_files": {m: self.marker_files[m] for m, _ in self.markers_by_count()},
            "pieces": self.pieces,
            "tokens_per_syllable": self.tokens_per_syllable,
        }

    def render_table(self) -> str:
        parts = [_files_table(self.files), _markers_table(self), _problems_table(self.problems)]
        if self.tokens_per_syllable is not None:
            parts.append(f"Tokens per Hangul syllable (base tokenizer): {self.tokens_per_syllable:.2f}")
        return "\n\n".join(parts) + "\n"

    def render_summary(self) -> str:
        lines = [_files_line(self.files), _markers_line(self)]
        hint = " (run `peftko markers` for all)" if self.problems else ""
        lines.append(f"problems: {len(self.problems)}{hint}")
        lines += [f"  {_problem_line(p)}" for p in self.problems[:SUMMARY_PROBLEMS]]
        if len(self.problems) > SUMMARY_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - SUMMARY_PROBLEMS} more")
        return "\n".join(lines)


# --- building


def scan_corpus(
    paths: Sequence[str | Path],
    pattern: str,
    jsonl_field: str = "text",
    tokenizer=None,
    doc_end_marker: str = DEFAULT_DOC_END,
    known: Collection[str] = (),
) -> CorpusReport:
    """Scan every corpus file under `paths`; `known` adds markers to look for near-misses of."""
    _check_pattern(pattern)
    files = find_files(paths)
    with phase("read corpus", len(files), "files") as progress:
        scans = []
        for p in files:
            scans.append(scan_file(p, jsonl_field))
            progress.advance()
    stats = _TokenStats(tokenizer)
    grammar = GrammarLearner(pattern, known)  # learned in the lint's pass: no second read of the corpus
    docs = _documents(scans, jsonl_field, doc_end_marker, stats, grammar)
    lint = lint_corpus(docs, pattern, known)
    pieces = _pieces(tokenizer, lint.counts) if tokenizer is not None else None
    return CorpusReport(scans, lint.counts, lint.files, lint.problems, pieces, stats.ratio(), grammar.finish())


def _check_pattern(pattern: str) -> None:
    try:
        empty = re.compile(pattern).fullmatch("")
    except re.error as e:
        raise UserError(f"marker pattern {pattern!r} is not a valid regular expression ({e})") from None
    if empty:
        raise UserError(f"marker pattern {pattern!r} matches the empty string; make it match at least one character")


def _documents(
    scans: list[FileScan], jsonl_field: str, doc_end_marker: str, stats: _TokenStats,
    grammar: GrammarLearner | None = None,
) -> Iterator[tuple[str, Document]]:
    for scan in scans:
        if scan.status != "ok":
            continue
        assert scan.encoding is not None
        docs = iter_located_documents(scan.path, scan.encoding, jsonl_field, doc_end_marker, LINT_MAX_DOC_CHARS)
        try:
            for doc in docs:
                stats.add(doc.text)
                if grammar is not None:
                    grammar.add(str(scan.path), doc)
                yield str(scan.path), doc
        except OSError as e:  # readable a moment ago in scan_file
            raise UserError(f"cannot read {scan.path}: {e.strerror or e}; did it change?") from None


class _TokenStats:
    """Running totals for tokens per Hangul syllable; does nothing without a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = 0
        self.syllables = 0

    def add(self, text: str) -> None:
        if self.tokenizer is None:
            return
        # In slices: the tokenizer holds ~100-350 bytes per character it is given. A cut between
        # lines shifts a count by a token at most. verbose=False: a book is longer than
        # model_max_length, which is fine for counting.
        for piece in _slices(text, MAX_DOC_CHARS):
            self.tokens += len(self.tokenizer(piece, add_special_tokens=False, verbose=False,
                                              return_attention_mask=False)["input_ids"])
        self.syllables += len(HANGUL_SYLLABLE.findall(text))

    def ratio(self) -> float | None:
        if self.tokenizer is None or self.syllables == 0:
            return None
        return self.tokens / self.syllables


def _slices(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive slices of about `size` characters, cut after a line end where one is near."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end


def _pieces(tokenizer, counts: Counter) -> dict[str, int]:
    return {m: len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in counts}


# --- rendering


def _file_json(f: FileScan) -> dict[str, Any]:
    return {
        "path": str(f.path), "encoding": f.encoding, "status": f.status, "detail": f.detail,
        "chars": f.chars, "preview": f.preview,
    }


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"path": p.path, "line": p.line, "kind": p.kind, "text": p.text}


def _table(header: Sequence[str], rows: list[Sequence[Any]], right: Collection[int] = ()) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        gaps = (" " * (w - _width(c)) for c, w in zip(row, widths))
        padded = (g + c if i in right else c + g for i, (c, g) in enumerate(zip(row, gaps)))
        return "  " + "  ".join(padded).rstrip()

    return "\n".join(fmt(row) for row in cells)


def _width(text: str) -> int:
    """Terminal columns: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _files_table(files: list[FileScan]) -> str:
    rows = [(f.path, f.encoding or "-", f.status, f"{f.chars:,}", _snippet(f.preview)) for f in files]
    header = ("path", "encoding", "status", "chars", "starts with")
    lines = [f"Files ({len(files)})", _table(header, rows, right={3})]
    lines += [f"warning: {f.path} is empty (nothing to train on)" for f in files if f.status == "empty"]
    lines += [f"warning: {f.path} is {f.describe()} (skipped)" for f in files if f.status in BAD_STATUSES]
    return "\n".join(lines)


def _snippet(preview: str, width: int = 30) -> str:
    flat = " ".join(preview.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _markers_table(report: CorpusReport) -> str:
    title = f"Markers ({len(report.marker_counts)})"
    if not report.marker_counts:
        return f"{title}\n  none found"
    header = ["marker", "count", "files"]
    if report.pieces is not None:
        header.append("pieces now -> after registration")
    rows = []
    for marker, count in report.markers_by_count():
        row: list[Any] = [marker, count, report.marker_files[marker]]
        if report.pieces is not None:
            row.append(f"{report.pieces[marker]} -> 1")
        rows.append(row)
    return f"{title}\n" + _table(header, rows, right={1, 2})


def _problems_table(problems: list[Problem]) -> str:
    if not problems:
        return "Problems (0)\n  none"
    rows = [(f"{p.path}:{p.line}", p.kind, p.text) for p in problems]
    return f"Problems ({len(problems)})\n" + _table(("where", "kind", "what"), rows)


def _problem_line(p: Problem) -> str:
    return f"{p.path}:{p.line} {p.kind}: {p.text}"


def _files_line(files: list[FileScan]) -> str:
    encodings = Counter(f.encoding for f in files if f.status == "ok")
    shown = ", ".join(f"{enc}: {n}" for enc, n in encodings.most_common())
    line = f"corpus: {len(files)} file{'s' if len(files) != 1 else ''} ({shown or 'none readable'})"
    other = Counter(f.status for f in files if f.status != "ok")
    line += "".join(f", {n} {status}" for status, n in sorted(other.items()))
    empty = [str(f.path) for f in files if f.status == "empty"]
    return line + "".join(f"\nwarning: skipping empty file {p}" for p in empty)


def _markers_line(report: CorpusReport) -> str:
    ranked = report.markers_by_count()
    shown = ", ".join(f"{m} x{n}" for m, n in ranked[:SUMMARY_MARKERS])
    more = f", ... {len(ranked) - SUMMARY_MARKERS} more" if len(ranked) > SUMMARY_MARKERS else ""
    return f"markers: {len(ranked)}" + (f" ({shown}{more})" if ranked else "")
