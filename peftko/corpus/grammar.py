"""The corpus's marker grammar: learned from its documents, and followed marker by marker.

Learned, not assumed: which markers pair (START_X/END_X, peftko.corpus.lint.pair_role, where the
corpus uses both forms), which markers were seen directly inside which open block, which open and
close a document, which never follow themselves back to back (only whitespace between), which
blocks are never closed empty, which markers no document holds twice, which blocks never cross a line break, and which pieces of markers (`OF`, `|`, `END`) the corpus also
writes as plain text. Every rule carries its count. A corpus without markers has no grammar; an
unbalanced one gives a grammar and warnings (where the learner met what it could not pair), never
an error: the user's corpus is the authority, and lint already reports its slips.

`GrammarState` follows the grammar over a sequence of markers: which marker may come next, what
the open blocks need (their closers, innermost first). Strict generation (peftko.model.structure)
and the llama.cpp grammar (peftko.merge.gbnf) are both built on it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

from peftko.corpus.documents import Document
from peftko.corpus.lint import pair_role, with_literals
from peftko.run.grammar_record import OUTSIDE, MarkerGrammar

MAX_WARNINGS = 5  # each kind of slip is counted; the first few are named with file and line


@dataclass
class _Open:
    marker: str
    line: int


@dataclass
class GrammarLearner:
    """One pass over (path, document) pairs; `finish()` gives the grammar (None without markers)."""

    pattern: str
    known: Collection[str] = ()
    documents: int = 0
    counts: Counter = field(default_factory=Counter)
    inside: defaultdict = field(default_factory=lambda: defaultdict(Counter))
    opens: Counter = field(default_factory=Counter)
    closes: Counter = field(default_factory=Counter)
    repeats: Counter = field(default_factory=Counter)
    empties: Counter = field(default_factory=Counter)  # START -> blocks closed with only whitespace inside
    per_document: Counter = field(default_factory=Counter)  # marker -> the most times one document held it
    spanning: set = field(default_factory=set)
    text_runs: set = field(default_factory=set)  # runs of marker characters in the plain text
    slips: Counter = field(default_factory=Counter)  # kind of slip -> times
    examples: list = field(default_factory=list)
    _events: list = field(default_factory=list)  # (path, [(line, marker, only whitespace before it)]) per document

    def __post_init__(self):
        self.rx = re.compile(with_literals(self.pattern, self.known))

    def add(self, path: str, doc: Document | str) -> None:
        text = doc.text if isinstance(doc, Document) else doc
        first_line = doc.line if isinstance(doc, Document) else 1
        found = [(m.start(), m.end(), m.group()) for m in self.rx.finditer(text)]
        self._plain_runs(text, found)
        if not found:
            return
        self.documents += 1
        self.counts.update(marker for _, _, marker in found)
        for marker, n in Counter(marker for _, _, marker in found).items():
            self.per_document[marker] = max(self.per_document[marker], n)
        # Pairs are known only once every document was read: keep each marker's place, not the text.
        events, line, pos, previous_end = [], first_line, 0, None
        for start, end, marker in found:
            line += text.count("\n", pos, start)
            pos = start
            events.append((line, marker, previous_end is not None and not text[previous_end:start].strip()))
            previous_end = end
        self._events.append((path, events))

    def _plain_runs(self, text: str, found: list) -> None:
        # Pieces of markers written as text are looked up later against the markers' own characters;
        # only the runs of ASCII punctuation and capitals are kept (in Korean text: few and short).
        plain, last = [], 0
        for start, end, _ in found:
            plain.append(text[last:start])
            last = end
        plain.append(text[last:])
        for run in re.findall(r"[A-Z0-9_|<>]+", "\x00".join(plain)):
            self.text_runs.add(run)

    def finish(self) -> MarkerGrammar | None:
        if not self.counts:
            return None
        pairs = {}
        for marker in self.counts:
            role = pair_role(marker)
            if role is not None and role.opens and self.counts.get(role.key):
                pairs[marker] = role.key
        ends = {e: s for s, e in pairs.items()}
        for path, events in self._events:
            self._walk(path, events, pairs, ends)
        pieces = _marker_pieces(self.counts)
        text_pieces = sorted({p for run in self.text_runs for p in _substrings(run) if p in pieces})
        warnings = [f"{n} x {kind}" for kind, n in sorted(self.slips.items())]
        if warnings:
            warnings = [f"unbalanced markers (the grammar keeps what balanced): {', '.join(warnings)}; "
                        f"first: {'; '.join(self.examples)}"]
        return MarkerGrammar(self.documents, dict(sorted(self.counts.items())), pairs,
                             {k: dict(sorted(v.items())) for k, v in sorted(self.inside.items())},
                             dict(self.opens), dict(self.closes),
                             {m: self.repeats.get(m, 0) for m in sorted(self.counts)}, sorted(self.spanning),
                             text_pieces, warnings, {s: self.empties.get(s, 0) for s in sorted(pairs)},
                             dict(sorted(self.per_document.items())))

    def _slip(self, kind: str, path: str, line: int, marker: str) -> None:
        self.slips[kind] += 1
        if len(self.examples) < MAX_WARNINGS:
            self.examples.append(f"{path}:{line} {marker} ({kind})")

    def _walk(self, path: str, events: list, pairs: dict, ends: dict) -> None:
        stack: list[_Open] = []
        self.opens[events[0][1]] += 1
        self.closes[events[-1][1]] += 1
        previous = None
        for line, marker, adjacent in events:
            if adjacent and previous == marker:
                self.repeats[marker] += 1
            if marker in ends and adjacent and previous == ends[marker]:
                self.empties[ends[marker]] += 1
            previous = marker
            if marker in ends:
                self._close(stack, marker, ends[marker], line, path)
                continue
            self.inside[stack[-1].marker if stack else OUTSIDE][marker] += 1
            if marker in pairs:
                stack.append(_Open(marker, line))
        for left in stack:
            self._slip("START never closed", path, left.line, left.marker)

    def _close(self, stack: list[_Open], end: str, start: str, line: int, path: str) -> None:
        where = next((i for i in range(len(stack) - 1, -1, -1) if stack[i].marker == start), None)
        if where is None:
            self._slip("END without its START", path, line, end)
            return
        for left in stack[where + 1:]:  # closed from outside: these were never closed themselves
            self._slip("START never closed", path, left.line, left.marker)
        if stack[where].line != line:
            self.spanning.add(start)
        del stack[where:]


def _marker_pieces(markers: Collection[str]) -> set[str]:
    return {p for m in markers for p in _substrings(m)}


def _substrings(text: str) -> set[str]:
    return {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)}


def learn_grammar(texts, pattern: str, known: Collection[str] = ()) -> MarkerGrammar | None:
    """The grammar of documents given as strings or (path, Document) pairs; None without markers."""
    learner = GrammarLearner(pattern, known)
    for item in texts:
        path, doc = item if isinstance(item, tuple) else ("text", item)
        learner.add(path, doc)
    return learner.finish()


# --- following the grammar


class GrammarState:
    """Where a document stands in the grammar: its open blocks, its last marker, whether it ended.

    `allowed(m)` answers for one marker whether the grammar lets it come next:
    - an END only for the innermost open block (no END without its START, no crossed blocks);
    - a START or a standalone marker only where the corpus had it inside the innermost open block
      (or outside every block), and as a document's first marker only one the corpus opens with;
    - the document's closer (a marker the corpus ends documents with) only when no other block is
      open; nothing after it;
    - never a marker the corpus never wrote twice back to back, right after itself;
    - never the END of a block with nothing written inside, where the corpus never closed it empty;
    - never a second time in a document a marker no document of the corpus held twice (a title).
    """

    def __init__(self, grammar: MarkerGrammar, doc_end: str | None = None):
        self.g = grammar
        self.ends = {e: s for s, e in grammar.pairs.items()}
        self.doc_end = doc_end if doc_end in grammar.counts else _closer(grammar)
        self.stack: list[str] = []
        self.used: set[str] = set()  # markers written so far in this document
        self.last: str | None = None  # the last marker, while only whitespace followed it
        self.started = self.ended = False

    def copy(self) -> GrammarState:
        new = GrammarState.__new__(GrammarState)
        new.__dict__ = {**self.__dict__, "stack": list(self.stack), "used": set(self.used)}
        return new

    @property
    def top(self) -> str:
        return self.stack[-1] if self.stack else OUTSIDE

    def allowed(self, marker: str) -> bool:
        if self.ended or marker not in self.g.counts:
            return False
        if self.last == marker and self.g.never_repeats(marker):
            return False
        if marker in self.used and self.g.once_per_document(marker):
            return False
        if not self.started and marker not in self.g.opens:
            return False
        if marker == self.doc_end and marker not in self.ends:  # a terminator: the whole book is closed
            return not self.stack and marker in self.g.closes
        if marker in self.ends:
            return self.top == self.ends[marker] and not self.empty_top()
        return marker in self.g.allowed_in(self.top)

    def empty_top(self) -> bool:
        """The innermost block was just opened (only whitespace since) and the corpus never closed it empty."""
        return bool(self.stack) and self.last == self.stack[-1] and self.g.never_empty(self.stack[-1])

    def closer(self) -> str | None:
        """The marker that closes what is open: the innermost open block's END, else the book end."""
        if self.ended:
            return None
        if self.stack:
            return self.g.end_of(self.stack[-1])
        return self.doc_end if self.started and self.doc_end not in self.ends else None

    def needed(self) -> str | None:
        """The marker the structure needs next: the closer, unless its block still needs text first."""
        return None if self.empty_top() else self.closer()

    def to_close(self) -> int:
        """Markers still needed for a well-formed end: every open block's END, and the closer."""
        if self.ended:
            return 0
        terminator = self.started and self.doc_end is not None and self.doc_end not in self.ends
        return len(self.stack) + terminator

    def one_line_open(self) -> bool:
        """An open block the corpus always closes on its own line: a line break now breaks it."""
        return any(self.g.one_line(s) for s in self.stack)

    def step(self, marker: str) -> None:
        """Take one marker as written (allowed or not: a prompt is followed as it is)."""
        self.started = True
        self.used.add(marker)
        if marker in self.ends:
            start = self.ends[marker]
            if start in self.stack:
                del self.stack[len(self.stack) - 1 - self.stack[::-1].index(start):]
        elif marker in self.g.pairs:
            self.stack.append(marker)
        self.last = marker
        if marker == self.doc_end and not self.stack:
            self.ended = True

    def text(self, written: str) -> None:
        """Take text between markers: only whitespace keeps the last marker 'back to back'."""
        if written.strip():
            self.last = None


