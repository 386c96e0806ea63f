"""Finding structural markers (`|SOUND|>`, `|START_OF_TITLE|>`) and linting how they are written.

A marker becomes one new token, so every slip in writing one silently teaches the model a
different, split-up string. The lint reports three kinds of problem, each with file and line:

near-miss
    Text that is almost a known marker: `<|SOUND|>`, `||SOUND|>`, `|SOUND|` (no `>`),
    `|SOUND>` (no second bar), `SOUND|>` (no first bar), `|sound|>`, `|SOUND |>`, `| SOUND|>`.
    A candidate is reported when its name, upper-cased with spaces removed, is the name of a
    known marker (found by the pattern anywhere in the corpus, plus any listed explicitly) and
    it is not itself a correctly written marker. Candidates with three or more slips at once
    (a Markdown table cell `| Sound |`) are taken as ordinary text.

unbalanced
    Scope of START_/END_ pairing (a marker with `START_` or `END_` at a word start; the partner
    swaps that word, so `|START_OF_X|>` pairs with `|END_OF_X|>`):
    - a pair named BOOK (`|START_OF_BOOK|>` ... `|END_OF_BOOK|>`) must balance within a document
      (a file, split after each document end marker; one .jsonl record) and may span lines;
    - every other pair (TITLE, DIALOGUE, anything user-defined) must open and close on the same
      line, in order: an END with no open START before it on that line, a START still open at
      the end of the line, and a second START of the same name while one is open are all
      unbalanced. The problem names the line where the unmatched marker stands (for a nested
      START, the earlier one, which is the one missing its END).

once-only
    A marker used exactly once in the whole corpus is most likely a typo (`|SOUDN|>`). A START or
    END marker whose partner also occurs is exempt: one book in a one-book corpus is no typo.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace

from peftko.corpus.documents import Document

# Almost-markers: optional '<', one to three bars, a name (any case, inner spaces), then a
# closing of '|>', '||>', '|' or '>'. The second branch is a marker whose first bar is missing.
_LOOSE = re.compile(
    r"(?P<lead><?\|{1,3})[ \t]*(?P<name>[A-Za-z][A-Za-z0-9_ \t]*?)[ \t]*(?P<close>\|{1,2}>|\||>)"
    r"|(?<![|<A-Za-z0-9_])(?P<bare>[A-Z][A-Z0-9_]*)\|>"
)
_DELIMITERS = re.compile(r"<\||\|>")  # what every marker opens or closes with
_PAIR = re.compile(r"(?<![A-Za-z0-9])(START|END)_")
_NAME = re.compile(r"[A-Za-z0-9_]+")
MAX_SLIPS = 2
SPANNING_PAIRS = ("BOOK",)
LONE_END = "lone-end"  # internal kind: an END of a spanning pair with no START before it


@dataclass(frozen=True)
class Problem:
    """One lint finding; `kind` is "near-miss", "unbalanced" or "once-only"."""

    path: str
    line: int  # 1-based
    kind: str
    text: str
    marker: str = ""  # the marker a lone-end problem is about (internal)


@dataclass
class CorpusLint:
    """Everything one streamed pass over a corpus learns about its markers."""

    counts: Counter = field(default_factory=Counter)  # marker -> occurrences
    files: Counter = field(default_factory=Counter)  # marker -> files it occurs in
    problems: list[Problem] = field(default_factory=list)


# --- finding


def literal_pattern(markers: Collection[str]) -> str:
    """A regex finding each marker literally, longest first so none hides a longer one ('' if none)."""
    return "|".join(re.escape(m) for m in sorted(set(markers), key=len, reverse=True) if m)


def marker_regex(markers: Collection[str]) -> re.Pattern | None:
    """The markers' literal regex (literal_pattern), compiled; None without markers."""
    pattern = literal_pattern(markers)
    return re.compile(pattern) if pattern else None


