"""`peftko markers` end to end through click, with and without a (tiny, real) tokenizer."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from peftko.cli import main
from peftko.core.config import DEFAULT_MARKER_PATTERN
from peftko.corpus.scan import scan_corpus
from tests.conftest import deny_open

BOOK = """|START_OF_BOOK|>
|START_OF_TITLE|>노란 우산의 여행|END_OF_TITLE|>
서준이에게는 노란 우산이 하나 있었습니다. 하늘이 잔뜩 찌푸리더니 |SOUND|>후두둑 빗방울이 떨어졌습니다.
|START_OF_DIALOGUE|>"엄마, 우산 어디 있어요?"|END_OF_DIALOGUE|>
|START_OF_DIALOGUE|>"현관에 있지. 조심히 다녀오렴."|END_OF_DIALOGUE|>
|SOUND|>철벅철벅. 서준이는 웅덩이를 피해 학교로 향했습니다.
|END_OF_BOOK|>
"""
KOREAN_LINES = [
    "서준이에게는 노란 우산이 하나 있었습니다.",
    "하늘이 잔뜩 찌푸리더니 빗방울이 떨어지기 시작했습니다.",
    "엄마, 우산 어디 있어요? 현관에 있지. 조심히 다녀오렴.",
    "철벅철벅. 서준이는 웅덩이를 피해 학교로 향했습니다.",
    "할머니 댁에서 도윤이가 제일 좋아하는 곳은 부엌이었습니다.",
]


def run(*args: str):
    return CliRunner().invoke(main, ["markers", *args])


@pytest.fixture
def clean_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "01.txt").write_text(BOOK, encoding="utf-8")
    (corpus / "02.txt").write_bytes(BOOK.replace("\n", "\r\n").encode("cp949"))
    (corpus / "03.md").write_bytes(codecs.BOM_UTF16_LE + BOOK.encode("utf-16-le"))
    return corpus


@pytest.fixture
def bad_corpus(clean_corpus: Path) -> Path:
    (clean_corpus / "04.txt").write_text("|START_OF_BOOK|>\n|sound|>쿵!\n|END_OF_BOOK|>\n", encoding="utf-8")
    return clean_corpus


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE trained on Korean without markers, saved like a base model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(KOREAN_LINES * 5, trainer=trainer)
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


def test_json_output_has_the_required_shape(clean_corpus):
    result = run(str(clean_corpus), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"files", "markers", "problems"} <= set(data)
    assert [(Path(f["path"]).name, f["encoding"], f["status"]) for f in data["files"]] == [
        ("01.txt", "utf-8", "ok"), ("02.txt", "cp949", "ok"), ("03.md", "utf-16", "ok"),
    ]
    assert set(data["files"][0]) == {"path", "encoding", "status", "detail", "chars", "preview"}
    assert data["files"][0]["preview"].startswith("|START_OF_BOOK|>\n|START_OF_TITLE|>노란")
    assert data["markers"]["|SOUND|>"] == 6 and data["markers"]["|START_OF_DIALOGUE|>"] == 6
    assert data["marker_files"]["|SOUND|>"] == 3
    assert data["problems"] == []
    assert data["pieces"] is None and data["tokens_per_syllable"] is None


def test_json_problems_carry_path_line_kind_text(bad_corpus):
    data = json.loads(run(str(bad_corpus), "--json").output)
    assert len(data["problems"]) == 1
    problem = data["problems"][0]
    assert Path(problem["path"]).name == "04.txt" and problem["line"] == 2
    assert problem["kind"] == "near-miss" and "|SOUND|>" in problem["text"]


def test_strict_exits_1_with_a_problem_and_0_without(clean_corpus, tmp_path):
    assert run(str(clean_corpus), "--strict").exit_code == 0
    (clean_corpus / "04.txt").write_text('|START_OF_DIALOGUE|>"가"\n', encoding="utf-8")
    result = run(str(clean_corpus), "--strict")
    assert result.exit_code == 1
    assert "unbalanced" in result.output
    assert run(str(clean_corpus)).exit_code == 0  # without --strict a problem is only reported


def test_table_mentions_files_markers_and_problems(bad_corpus):
    (bad_corpus / "05.txt").write_bytes(b"")
    (bad_corpus / "06.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    result = run(str(bad_corpus))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Files (6)" in out and "01.txt" in out and "cp949" in out and "utf-16" in out
    assert "Markers (7)" in out and "|START_OF_DIALOGUE|>" in out
    assert "Problems (1)" in out and "04.txt:2" in out and "near-miss" in out
    assert "warning:" in out and "05.txt is empty" in out
    assert "06.txt is binary" in out


def test_missing_path_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_corpus"
    result = run(str(missing))
    assert result.exit_code == 2
    assert str(missing) in result.output


def test_bad_jsonl_line_exits_2_with_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "가"}\n{"body": "나"}\n', encoding="utf-8")
    result = run(str(tmp_path))
    assert result.exit_code == 2 and "d.jsonl:2" in result.output
    ok = run(str(tmp_path), "--jsonl-field", "body")
    assert ok.exit_code == 2 and "d.jsonl:1" in ok.output  # the first record lacks "body"


def test_model_shows_pieces_and_tokens_per_syllable(clean_corpus, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(str(clean_corpus), "--json", "--model", str(tiny_tokenizer))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data["pieces"]) == set(data["markers"])
    assert all(n > 1 for n in data["pieces"].values()), data["pieces"]
    assert isinstance(data["tokens_per_syllable"], float) and data["tokens_per_syllable"] > 0
    table = run(str(clean_corpus), "--model", str(tiny_tokenizer)).output
    assert "pieces now -> after registration" in table and "-> 1" in table
    assert "Tokens per Hangul syllable" in table


def test_model_that_is_not_a_tokenizer_exits_2(clean_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty_model").mkdir()
    result = run(str(clean_corpus), "--model", str(tmp_path / "empty_model"))
    assert result.exit_code == 2 and "empty_model" in result.output
    result = run(str(clean_corpus), "--model", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "nowhere" in result.output


def test_bad_pattern_exits_2(clean_corpus):
    result = run(str(clean_corpus), "--pattern", "|[A-Z")
    assert result.exit_code == 2 and "not a valid regular expression" in result.output


def test_summary_is_short_and_lists_problems(bad_corpus):
    report = scan_corpus([bad_corpus], DEFAULT_MARKER_PATTERN)
    summary = report.render_summary()
    lines = summary.splitlines()
    assert len(lines) <= 6
    assert lines[0].startswith("corpus: 4 files (") and "cp949: 1" in lines[0] and "utf-16: 1" in lines[0]
    assert lines[1].startswith("markers: 7 (") and "|SOUND|> x6" in lines[1]
    assert lines[2].startswith("problems: 1") and "04.txt:2 near-miss" in lines[3]
    assert report.bad_files == []


def test_unreadable_and_damaged_files_are_listed_with_the_reason(clean_corpus, monkeypatch):
    deny_open(monkeypatch, clean_corpus / "01.txt")
    (clean_corpus / "05.txt").write_bytes(BOOK.encode("utf-8") + b"\xff" + BOOK.encode("utf-8"))
    result = run(str(clean_corpus))
    assert result.exit_code == 0, result.output
    assert "01.txt is unreadable: Permission denied (skipped)" in result.output
    assert "05.txt is undecodable: invalid UTF-8 at line 8, byte offset" in result.output
    data = json.loads(run(str(clean_corpus), "--json").output)
    by_name = {Path(f["path"]).name: f for f in data["files"]}
    assert (by_name["01.txt"]["status"], by_name["01.txt"]["detail"]) == ("unreadable", "Permission denied")
    assert by_name["05.txt"]["status"] == "undecodable"
    assert data["markers"]["|SOUND|>"] == 4  # the two readable books, 02.txt and 03.md, still count


def test_training_refuses_unreadable_files_unless_told_to_skip_them(clean_corpus, monkeypatch):
    from peftko.core.config import TrainConfig
    from peftko.core.errors import UserError
    from peftko.corpus.reading import read_corpus

    locked = clean_corpus / "02.txt"
    deny_open(monkeypatch, locked)
    with pytest.raises(UserError) as e:
        read_corpus(TrainConfig(data=[str(clean_corpus)]).corpus())
    assert f"{locked}: unreadable: Permission denied" in str(e.value) and "--skip-bad-files" in str(e.value)
    _, files = read_corpus(TrainConfig(data=[str(clean_corpus)], skip_bad_files=True).corpus())
    assert [f.path.name for f in files] == ["01.txt", "03.md"]


def test_json_writes_hangul_as_utf8_not_escapes(tmp_path):
    (tmp_path / "할머니의_부엌.txt").write_text("|START_OF_TITLE|>할머니의 부엌|END_OF_TITLE|>\n이야기\n",
                                           encoding="utf-8")
    result = run(str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert "할머니의_부엌" in result.output and "\\u" not in result.output
    assert json.loads(result.output)["files"][0]["path"].endswith("할머니의_부엌.txt")
