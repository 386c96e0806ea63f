"""Marker discovery and lint: one test per problem kind, and a clean story with none."""

from __future__ import annotations

from collections import Counter

import pytest

from peftko.core.config import DEFAULT_MARKER_PATTERN as PATTERN
from peftko.corpus.lint import Problem, lint_corpus, lint_text, pair_role
from peftko.corpus.documents import Document

KNOWN = [
    "|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>",
    "|START_OF_DIALOGUE|>", "|END_OF_DIALOGUE|>", "|SOUND|>",
]

CLEAN_STORY = """|START_OF_BOOK|>
|START_OF_TITLE|>닷새마다 열리는 장터|END_OF_TITLE|>
강물이 두 갈래로 나뉘는 곳에 작은 읍내가 있었습니다. 이 읍내에서는 닷새마다 한 번씩 장이 섰습니다.

|SOUND|>뻥이요! 장터 입구에서 뻥튀기 할아버지가 크게 외쳤습니다. 곧이어 |SOUND|>펑! 하는 소리가 났습니다.

|START_OF_DIALOGUE|>"민지야, 오늘은 사람이 많겠다. 인절미 콩고물 좀 더 묻혀 놓자."|END_OF_DIALOGUE|>
|START_OF_DIALOGUE|>"네, 아빠! 그런데 똠이는 어디 갔어요?"|END_OF_DIALOGUE|>

똠이는 떡집에서 키우는 작은 흰 강아지였습니다. 민지는 | 표시 | 가 있는 표를 보며 웃었습니다.
|END_OF_BOOK|>"""


def lint(text: str) -> list[Problem]:
    return lint_text("story.txt", text, KNOWN, PATTERN)


def only(problems: list[Problem], kind: str) -> Problem:
    assert len(problems) == 1, problems
    assert kind in problems[0].kind
    return problems[0]


def test_markers_are_counted_per_corpus_and_per_file():
    result = lint_corpus(docs(("a.txt", CLEAN_STORY, 1), ("b.txt", "|SOUND|>쿵", 1)), PATTERN)
    assert result.counts["|SOUND|>"] == 3 and result.files["|SOUND|>"] == 2
    assert result.counts["|START_OF_TITLE|>"] == 1 and result.files["|END_OF_BOOK|>"] == 1

def test_clean_story_has_no_problems():
    assert lint(CLEAN_STORY) == []


# --- near-misses


@pytest.mark.parametrize(
    "written, slip",
    [
        ("<|SOUND|>", "extra '<'"),
        ("|SOUND|", "missing '>'"),
        ("|sound|>", "wrong case"),
        ("|SOUND |>", "spaces inside"),
        ("| SOUND|>", "spaces inside"),
        ("|SOUND>", "missing second '|'"),
        ("||SOUND|>", "extra '|'"),
        ("SOUND|>", "missing first '|'"),
    ],
)
def test_near_miss(written, slip):
    text = f"|SOUND|>똑똑.\n하늘이가 고개를 들었습니다. {written}쿵! 소리가 났습니다."
    problem = only(lint(text), "near-miss")
    assert problem == Problem("story.txt", 2, "near-miss", problem.text)
    assert written in problem.text and slip in problem.text
    assert "probably meant |SOUND|>" in problem.text


def test_near_miss_of_a_long_marker_names_it():
    text = "|START_OF_TITLE|>달빛 우체부|END_OF_TITLE |>"
    problems = lint(text)
    near = [p for p in problems if p.kind == "near-miss"]
    assert len(near) == 1 and "probably meant |END_OF_TITLE|>" in near[0].text


def test_unknown_names_and_table_cells_are_not_near_misses():
    assert lint("가 | 나 | 다 |\n| Sound | 소리 |\n|WHATEVER|\n|sounds|>") == []


def test_correct_marker_next_to_text_is_never_reported():
    assert lint("|SOUND|>|SOUND|>똑|START_OF_TITLE|>|END_OF_TITLE|>\n<b>|SOUND|>|</b>") == []


# --- unbalanced


def test_unbalanced_title_on_a_line():
    problem = only(lint("|START_OF_BOOK|>\n|START_OF_TITLE|>달빛 우체부\n본문\n|END_OF_BOOK|>"), "unbalanced")
    assert problem.line == 2 and "|START_OF_TITLE|> has no |END_OF_TITLE|>" in problem.text


def test_title_split_over_two_lines_reports_both_halves():
    problems = lint("|START_OF_TITLE|>달빛\n우체부|END_OF_TITLE|>")
    assert [(p.line, p.kind) for p in problems] == [(1, "unbalanced"), (2, "unbalanced")]


def test_unbalanced_dialogue_end_without_start():
    text = '엄마가 말했습니다. "내일은 꼭 올 거야."|END_OF_DIALOGUE|>'
    problem = only(lint(text), "unbalanced")
    assert problem.line == 1 and "without an open |START_OF_DIALOGUE|>" in problem.text