def _closer(grammar: MarkerGrammar) -> str | None:
    """The marker most documents end with (the book end), if most do."""
    if not grammar.closes:
        return None
    marker, n = max(grammar.closes.items(), key=lambda kv: (kv[1], kv[0]))
    return marker if n * 2 > grammar.documents else None


def follow(grammar: MarkerGrammar, text: str, pattern: str, doc_end: str | None = None) -> GrammarState:
    """The state after `text` (a prompt), markers and text taken as written.

    A prompt that starts inside a document (text, or a marker the corpus never opens with, such
    as `|START_OF_TITLE|>` in a corpus whose books open with `|START_OF_BOOK|>`) is taken as inside
    the corpus's usual opener: its book can still be closed."""
    state = GrammarState(grammar, doc_end)
    rx = re.compile(with_literals(pattern, grammar.markers))
    found = list(rx.finditer(text))
    first = found[0].group() if found else None
    if (first not in grammar.opens) and (found or text.strip()) and grammar.opens:
        opener = max(grammar.opens.items(), key=lambda kv: (kv[1], kv[0]))[0]
        state.step(opener)
    last = 0
    for m in found:
        state.text(text[last:m.start()])
        state.step(m.group())
        last = m.end()
    state.text(text[last:])
    return state


# --- as readable rules


