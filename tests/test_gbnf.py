"""markers.gbnf (peftko.merge.gbnf): the corpus's marker grammar in llama.cpp's GBNF.

The grammar is checked by what it accepts: every book of the sample corpus (and the rest of one
after the usual prompt `|START_OF_BOOK|>`), and nothing with an END before its START, a block
closed out of order, a title across a line break, or a marker spelled as loose words. GBNF is read
here by a small translator to a Python regex, enough for the subset peftko writes (literals,
character classes with \\x escapes, alternatives, ( )*, rule references without recursion). llama.cpp's own
parser does not read it here: no llama.cpp is built by the suite yet (issue 33, part 4).
"""

from __future__ import annotations

import re

import pytest

from peftko.core.config import DEFAULT_MARKER_PATTERN
from peftko.core.paths import sample_corpus_dir
from peftko.corpus.grammar import learn_grammar
from peftko.corpus.scan import scan_corpus
from peftko.merge.gbnf import gbnf
from peftko.merge.gguf import modelfile
from peftko.run.records import RunRecord
from tests.test_grammar import BOOK, DIALOGUE, END, END_DIALOGUE, END_TITLE, NESTED, PLAIN, SOUND, TITLE

TOKEN = re.compile(r'\s*(?:(?P<lit>"(?:\\.|[^"\\])*")|(?P<cls>\[(?:\\.|[^\]\\])*\])|(?P<name>[a-z0-9-]+)'
                   r'|(?P<op>[()|*+]))')


def to_regex(text: str) -> re.Pattern:
    rules = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, body = line.split("::=", 1)
            rules[name.strip()] = body.strip()

    def expand(name: str, depth: int = 0) -> str:
        assert depth < 20, f"recursive rule {name}"
        out, body = [], rules[name]
        for m in TOKEN.finditer(body):
            if m["lit"]:
                out.append(re.escape(m["lit"][1:-1].encode().decode("unicode_escape")))
            elif m["cls"]:
                out.append(m["cls"])  # GBNF's [^\x3E...] is Python's too
            elif m["name"]:
                out.append(f"(?:{expand(m['name'], depth + 1)})")
            else:
                out.append(m["op"])
        return "".join(out)

    return re.compile(expand("root"), re.DOTALL)


@pytest.fixture(scope="module")
def sample_books():
    from peftko.corpus.documents import iter_located_documents

    return [d.text for p in sorted(sample_corpus_dir().glob("*.txt")) for d in iter_located_documents(p, "utf-8")]


@pytest.fixture(scope="module")
def sample_rx():
    grammar = scan_corpus([sample_corpus_dir()], DEFAULT_MARKER_PATTERN).grammar
    return to_regex(gbnf(grammar, END))


def test_every_sample_book_and_the_rest_of_one_after_the_prompt_are_accepted(sample_books, sample_rx):
    assert len(sample_books) == 15
    for text in sample_books:
        assert sample_rx.fullmatch(text), text[:80]
        assert sample_rx.fullmatch(text.removeprefix(BOOK))  # what llama.cpp generates after the prompt


@pytest.mark.parametrize("broken", [
    f"\n{TITLE}달빛{END_DIALOGUE}우체부{END_TITLE}\n{END}",  # an END without its START (the case)
    f"\n{TITLE}달빛\n우체부{END_TITLE}\n{END}",  # a title across a line break
    f"\n{TITLE}달빛 우체부\n{END}",  # a block left open at the book end
    f"\n{DIALOGUE}\"이게 무슨 말이야?\"OF\"아, 저도요\"{END_DIALOGUE}\n{END}",  # marker words as text
    f"\n{DIALOGUE}\"비가 와요!\" {SOUND}후두둑{END_DIALOGUE}\n{END}",  # nesting the corpus never had
    f"\n{TITLE}달빛{END_TITLE}\n",  # no book end
    f"\n{TITLE}{END_TITLE}\n{END}",  # an empty title: the corpus never has one
])
def test_broken_structure_is_refused(sample_rx, broken):
    assert sample_rx.fullmatch(broken) is None


def test_nesting_is_accepted_where_the_corpus_has_it():
    rx = to_regex(gbnf(learn_grammar([NESTED, PLAIN], DEFAULT_MARKER_PATTERN), END))
    assert rx.fullmatch(f"\n{DIALOGUE}\"비가 와요!\" {SOUND}후두둑{END_DIALOGUE}\n{END}")
    assert rx.fullmatch(NESTED) and rx.fullmatch(PLAIN)


def test_an_empty_block_is_accepted_only_where_the_corpus_has_one():
    empty_title = f"\n{TITLE}{END_TITLE}\n{END}"
    with_empty = PLAIN.replace(f"{TITLE}노란 우산{END_TITLE}", f"{TITLE}{END_TITLE}")
    assert to_regex(gbnf(learn_grammar([PLAIN, with_empty], DEFAULT_MARKER_PATTERN), END)).fullmatch(empty_title)
    assert not to_regex(gbnf(learn_grammar([PLAIN], DEFAULT_MARKER_PATTERN), END)).fullmatch(empty_title)


def test_a_terminator_grammar_ends_with_the_terminator():
    g = learn_grammar([f"{TITLE}우산{END_TITLE}\n비가 왔습니다.{END}", f"{TITLE}달{END_TITLE}\n달.{END}"],
                      DEFAULT_MARKER_PATTERN)
    rx = to_regex(gbnf(g, END))
    assert rx.fullmatch(f"{TITLE}해{END_TITLE}\n해가 떴습니다.{END}") and not rx.fullmatch(f"{TITLE}해\n{END}")


def test_the_modelfile_keeps_the_book_end_stop_and_names_the_grammar():
    manifest = {"base_model": "base", "base_fingerprint": {}, "vocab": {"rows_after": 6},
                "config": {"doc_end_marker": END}, "markers": [{"marker": END, "id": 5}],
                "grammar": learn_grammar([PLAIN], DEFAULT_MARKER_PATTERN).to_json()}
    lines = modelfile("model-f16.gguf", RunRecord.from_json(manifest, "peftko.json")).splitlines()
    assert f'PARAMETER stop "{END}"' in lines and any("--grammar-file markers.gbnf" in x for x in lines)
