"""`peftko ablate`'s one-line answer to "should I delete my markers?", and how sure it is.

The three variants are compared on what all of them predict: the story text of the held-out books
(bits per character outside the markers), book by book. A variant "wins" a book when its story-text
bits per character are lower there. How sure each comparison is comes from a one-sided sign test
over the books: with n books all won, p = 0.5**n, so fewer than 5 held-out books can never reach
p < 0.05, whatever the margins. What each variant writes (whole markers, or pieces of them) is
quoted beside it from the structure score (evaluate.structure), not mixed in.
"""

from __future__ import annotations

import math

SURE = 0.05  # the sign test's threshold for "sure"
ANSWERS = {
    "registered": "keep the markers, each registered as one token",
    "as-text": "keep the markers, but writing them as plain text did as well or better here",
    "deleted": "deleting the markers gave the best story text here; keep them only if you need the structure",
}


def sign_test(wins: int, n: int) -> float:
    """One-sided p of `wins` or more of `n` under a fair coin."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def books_won(a: list[float | None], b: list[float | None]) -> tuple[int, int]:
    """(books where a's bits per character are lower than b's, books both scored)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x < y for x, y in pairs), len(pairs)


def books_needed() -> int:
    """The fewest held-out books for which winning all of them is significant."""
    return next(n for n in range(1, 64) if sign_test(n, n) < SURE)


def _comparison(other: str, wins: int, n: int) -> str:
    p = sign_test(wins, n)
    sure = "sure" if p < SURE else (f"not sure: fewer than {books_needed()} books can never be" if n < books_needed()
                                    else "not sure")
    return f"on {wins} of {n} books than {other} (sign test p = {p:.3f}: {sure})"


def _markers_written(by: dict) -> str:
    """Which variants write whole markers only, from their structure scores."""
    shown = [f"{v} {s['whole_markers_only']:.0%} ({s['fragments_per_sample']:.1f} fragments per sample)"
             for v, s in ((v, by[v].get("structure")) for v in by) if s and "whole_markers_only" in s]
    return f" Samples with whole markers only: {', '.join(shown)}." if shown else ""


def verdict(rows: list[dict]) -> str:
    """One line: which variant to use, by held-out story text, book by book, with the sign test's p."""
    by = {r["variant"]: r for r in rows}
    best = min(by, key=lambda v: by[v]["bpc_text"] if by[v]["bpc_text"] is not None else math.inf)
    per_book = {v: by[v]["eval"]["per_document_bits_per_char_text"] for v in by}
    won = " and ".join(_comparison(v, *books_won(per_book[best], per_book[v])) for v in by if v != best)
    figures = ", ".join(f"{v} {by[v]['bpc_text']:.3f}" for v in by if by[v]["bpc_text"] is not None)
    return (f"verdict: {ANSWERS[best]}. Held-out story text, bits per character: {figures}; {best} is lower "
            f"{won}.{_markers_written(by)}")