def test_end_before_start_on_a_line_is_unbalanced():
    problems = lint('|END_OF_DIALOGUE|>"가"|START_OF_DIALOGUE|>')
    assert len(problems) == 2 and all(p.kind == "unbalanced" for p in problems)


def test_nested_same_name_start_is_unbalanced():
    problem = only(lint('|START_OF_DIALOGUE|>"가 |START_OF_DIALOGUE|>나"|END_OF_DIALOGUE|>'), "unbalanced")
    assert "opened again" in problem.text


def test_unbalanced_book_across_a_document():
    problem = only(lint("\n|START_OF_BOOK|>\n|START_OF_TITLE|>제목|END_OF_TITLE|>\n본문입니다."), "unbalanced")
    assert problem.line == 2 and "no |END_OF_BOOK|>" in problem.text


def test_book_end_alone_is_a_terminator_not_a_problem():
    assert lint("본문입니다.\n\n|END_OF_BOOK|>") == []


def test_book_end_without_start_is_reported_where_the_start_form_is_used():
    problem = only(lint("|START_OF_BOOK|>가|END_OF_BOOK|>\n본문입니다.\n\n|END_OF_BOOK|>"), "unbalanced")
    assert problem.line == 4


def test_user_defined_pairs_follow_the_same_line_rule():
    assert pair_role("|START_OF_POEM|>").partner == "|END_OF_POEM|>"
    assert pair_role("|WEEKEND_SALE|>") is None
    assert lint_text("p.txt", "|START_OF_POEM|>시\n|END_OF_POEM|>", [], PATTERN)[0].kind == "unbalanced"


def test_first_line_shifts_line_numbers():
    problem = only(lint_text("f.txt", "가\n|sound|>", KNOWN, PATTERN, first_line=10), "near-miss")
    assert problem.line == 11


# --- corpus-wide


def docs(*items: tuple[str, str, int]) -> list[tuple[str, Document]]:
    return [(path, Document(text, line)) for path, text, line in items]


def test_once_only_marker_in_the_corpus():
    result = lint_corpus(
        docs(("a.txt", CLEAN_STORY, 1), ("b.txt", "|SOUND|>쿵\n\n|SOUDN|>쾅", 4)), PATTERN
    )
    problem = only(result.problems, "once-only")
    assert (problem.path, problem.line) == ("b.txt", 6)
    assert "|SOUDN|>" in problem.text


def test_books_ended_by_the_end_marker_alone_have_no_problems():
    """The common corpus shape (and the FAQ's advice): every book just ends with |END_OF_BOOK|>."""
    one = lint_corpus(docs(("a.txt", "첫 책입니다.\n|END_OF_BOOK|>", 1)), PATTERN)
    many = lint_corpus(docs(("a.txt", "첫 책.\n|END_OF_BOOK|>", 1), ("b.txt", "둘째 책.\n|END_OF_BOOK|>", 1)), PATTERN)
    assert one.problems == [] and many.problems == []


def test_a_book_missing_its_start_is_unbalanced_when_other_books_have_one():
    result = lint_corpus(docs(("a.txt", "|START_OF_BOOK|>첫 책.\n|END_OF_BOOK|>", 1),
                              ("b.txt", "둘째 책.\n|END_OF_BOOK|>", 1)), PATTERN)
    problem = only(result.problems, "unbalanced")
    assert (problem.path, problem.line) == ("b.txt", 2)


def test_single_book_pair_is_not_once_only():
    assert lint_corpus(docs(("a.txt", CLEAN_STORY, 1)), PATTERN).problems == []


def test_corpus_near_miss_uses_markers_from_other_files_and_file_lines():
    result = lint_corpus(docs(("a.txt", "첫 줄\n|Sound|>쿵", 5), ("b.txt", "|SOUND|>쾅 |SOUND|>", 1)), PATTERN)
    assert [(p.path, p.line, p.kind) for p in result.problems] == [("a.txt", 6, "near-miss")]
    assert result.counts == Counter({"|SOUND|>": 2})
    assert result.files == Counter({"|SOUND|>": 1})


def test_explicit_known_markers_find_near_misses_of_unused_ones():
    result = lint_corpus(docs(("a.txt", "|scene|>바다", 1)), PATTERN, known=["|SCENE|>"])
    assert only(result.problems, "near-miss").text.endswith("probably meant |SCENE|>")


def test_jsonl_documents_report_the_record_line():
    result = lint_corpus([("d.jsonl", Document("가\n나\n|sound|> |SOUND|>|SOUND|>", 7, one_line=True))], PATTERN)
    assert [(p.line, p.kind) for p in result.problems] == [(7, "near-miss")]
