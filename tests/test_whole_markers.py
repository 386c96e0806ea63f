"""Whole markers only: fragments are counted wherever text is generated, the verdict of `ablate` says
how sure it is, and the adapter with the lowest held-out loss is the one kept."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from peftko.corpus.lint import marker_fragments
from peftko.evaluate.verdict import books_needed, sign_test, verdict
from peftko.train.best import KeepBest

MARKERS = ["|START_OF_BOOK|>", "|END_OF_BOOK|>", "|START_OF_TITLE|>", "|END_OF_TITLE|>", "|SOUND|>"]


@pytest.mark.parametrize("text, fragments", [
    ("|START_OF_BOOK|>|START_OF_TITLE|>달빛|END_OF_TITLE|>\n|SOUND|>톡톡\n|END_OF_BOOK|>", []),
    ("|SOUND|>|SOUND|>", []),
    ("|>톡, 토독야옹 |SOUND|>톡야옹", ["|>"]),  # a book the real base wrote before the fix
    ("<|END_OF_BOOK|>", ["<|END_OF_BOOK|>"]),
    ("||SOUND|>", ["||SOUND|>"]),
    ("소리 |SOUND| 소리", ["|SOUND|"]),
    ("|START_OF_TITLE|제목", ["|START_OF_TITLE|"]),
    ("|START_OF_DIALOGUE|>안녕", ["|START_OF_DIALOGUE|>"]),  # not registered: written in pieces
    ("END_OF_BOOK|> 끝", ["END_OF_BOOK|>"]),
    ("끝 <| 시작", ["<|"]),
    ("2 > 1, 파이프 | 하나", []),  # ordinary punctuation is not a marker
])
def test_marker_fragments(text, fragments):
    assert marker_fragments(text, MARKERS) == fragments


def _rows(per_book: dict[str, list[float]], whole: float = 1.0) -> list[dict]:
    structure = {"structure": 0.5, "whole_markers_only": whole, "fragments_per_sample": 0.0}
    return [{"variant": v, "bpc_text": sum(b) / len(b), "eval": {"per_document_bits_per_char_text": b},
             "structure": structure if v != "deleted" else None} for v, b in per_book.items()]


def test_sign_test_and_books_needed():
    assert sign_test(2, 2) == 0.25 and sign_test(0, 3) == 1.0 and sign_test(5, 5) == 1 / 32
    assert books_needed() == 5  # 1/32 < 0.05 <= 1/16


def test_verdict_names_the_winner_and_is_unsure_with_two_books():
    line = verdict(_rows({"registered": [2.0, 2.1], "as-text": [2.2, 2.3], "deleted": [2.4, 2.0]}))
    assert line.startswith("verdict: keep the markers, each registered as one token.")
    assert "on 2 of 2 books than as-text (sign test p = 0.250: not sure: fewer than 5 books can never be)" in line
    assert "on 1 of 2 books than deleted (sign test p = 0.750" in line
    assert "Samples with whole markers only: registered 100% (0.0 fragments per sample)" in line


def test_verdict_is_sure_per_comparison():
    books = 6
    line = verdict(_rows({"registered": [1.0] * books, "as-text": [2.0] * books, "deleted": [1.0, 1.5] * 3}))
    assert "on 6 of 6 books than as-text (sign test p = 0.016: sure)" in line
    assert "on 3 of 6 books than deleted (sign test p = 0.656: not sure)" in line
    line = verdict(_rows({"registered": [2.0] * books, "as-text": [2.5] * books, "deleted": [1.0] * books}))
    assert line.startswith("verdict: deleting the markers gave the best story text here")


def _evaluated(keeper: KeepBest, step: int, loss: float) -> None:
    state = TrainerState()
    state.global_step = step
    keeper.on_evaluate(TrainingArguments("unused", report_to=[]), state, TrainerControl(), metrics={"eval_loss": loss})


def test_keep_best_restores_the_weights_of_the_lowest_held_out_loss(capsys):
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen weights are not copied, and not touched
    keeper = KeepBest(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    _evaluated(keeper, 10, 3.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    _evaluated(keeper, 20, 2.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(7.0)
    _evaluated(keeper, 30, 2.5)
    assert "held-out loss rose to 2.5000 at step 30 (lowest 2.0000 at step 20)" in capsys.readouterr().err
    kept = keeper.restore()
    assert kept.step == 20 and kept.loss == 2.0
    assert torch.equal(model.weight, torch.full((2, 3), 2.0)) and torch.equal(model.bias, torch.full((2,), 7.0))


def test_keep_best_keeps_the_last_when_it_is_the_lowest():
    model = torch.nn.Linear(3, 2)
    keeper = KeepBest(model)
    _evaluated(keeper, 10, 3.0)
    _evaluated(keeper, 20, 2.0)
    assert keeper.restore() is None


def test_markers_spelled_out_whole_are_not_fragments_for_a_model_that_did_not_register_them(monkeypatch):
    """ablate's as-text variant writes markers as plain text: whole when spelled right."""
    from peftko.evaluate import structure
    from peftko.evaluate.structure import SampleOptions, structure_score
    from peftko.model.generation import Sample

    written = iter(["|SOUND|>톡\n|END_OF_BOOK|>", "|SOUND|톡 |>\n|END_OF_BOOK|>"])
    monkeypatch.setattr(structure, "sample", lambda *a, **k: Sample("", next(written), 3, "marker", 1.0, ["?"]))
    s = structure_score(None, None, None, ["|START_OF_BOOK|>\n가\n나\n"], MARKERS, SampleOptions(samples=2),
                        "|END_OF_BOOK|>", r"\|[A-Z_]+\|>", seed=1)
    assert s["whole_markers_only"] == 0.5 and s["fragments_per_sample"] == 1.0  # '|SOUND|' and '|>'