def with_literals(pattern: str, markers: Collection[str]) -> str:
    """`pattern` that also finds each literal marker."""
    return "|".join(filter(None, [literal_pattern(markers), f"(?:{pattern})"]))


def canonical(name: str) -> str:
    """The name a marker or an almost-marker means: its letters, digits and '_', upper-cased."""
    return "".join(_NAME.findall(name)).upper()


def marker_fragments(text: str, markers: Collection[str]) -> list[str]:
    """Pieces of markers in generated text, in order: whatever is left that looks like marker syntax
    once every whole marker in `markers` is taken out.

    That is each almost-marker the lint's near-miss scan would see (`|SOUND|`, `<|END_OF_BOOK|>`,
    `|START_OF_TITLE|` or an unregistered `|NEW|>`) and each lone `|>` or `<|`. A model that emits the
    pieces a marker used to be split into, instead of its one token, writes these.
    """
    whole = marker_regex(markers)
    spans = list(whole.finditer(text)) if whole else []
    # A whole marker with a bar or '<' glued before it (`<|SOUND|>`, `||SOUND|>`) is the lint's near-miss.
    found = [(m.start() - 1, text[m.start() - 1 : m.end()]) for m in spans if text[m.start() - 1 : m.start()] in ("<", "|")]
    rest = whole.sub("\x00", text) if whole else text
    found += [(m.start(), m.group()) for m in _LOOSE.finditer(rest)]
    lone = _LOOSE.sub(lambda m: "\x00" * len(m.group()), rest)
    found += [(m.start(), m.group()) for m in _DELIMITERS.finditer(lone)]
    return [piece for _, piece in sorted(found)]


# --- near-misses


@dataclass(frozen=True)
class _Candidate:
    line: int
    raw: str
    name: str  # canonical


def _numbered(matches: Iterable[re.Match], text: str) -> Iterator[tuple[int, re.Match]]:
    """(1-based line, match): newlines are counted only between matches, so a document is
    scanned by one regex pass and lines without markers cost nothing."""
    line, pos = 1, 0
    for m in matches:
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield line, m


def _candidates(text: str, marked: list[tuple[int, re.Match]]) -> list[_Candidate]:
    """Almost-markers that are not exactly a correctly written marker (known or not)."""
    if "|" not in text:  # every almost-marker form has at least one bar
        return []
    correct = {m.span() for _, m in marked}
    return [
        _Candidate(line, m.group(), canonical(m["name"] or m["bare"]))
        for line, m in _numbered(_LOOSE.finditer(text), text)
        if m.span() not in correct
    ]


def _known_names(known: Collection[str]) -> dict[str, str]:
    """canonical name -> marker as it should be written."""
    names: dict[str, str] = {}
    for marker in sorted(known):
        names.setdefault(canonical(marker), marker)
    return names


def _near_misses(path: str, candidates: Iterable[_Candidate], by_name: dict[str, str]) -> list[Problem]:
    problems = []
    for c in candidates:
        meant = by_name.get(c.name)
        if meant is None:
            continue
        slips = _slips(c.raw, meant)
        if 0 < len(slips) <= MAX_SLIPS:
            text = f"{c.raw} ({', '.join(slips)}): probably meant {meant}"
            problems.append(Problem(path, c.line, "near-miss", text))
    return problems


def _slips(raw: str, meant: str) -> list[str]:
    """The separate mistakes that turn `meant` into `raw`, for a message a writer can act on."""
    slips = ["extra '<'"] if raw.startswith("<") else []
    after_lt = raw.lstrip("<")
    bars = len(after_lt) - len(after_lt.lstrip("|"))
    if bars != 1:
        slips.append("missing first '|'" if bars == 0 else "extra '|'")
    core = after_lt.lstrip("|").rstrip("|>")
    if " " in core or "\t" in core:
        slips.append("spaces inside")
    if core.upper() != core:
        slips.append("wrong case")
    slips += _closing_slips(raw)
    if not slips and raw != meant:
        slips.append("different spelling")
    return slips


