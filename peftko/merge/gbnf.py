"""markers.gbnf: the corpus's marker grammar (peftko.corpus.grammar) in llama.cpp's GBNF, beside the GGUF.

llama.cpp constrains generation with a context-free grammar over the generated characters
(`llama-cli --grammar-file markers.gbnf`, llama-server's `grammar` field). The rules written here are
the learned ones that a context-free grammar can say:
- each pair as a block, `"|START_OF_X|>" body "|END_OF_X|>"`, holding only what the corpus had
  directly inside that block, so blocks close in order and an END never comes without its START;
- a document opens with its opener and ends with the book end, after every block closed; the
  generation may also start inside the opener (the usual prompt is `|START_OF_BOOK|>` alone);
- text is any character except those of the markers that the corpus never writes as plain text
  (in a Korean corpus: `|`, `>`, `_`, and the capitals of START/OF/TITLE), so a marker cannot be
  spelled as loose words (`OF`, `ENDOF`) in place of the marker: the escape route the issue measured
  in llama.cpp with a grammar that only forbade misplaced markers;
- no line break inside a block the corpus always closes on its own line (a title, a dialogue);
- a block the corpus never closed empty holds at least one item (a character or a block).
What it cannot say: "never twice back to back" and "at most once a document" (peftko's own strict
mode keeps both), and llama.cpp
only forbids, so the probability of a forbidden marker is spread over what is left rather than
given to the open block's closer as `peftko generate --structure strict` does.
"""

from __future__ import annotations

import re

from peftko.run.grammar_record import OUTSIDE, MarkerGrammar

FILE = "markers.gbnf"


def _name(marker: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", marker.lower()).strip("-") or "marker"


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _class_char(c: str) -> str:
    return c if c.isalnum() and c.isascii() else f"\\x{ord(c):02X}" if ord(c) < 0x100 else f"\\u{ord(c):04X}"


def _text_class(excluded: set[str]) -> str:
    return "[^" + "".join(_class_char(c) for c in sorted(excluded)) + "]"


def gbnf(grammar: MarkerGrammar, doc_end: str | None = None) -> str:
    """The GBNF text: `root` is one document, or the rest of one that the prompt opened."""
    markers = grammar.markers
    written = {p for p in grammar.text_pieces if len(p) == 1}
    marker_chars = {c for m in markers for c in m} - written
    ends = set(grammar.pairs.values())
    closer = doc_end if doc_end in grammar.counts else max(grammar.closes, key=grammar.closes.get, default=None)
    lines = ["# Written by peftko from the corpus's marker grammar (`peftko markers --grammar`).",
             "# llama-cli -m MODEL.gguf --grammar-file markers.gbnf -p '|START_OF_BOOK|>'",
             "# llama-server: send this file's text as the request's \"grammar\" field.",
             f"text ::= {_text_class(marker_chars)}",
             f"line-text ::= {_text_class(marker_chars | {chr(10)})}"]
    contexts = [OUTSIDE, *[s for s in grammar.pairs if s in grammar.counts]]
    for context in contexts:
        items = [m for m in grammar.allowed_in(context) if m not in ends and m != closer]
        one_line = context != OUTSIDE and grammar.one_line(context)
        choices = ["line-text" if one_line else "text"]
        choices += [f"block-{_name(m)}" if m in grammar.pairs else _literal(m) for m in sorted(items)]
        repeat = "+" if context != OUTSIDE and grammar.never_empty(context) else "*"
        lines.append(f"body-{_name(context) if context else 'outside'} ::= ( {' | '.join(choices)} ){repeat}")
        if context != OUTSIDE:
            lines.append(f"block-{_name(context)} ::= {_literal(context)} body-{_name(context)} "
                         f"{_literal(grammar.pairs[context])}")
    opener = max(grammar.opens, key=grammar.opens.get, default=None)
    if opener in grammar.pairs and grammar.pairs[opener] == closer:
        # The usual prompt is the opener alone: the generation is then the rest of its block.
        lines.append(f"root ::= block-{_name(opener)} | body-{_name(opener)} {_literal(closer)}")
    elif closer is not None:
        lines.append(f"root ::= body-outside {_literal(closer)}")
    else:
        lines.append("root ::= body-outside")
    return "\n".join(lines) + "\n"


def usage(path) -> str:
    return (f"llama.cpp grammar written to {path}: llama-cli -m MODEL.gguf --grammar-file {FILE} "
            "(or llama-server's \"grammar\" field) keeps the corpus's marker structure")
