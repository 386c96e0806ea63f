"""peftko.corpus.grammar: the markers' grammar learned from the corpus, kept in the records, shown by
`peftko markers --grammar`, and followed marker by marker (GrammarState)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import DEFAULT_MARKER_PATTERN
from peftko.core.errors import UserError
from peftko.core.paths import sample_corpus_dir
from peftko.corpus.grammar import GrammarState, follow, learn_grammar, render_rules
from peftko.corpus.scan import scan_corpus
from peftko.run.grammar_record import OUTSIDE, MarkerGrammar
from peftko.run.records import MergeRecord, RunRecord
from tests.test_records import a_run_record

BOOK, END = "|START_OF_BOOK|>", "|END_OF_BOOK|>"
TITLE, END_TITLE = "|START_OF_TITLE|>", "|END_OF_TITLE|>"
DIALOGUE, END_DIALOGUE, SOUND = "|START_OF_DIALOGUE|>", "|END_OF_DIALOGUE|>", "|SOUND|>"


def book(*lines: str) -> str:
    return "\n".join([BOOK, f"{TITLE}노란 우산{END_TITLE}", *lines, END])


PLAIN = book(f"{DIALOGUE}\"엄마, 우산 어디 있어요?\"{END_DIALOGUE}", f"{SOUND}철벅철벅. 서준이는 걸었습니다.")
NESTED = book(f"{DIALOGUE}\"비가 와요!\" {SOUND}후두둑{END_DIALOGUE}", f"{SOUND}철벅철벅.")


def grammar_of(*docs: str) -> MarkerGrammar | None:
    return learn_grammar(list(docs), DEFAULT_MARKER_PATTERN)


def test_the_sample_corpus_grammar_pairs_nests_opens_and_closes_as_written():
    g = scan_corpus([sample_corpus_dir()], DEFAULT_MARKER_PATTERN).grammar
    assert g.documents == 15 and g.counts[DIALOGUE] == 142
    assert g.pairs == {BOOK: END, TITLE: END_TITLE, DIALOGUE: END_DIALOGUE}
    assert g.opens == {BOOK: 15} and g.closes == {END: 15}
    assert g.inside[OUTSIDE] == {BOOK: 15}
    assert set(g.inside[BOOK]) == {TITLE, DIALOGUE, SOUND} and DIALOGUE not in g.inside  # nothing inside a dialogue
    assert g.spanning == [BOOK] and g.one_line(TITLE) and not g.one_line(BOOK)
    assert all(g.never_repeats(m) for m in g.counts) and g.text_pieces == [] and g.warnings == []


def test_nesting_is_allowed_only_where_the_corpus_shows_it():
    for doc, nested in ((NESTED, True), (PLAIN, False)):
        state = follow(grammar_of(doc), f"{BOOK}\n{DIALOGUE}\"비가", DEFAULT_MARKER_PATTERN)
        assert state.allowed(SOUND) is nested
        assert state.allowed(END_DIALOGUE) and not state.allowed(END) and not state.allowed(END_TITLE)


def test_the_state_allows_no_end_without_its_start_and_the_book_end_only_when_all_is_closed():
    two_sounds = PLAIN.replace(f"{SOUND}철벅철벅.", f"{SOUND}철벅철벅. {SOUND}쏴아.")
    g = grammar_of(PLAIN, two_sounds)
    state = GrammarState(g)
    assert [m for m in g.markers if state.allowed(m)] == [BOOK]  # the only opener
    state.step(BOOK)
    assert not state.allowed(END_TITLE) and not state.allowed(END_DIALOGUE)  # no END without its START
    assert not state.allowed(END)  # and no empty book: the corpus has none
    state.step(TITLE)
    assert state.needed() is None and not any(state.allowed(m) for m in g.markers)  # a title needs words first
    state.text("노란 우산")
    assert state.needed() == END_TITLE and state.to_close() == 2 and state.one_line_open()
    assert [m for m in g.markers if state.allowed(m)] == [END_TITLE]
    state.step(END_TITLE)
    state.step(SOUND)
    assert not state.allowed(SOUND)  # never back to back in the corpus
    state.text("철벅")
    assert state.allowed(SOUND) and state.needed() == END
    state.step(END)
    assert state.ended and not any(state.allowed(m) for m in g.markers)


def test_a_block_the_corpus_never_leaves_empty_cannot_close_empty():
    empty_title = PLAIN.replace(f"{TITLE}노란 우산{END_TITLE}", f"{TITLE} {END_TITLE}")
    for docs, empty_ok in (((PLAIN,), False), ((PLAIN, empty_title), True)):
        g = grammar_of(*docs)
        assert g.empties[TITLE] == int(empty_ok) and g.never_empty(TITLE) is not empty_ok
        state = follow(g, f"{BOOK}\n{TITLE} ", DEFAULT_MARKER_PATTERN)
        assert state.allowed(END_TITLE) is empty_ok and (state.needed() == END_TITLE) is empty_ok
        assert state.closer() == END_TITLE
        state.text("노란")
        assert state.allowed(END_TITLE) and state.needed() == END_TITLE
    assert "never closed empty: |START_OF_BOOK|>, |START_OF_TITLE|>, |START_OF_DIALOGUE|>" in render_rules(grammar_of(PLAIN))
    old = MarkerGrammar.from_json({k: v for k, v in grammar_of(PLAIN).to_json().items() if k != "empties"})
    assert old.empties is None and not old.never_empty(TITLE)  # a record from before: no such rule


def test_a_marker_no_document_holds_twice_comes_once_a_document():
    g = grammar_of(PLAIN, NESTED)
    assert g.per_document[TITLE] == 1 and g.per_document[SOUND] == 2
    assert g.once_per_document(TITLE) and not g.once_per_document(SOUND)
    state = follow(g, f"{BOOK}\n{TITLE}노란 우산{END_TITLE}\n", DEFAULT_MARKER_PATTERN)
    assert not state.allowed(TITLE)  # a second title: no book of the corpus has one
    assert state.allowed(DIALOGUE) and state.copy().used == state.used
    rule = next(ln for ln in render_rules(g).splitlines() if "at most once a document:" in ln)
    assert TITLE in rule and SOUND not in rule
    twice = PLAIN.replace(f"{END_TITLE}\n", f"{END_TITLE}\n{TITLE}둘째 제목{END_TITLE}\n", 1)
    assert not grammar_of(PLAIN, twice).once_per_document(TITLE)  # the corpus's word, not an assumption
    assert not grammar_of(PLAIN).once_per_document(TITLE)  # one document proves nothing
    old = MarkerGrammar.from_json({k: v for k, v in g.to_json().items() if k != "per_document"})
    assert old.per_document is None and not old.once_per_document(TITLE)


def test_a_terminator_without_a_start_closes_the_document_when_nothing_is_open():
    g = grammar_of(f"{TITLE}우산{END_TITLE}\n비가 왔습니다.{SOUND}후두둑\n{END}", f"{TITLE}달{END_TITLE}\n달이 떴습니다.{END}")
    assert END not in g.pairs.values() and g.closes == {END: 2}
    state = follow(g, f"{TITLE}우산", DEFAULT_MARKER_PATTERN)
    assert not state.allowed(END) and state.needed() == END_TITLE and state.to_close() == 2
    state.step(END_TITLE)
    assert state.allowed(END) and state.needed() == END and state.to_close() == 1


def test_an_unbalanced_corpus_gives_a_grammar_with_a_warning_never_an_error():
    g = grammar_of(PLAIN, f"{BOOK}\n{END_TITLE}제목{TITLE}\n{DIALOGUE}말{END}", f"{END_DIALOGUE}{END_DIALOGUE}")
    assert g is not None and g.pairs[TITLE] == END_TITLE
    assert len(g.warnings) == 1 and "END without its START" in g.warnings[0] and "START never closed" in g.warnings[0]
    assert "warning: unbalanced markers" in render_rules(g)


def test_a_corpus_without_markers_has_no_grammar():
    assert grammar_of("옛날 어느 마을에 작은 우체부가 살았습니다.") is None
    assert "no grammar" in render_rules(None)


def test_marker_pieces_written_as_text_are_learned():
    g = grammar_of(book("OF 그리고 END는 영어입니다."))
    assert {"OF", "END", "O", "E"} <= set(g.text_pieces) and "TITLE" not in g.text_pieces


def test_the_grammar_round_trips_through_peftko_json_and_the_merge_mark():
    g = grammar_of(NESTED, PLAIN)
    run = RunRecord.from_json(json.loads(json.dumps({**a_run_record().to_json(), "grammar": g.to_json()})),
                              Path("peftko.json"))
    assert run.grammar == g and run.to_json()["grammar"] == g.to_json()
    mark = MergeRecord("/runs/a", "/models/base", "bfloat16", ["config.json"], grammar=g)
    assert MergeRecord.from_json(json.loads(json.dumps(mark.to_json())), Path("peftko-merge.json")) == mark
    assert "grammar" not in a_run_record().to_json()  # a run without one writes none


def test_a_malformed_grammar_is_refused_by_name():
    data = {**a_run_record().to_json(), "grammar": {**grammar_of(PLAIN).to_json(), "pairs": [1]}}
    with pytest.raises(UserError, match="'grammar.pairs' must be a dict of START to END markers"):
        RunRecord.from_json(data, Path("peftko.json"))


def test_markers_grammar_prints_the_rules(tmp_path):
    (tmp_path / "a.txt").write_text(NESTED + "\n" + PLAIN + "\n", encoding="utf-8")
    out = CliRunner().invoke(main, ["markers", str(tmp_path), "--grammar"])
    assert out.exit_code == 0, out.output
    assert f"inside {DIALOGUE}: {SOUND} (1)" in out.output
    assert f"pair     {TITLE} ... {END_TITLE}  (2x; opens and closes on one line)" in out.output
    as_json = CliRunner().invoke(main, ["markers", str(tmp_path), "--grammar", "--json"])
    assert json.loads(as_json.output)["grammar"]["pairs"][DIALOGUE] == END_DIALOGUE
    plain = CliRunner().invoke(main, ["markers", str(tmp_path), "--json"])
    assert "grammar" not in json.loads(plain.output)  # unchanged without --grammar


def test_a_prompt_that_starts_inside_a_book_is_taken_as_inside_the_usual_opener():
    g = grammar_of(PLAIN, PLAIN)
    for prompt in (f"{TITLE}달빛{END_TITLE}\n옛날 어느 마을에", "옛날 어느 마을에"):
        state = follow(g, prompt, DEFAULT_MARKER_PATTERN)
        assert state.stack == [BOOK] and state.allowed(SOUND) and state.allowed(END)
    assert follow(g, f"{BOOK}\n", DEFAULT_MARKER_PATTERN).stack == [BOOK]