def _closing_slips(raw: str) -> list[str]:
    tail = raw[len(raw.rstrip("|>")) :]
    if tail == "|>":
        return []
    if tail == "|":
        return ["missing '>'"]
    if tail == ">":
        return ["missing second '|'"]
    return ["extra '|'"]  # "||>"


# --- START_/END_ balance


@dataclass(frozen=True)
class _Role:
    opens: bool
    key: str  # the END form: what a START waits for
    partner: str
    spans_lines: bool


@functools.lru_cache(maxsize=4096)  # a corpus has few distinct markers and many occurrences
def pair_role(marker: str) -> _Role | None:
    """How `marker` takes part in START_/END_ pairing, or None for a standalone marker."""
    m = _PAIR.search(marker)
    if m is None:
        return None
    before, after = marker[: m.start()], marker[m.end() :]
    start, end = f"{before}START_{after}", f"{before}END_{after}"
    name = _NAME.match(after)
    spans = name is not None and name.group().removeprefix("OF_") in SPANNING_PAIRS
    opens = m.group(1) == "START"
    return _Role(opens, end, end if opens else start, spans)


def _unbalanced(path: str, marked: list[tuple[int, re.Match]]) -> list[Problem]:
    problems: list[Problem] = []
    doc_open: dict[str, tuple[int, str]] = {}  # BOOK-like pairs: open across lines
    line_open: dict[str, tuple[int, str]] = {}  # every other pair: open within `current`
    current = 0
    for number, m in marked:
        if number != current:
            problems += _left_open(path, line_open, "on the same line")
            line_open, current = {}, number
        role = pair_role(m.group())
        if role is not None:
            scope = doc_open if role.spans_lines else line_open
            problems += _step(path, number, m.group(), role, scope)
    problems += _left_open(path, line_open, "on the same line")
    problems += _left_open(path, doc_open, "in the same document")
    return problems


def _step(path: str, number: int, marker: str, role: _Role, scope: dict) -> list[Problem]:
    """Apply one START or END to the open pairs of its scope; return what it proved unmatched."""
    where = "document" if role.spans_lines else "line"
    if role.opens:
        earlier = scope.get(role.key)
        scope[role.key] = (number, marker)
        if earlier is None:
            return []
        text = f"{earlier[1]} opened again before {role.key} closed it (nested in one {where})"
        return [Problem(path, earlier[0], "unbalanced", text)]
    if scope.pop(role.key, None) is not None:
        return []
    text = f"{marker} without an open {role.partner} before it in the same {where}"
    # An END_OF_BOOK with no START_OF_BOOK may be a plain terminator (the common way to end books):
    # whether it is a problem depends on the corpus using the START form at all, known only at the end.
    if role.spans_lines:
        return [Problem(path, number, LONE_END, text, marker)]
    return [Problem(path, number, "unbalanced", text)]


def _left_open(path: str, scope: dict[str, tuple[int, str]], where: str) -> list[Problem]:
    return [
        Problem(path, number, "unbalanced", f"{marker} has no {key} after it {where}")
        for key, (number, marker) in scope.items()
    ]


# --- lint


def lint_text(
    path: str, text: str, known: Collection[str], pattern: str, *, first_line: int = 1
) -> list[Problem]:
    """Near-miss and unbalanced problems of one document (no corpus-wide once-only check).

    `text` is one document; lines are numbered from `first_line`.
    """
    marked = list(_numbered(re.finditer(pattern, text), text))
    near = _near_misses(path, _candidates(text, marked), _known_names(known))
    used = {m.group() for _, m in marked}
    problems = near + _lone_ends_resolved(_unbalanced(path, marked), used)
    shift = first_line - 1
    return sorted((_moved(p, shift) for p in problems), key=_by_line)


def _moved(problem: Problem, shift: int) -> Problem:
    return replace(problem, line=problem.line + shift) if shift else problem


