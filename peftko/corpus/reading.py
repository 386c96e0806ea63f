"""The one corpus reader: what lora-train, eval and ablate read, and which markers they register.

Every command reads a corpus the same way: scan every file (encoding, documents, marker lint),
refuse the files that are not readable text (or skip them, when told to), then read the
documents of the rest. Marker choice lives here too, so every command that registers markers
refuses the same mistakes (an empty marker, one marker inside another).
"""

from __future__ import annotations

from collections.abc import Collection

from peftko.core.config import DEFAULT_DOC_END, CorpusSettings
from peftko.core.errors import UserError
from peftko.core.paths import resolve_data_paths
from peftko.core.progress import say, warn
from peftko.corpus.documents import FileScan, iter_documents
from peftko.corpus.scan import CorpusReport, scan_corpus

SKIP_HINT = ", or pass --skip-bad-files to train on the rest"


def scan(data: list[str], pattern: str, jsonl_field: str = "text", doc_end_marker: str = DEFAULT_DOC_END,
         known: Collection[str] = ()) -> CorpusReport:
    """The corpus report of --data (builtin:sample is the bundled corpus)."""
    return scan_corpus(resolve_data_paths(data), pattern, jsonl_field, doc_end_marker=doc_end_marker, known=known)


def readable_files(report: CorpusReport, skip_bad_files: bool = False, skip_hint: str = SKIP_HINT) -> list[FileScan]:
    """The files to read: unreadable ones refused (or, with skip_bad_files, named and left out)."""
    bad = report.bad_files
    if bad and not skip_bad_files:
        listing = "\n".join(f"  {f.path}: {f.describe()}" for f in bad)
        raise UserError(f"{len(bad)} corpus file(s) are not readable text:\n{listing}\n"
                        f"Fix or remove them{skip_hint}.")
    if bad:
        shown = ", ".join(f"{f.path} ({f.describe()})" for f in bad)
        say(f"skipping {len(bad)} unreadable file(s): {shown}")
    files = [f for f in report.files if f.status == "ok"]
    if not files:
        raise UserError("no readable, non-empty corpus file was found in --data")
    return files


def documents_of(files: list[FileScan], jsonl_field: str = "text", doc_end_marker: str = DEFAULT_DOC_END) -> list[str]:
    """Every document of `files`, in reading order, as training reads them."""
    return [t for f in files for t in iter_documents(f.path, f.encoding, jsonl_field, doc_end_marker)]


def read_corpus(corpus: CorpusSettings, strict: bool = False) -> tuple[CorpusReport, list[FileScan]]:
    """Scan the corpus, print the short summary, and refuse bad files unless told to skip them."""
    explicit = [] if corpus.markers == "auto" else corpus.markers
    report = scan(corpus.data, corpus.marker_pattern, corpus.jsonl_field, corpus.doc_end_marker, known=explicit)
    say(report.render_summary())
    warn_problems(corpus.data, report, strict)
    return report, readable_files(report, corpus.skip_bad_files)


def read_documents(data: list[str], pattern: str, jsonl_field: str = "text",
                   doc_end_marker: str = DEFAULT_DOC_END) -> tuple[list[str], list[str]]:
    """(documents, markers found) exactly as lora-train reads them; unreadable files are refused."""
    report = scan(data, pattern, jsonl_field, doc_end_marker)
    docs = documents_of(readable_files(report, skip_hint=""), jsonl_field, doc_end_marker)
    return docs, sorted(report.marker_counts)


def warn_problems(data: list[str], report: CorpusReport, strict: bool) -> None:
    """Marker problems are learned as written: say so loudly, and refuse under --strict."""
    if not report.problems:
        return
    message = (f"{len(report.problems)} marker problem(s) in the corpus (first ones above); the model learns "
               f"them as written. See all with `peftko markers {' '.join(data)}`")
    if strict:
        raise UserError(message + "; fix them, or train without --strict.")
    warn(f"warning: {message}; --strict refuses to train on them.")


def choose_markers(corpus: CorpusSettings, report: CorpusReport) -> list[str]:
    """The markers to register: found by the pattern, or the explicit list checked against the corpus."""
    if corpus.markers == "auto":
        markers = sorted(report.marker_counts)
        if not markers:
            say(f"note: no marker matching {corpus.marker_pattern!r} was found; training plain LoRA")
    else:
        if any(not m.strip() for m in corpus.markers):
            raise UserError("markers: an explicit marker list must not contain empty strings")
        markers = list(dict.fromkeys(corpus.markers))
        if markers:  # an empty list registers nothing on purpose (ablate's as-text variant)
            warn_unlisted(markers, report)
    refuse_overlaps(markers)
    return markers


def warn_unlisted(markers: list[str], report: CorpusReport) -> None:
    """An explicit list that misses the corpus, or that the corpus goes beyond, is probably a slip."""
    absent = [m for m in markers if not report.marker_counts.get(m)]
    unlisted = sorted(set(report.marker_counts) - set(markers))
    if absent:
        warn(f"warning: {', '.join(absent)} never occur(s) in the corpus: registered, but nothing "
             "trains its row")
    if unlisted:
        shown = ", ".join(f"{m} x{report.marker_counts[m]}" for m in unlisted)
        warn(f"warning: the corpus also uses {shown}, not in --markers: they stay split into pieces "
             "(use --markers auto to register every marker found)")


def refuse_overlaps(markers: list[str]) -> None:
    """One marker inside another (`SOUND|>` in `|SOUND|>`) makes the tokenizer's matching ambiguous."""
    pairs = [(a, b) for a in markers for b in markers if a != b and a in b]
    if pairs:
        listing = "; ".join(f"{a!r} is part of {b!r}" for a, b in pairs)
        raise UserError(f"markers overlap ({listing}): the shorter one would be cut out of the longer one's "
                        "occurrences, or never match. Keep only one of each pair.")
