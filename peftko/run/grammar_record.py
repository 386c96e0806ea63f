"""The marker grammar as peftko.json and peftko-merge.json keep it (learned by peftko.corpus.grammar).

Only what was observed in the corpus, with counts, so `peftko markers --grammar` can show why a rule
holds and a later reader can tell a rule seen once from one seen a thousand times. Read and written
through peftko.run.records (RunRecord.grammar, MergeRecord.grammar); a file from before the grammar
was kept has none, and strict generation is then refused with a message that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OUTSIDE = ""  # the context of a marker that stands in no open block: between documents, or before the first START


def _counts(x) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                       for k, v in x.items())


def _names(x) -> bool:
    return isinstance(x, list) and all(isinstance(n, str) for n in x)


# key -> (check, what it must be)
_RULES = {
    "documents": (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer"),
    "counts": (_counts, "a dict of marker counts"),
    "pairs": (lambda x: isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in x.items()),
              "a dict of START to END markers"),
    "inside": (lambda x: isinstance(x, dict) and all(isinstance(k, str) and _counts(v) for k, v in x.items()),
               "a dict of marker counts per enclosing marker"),
    "opens": (_counts, "a dict of marker counts"),
    "closes": (_counts, "a dict of marker counts"),
    "repeats": (_counts, "a dict of marker counts"),
    "spanning": (_names, "a list of markers"),
    "text_pieces": (_names, "a list of strings"),
    "warnings": (_names, "a list of strings"),
    "empties": (_counts, "a dict of marker counts"),
    "per_document": (_counts, "a dict of marker counts"),
}


@dataclass(frozen=True)
class MarkerGrammar:
    """What the corpus's documents do with their markers (each count: occurrences in the corpus)."""

    documents: int  # documents that hold at least one marker
    counts: dict[str, int]  # marker -> occurrences
    pairs: dict[str, str]  # START marker -> its END marker, where the corpus uses both
    inside: dict[str, dict[str, int]]  # innermost open START (OUTSIDE: none) -> START or standalone marker seen there
    opens: dict[str, int]  # the first marker of a document -> documents
    closes: dict[str, int]  # the last marker of a document -> documents
    repeats: dict[str, int]  # marker -> times it followed itself with only whitespace between
    spanning: list[str] = field(default_factory=list)  # STARTs whose block was seen to cross a line break
    text_pieces: list[str] = field(default_factory=list)  # pieces of markers the corpus also writes as plain text
    warnings: list[str] = field(default_factory=list)  # unbalanced markers met while learning
    # START -> times its block was closed with only whitespace inside; None in a record written before
    # peftko learned it (no rule then: an empty block stays allowed)
    empties: dict[str, int] | None = None
    # marker -> the most times one document held it; None in a record written before peftko kept it
    per_document: dict[str, int] | None = None

    @property
    def markers(self) -> list[str]:
        return sorted(self.counts)

    def never_repeats(self, marker: str) -> bool:
        return self.repeats.get(marker, 0) == 0

    def never_empty(self, start: str) -> bool:
        """A block the corpus never closed with nothing inside (a title, a dialogue, a book)."""
        return self.empties is not None and start in self.pairs and self.empties.get(start, 0) == 0

    def once_per_document(self, marker: str) -> bool:
        """A marker no document held twice (a book's title, its start), in a corpus of several documents."""
        return self.per_document is not None and self.documents > 1 and self.per_document.get(marker) == 1

    def end_of(self, start: str) -> str | None:
        return self.pairs.get(start)

    def start_of(self, end: str) -> str | None:
        return next((s for s, e in self.pairs.items() if e == end), None)

    def allowed_in(self, context: str) -> set[str]:
        """STARTs and standalone markers seen directly inside `context` (a START, or OUTSIDE)."""
        return set(self.inside.get(context, {}))

    def one_line(self, start: str) -> bool:
        """A block the corpus always closes on the line that opened it."""
        return start in self.pairs and start not in self.spanning

    def to_json(self) -> dict:
        return {"documents": self.documents, "counts": self.counts, "pairs": self.pairs, "inside": self.inside,
                "opens": self.opens, "closes": self.closes, "repeats": self.repeats, "spanning": self.spanning,
                "text_pieces": self.text_pieces, "warnings": self.warnings,
                **({} if self.empties is None else {"empties": self.empties}),
                **({} if self.per_document is None else {"per_document": self.per_document})}

    @staticmethod
    def problems(data, prefix: str = "grammar.") -> list[str]:
        if not isinstance(data, dict):
            return [f"'{prefix.rstrip('.')}' must be a dict"]
        missing = [f"'{prefix}{k}' is missing" for k in ("documents", "counts", "pairs", "inside", "opens", "closes",
                                                         "repeats") if k not in data]
        return missing + [f"'{prefix}{k}' must be {what}" for k, (ok, what) in _RULES.items()
                          if data.get(k) is not None and not ok(data[k])]

    @classmethod
    def from_json(cls, data: dict) -> MarkerGrammar:
        return cls(data["documents"], dict(data["counts"]), dict(data["pairs"]),
                   {k: dict(v) for k, v in data["inside"].items()}, dict(data["opens"]), dict(data["closes"]),
                   dict(data["repeats"]), list(data.get("spanning") or []), list(data.get("text_pieces") or []),
                   list(data.get("warnings") or []),
                   None if data.get("empties") is None else dict(data["empties"]),
                   None if data.get("per_document") is None else dict(data["per_document"]))