def _by_line(problem: Problem) -> tuple[int, str, str]:
    return (problem.line, problem.kind, problem.text)


def lint_corpus(
    documents: Iterable[tuple[str, Document]], pattern: str, known: Collection[str] = ()
) -> CorpusLint:
    """Count markers and lint every document in ONE pass over (path, document) pairs.

    `known` adds markers (an explicit list) that are counted and linted even where the pattern would
    not find them, and whose near-misses count even if the corpus never writes them correctly.
    """
    tally = _Tally(with_literals(pattern, known))
    for path, doc in documents:
        tally.add(path, doc)
    return tally.finish(known)


class _Tally:
    """The state of one pass. Near-miss candidates wait until the end, because whether
    `|sound|>` is a slip depends on `|SOUND|>` occurring anywhere, maybe in a later file."""

    def __init__(self, pattern: str):
        self.rx = re.compile(pattern)
        self.result = CorpusLint()
        self.pending: list[tuple[str, Document, list[_Candidate]]] = []
        self.first_seen: dict[str, tuple[str, int]] = {}  # marker -> (path, line)
        self.paths_of: dict[str, set[str]] = {}  # marker -> files it occurs in
        self.order: dict[str, int] = {}  # path -> position in the corpus

    def add(self, path: str, doc: Document) -> None:
        self.order.setdefault(path, len(self.order))
        marked = list(_numbered(self.rx.finditer(doc.text), doc.text))
        self._count(path, doc, marked)
        if found := _candidates(doc.text, marked):
            self.pending.append((path, replace(doc, text=""), found))  # keep no text in memory
        self.result.problems += [_located(p, doc) for p in _unbalanced(path, marked)]

    def _count(self, path: str, doc: Document, marked: list[tuple[int, re.Match]]) -> None:
        for number, m in marked:
            if m.group() not in self.first_seen:
                self.first_seen[m.group()] = (path, _file_line(doc, number))
        doc_counts = Counter(m.group() for _, m in marked)
        self.result.counts.update(doc_counts)
        for marker in doc_counts:
            self.paths_of.setdefault(marker, set()).add(path)

    def finish(self, known: Collection[str]) -> CorpusLint:
        result = self.result
        by_name = _known_names(set(result.counts) | set(known))
        for path, doc, found in self.pending:
            result.problems += [_located(p, doc) for p in _near_misses(path, found, by_name)]
        result.problems = _lone_ends_resolved(result.problems, result.counts)
        result.problems += _once_only(result.counts, self.first_seen)
        # Files in corpus order, then lines: the order a writer fixes them in.
        result.problems.sort(key=lambda p: (self.order[p.path], *_by_line(p)))
        result.files = Counter({m: len(paths) for m, paths in self.paths_of.items()})
        return result


def _file_line(doc: Document, number: int) -> int:
    return doc.line if doc.one_line else doc.line + number - 1


def _located(problem: Problem, doc: Document) -> Problem:
    return replace(problem, line=_file_line(doc, problem.line))


def _lone_ends_resolved(problems: list[Problem], used: Collection[str]) -> list[Problem]:
    """A lone END_OF_BOOK is a problem only where the START form is used: then one is missing."""
    kept = []
    for p in problems:
        if p.kind == LONE_END:
            if pair_role(p.marker).partner not in used:
                continue
            p = replace(p, kind="unbalanced", marker="")
        kept.append(p)
    return kept


def _once_only(counts: Counter, first_seen: dict[str, tuple[str, int]]) -> list[Problem]:
    problems = []
    for marker, count in counts.items():
        role = pair_role(marker)
        if count != 1 or (role is not None and counts[role.partner] > 0):
            continue
        if role is not None and role.spans_lines and not role.opens:
            continue  # one book ended by its END_OF_BOOK alone: a terminator, not a typo
        path, line = first_seen[marker]
        text = f"{marker} occurs only once in the corpus (a typo?)"
        problems.append(Problem(path, line, "once-only", text))
    return problems