def render_rules(g: MarkerGrammar | None) -> str:
    """`peftko markers --grammar`: the rules, one a line, each with what it was learned from."""
    if g is None:
        return "Grammar: no markers in the corpus, so no grammar (strict generation is refused).\n"
    lines = [f"Grammar learned from {g.documents} document{'s' * (g.documents != 1)} with markers:"]
    for start, end in g.pairs.items():
        where = "may span lines" if start in g.spanning else "opens and closes on one line"
        lines.append(f"  pair     {start} ... {end}  ({g.counts[start]}x; {where})")
    for context, seen in g.inside.items():
        what = "outside every block" if context == OUTSIDE else f"inside {context}"
        lines.append(f"  {what}: " + ", ".join(f"{m} ({n})" for m, n in seen.items()))
    lines.append("  a document opens with " + ", ".join(f"{m} ({n})" for m, n in g.opens.items()))
    lines.append("  a document closes with " + ", ".join(f"{m} ({n})" for m, n in g.closes.items()))
    never = [m for m in g.markers if g.never_repeats(m) and m not in {e for e in g.pairs.values()}]
    if never:
        lines.append("  never back to back: " + ", ".join(never))
    once = [m for m in g.markers if g.once_per_document(m)]
    if once:
        lines.append("  at most once a document: " + ", ".join(once))
    never_empty = [s for s in g.pairs if g.never_empty(s)]
    if never_empty:
        lines.append("  never closed empty: " + ", ".join(never_empty))
    repeated = [f"{m} ({n})" for m, n in g.repeats.items() if n]
    if repeated:
        lines.append("  back to back at times: " + ", ".join(repeated))
    if g.text_pieces:
        lines.append("  marker pieces also written as text: " + " ".join(g.text_pieces[:20]))
    lines += [f"warning: {w}" for w in g.warnings]
    return "\n".join(lines) + "\n"
