"""`generate --structure strict` (peftko.model.structure): markers only where the corpus's grammar allows
them, the forbidden probability given to what the structure needs, text tokens untouched."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from peftko.cli import main
from peftko.core.config import DEFAULT_MARKER_PATTERN
from peftko.corpus.grammar import learn_grammar
from peftko.corpus.lint import marker_fragments, pair_role
from peftko.evaluate.structure import structure_ok
from peftko.model.structure import StructureProcessor, build_guide
from peftko.run.records import RunRecord
from tests.test_grammar import BOOK, DIALOGUE, END, END_DIALOGUE, END_TITLE, PLAIN, SOUND, TITLE

MARKERS = [BOOK, END, TITLE, END_TITLE, DIALOGUE, END_DIALOGUE, SOUND]


@pytest.fixture(scope="module")
def guided(tiny_bases):
    """A real tokenizer with the markers added (as lora-train registers them), and its guide."""
    tok = AutoTokenizer.from_pretrained(tiny_bases["llama-untied"])
    tok.add_tokens(MARKERS)
    grammar = learn_grammar([PLAIN, PLAIN], DEFAULT_MARKER_PATTERN)
    return tok, build_guide(grammar, tok, [tok.eos_token_id], END, len(tok))


def token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def probs_after(processor, tok, prompt: str, logits: torch.Tensor) -> torch.Tensor:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    return torch.softmax(processor(ids, logits[None].clone())[0], -1)


def test_the_guide_finds_marker_pieces_and_line_breaks_but_not_korean_text(guided):
    tok, guide = guided
    assert set(guide.marker_ids) == set(MARKERS)
    pieces = [i for i in range(len(tok)) if guide.fragments[i]]
    texts = [tok.decode([i]) for i in pieces]
    assert any("|" in t for t in texts) and all(re.search(r"[A-Z_|>]", t) for t in texts)
    assert not any(re.search("[가-힣]", t) and not re.search(r"[A-Z_|>]", t) for t in texts)
    assert guide.newlines[token(tok, "\n")] and not guide.fragments[token(tok, "\n")]


def test_a_forbidden_marker_s_probability_goes_to_the_closer_not_to_marker_pieces(guided):
    """The issue's failure: inside a title the model wants |END_OF_DIALOGUE|>. Its probability must reach
    |END_OF_TITLE|>, not the pieces `|`, `O`, `F`... that would spell marker words as text."""
    tok, guide = guided
    prompt = f"{BOOK}\n{TITLE}달빛"
    processor = StructureProcessor(guide, prompt, len(tok(prompt)["input_ids"]), budget=100)
    logits = torch.zeros(len(tok))
    bar = token(tok, "|")
    logits[token(tok, END_DIALOGUE)], logits[bar], logits[token(tok, END_TITLE)] = 6.0, 4.0, 1.0
    before = torch.softmax(logits, -1)
    after = probs_after(processor, tok, prompt, logits)
    forbidden = guide.fragments.clone()
    for m in (END_DIALOGUE, END, BOOK, TITLE, DIALOGUE, SOUND):
        forbidden[token(tok, m)] = True
    forbidden |= guide.newlines  # the title closes on its line
    forbidden[list(guide.ends)] = True  # no end of sequence with a block open
    assert after[forbidden].sum() == 0 and after[bar] == 0
    closer = token(tok, END_TITLE)
    assert float(after[closer]) == pytest.approx(float(before[closer] + before[forbidden].sum()), rel=1e-4)
    text = ~forbidden
    text[closer] = False
    assert torch.allclose(after[text], before[text], rtol=1e-4)  # text tokens keep their probability
    assert processor.redirected == pytest.approx(float(before[forbidden].sum()), rel=1e-4)


def greedy_pick(guide, tok, prompt: str, logits: torch.Tensor, greedy: bool) -> int:
    processor = StructureProcessor(guide, prompt, len(tok(prompt)["input_ids"]), budget=100, greedy=greedy)
    return int(processor(tok(prompt, return_tensors="pt")["input_ids"], logits[None].clone())[0].argmax())


def test_under_greedy_pooled_minor_shares_do_not_close_a_block_but_a_majority_does(guided):
    """The demo's case: inside a title, many forbidden tokens hold a little each (in all less than half),
    and the best text token more than any one of them. Sampling gives the closer their sum; greedy keeps
    writing the title. When the forbidden tokens hold most of the probability, greedy closes."""
    tok, guide = guided
    prompt = f"{BOOK}\n{TITLE}\""
    closer, word = token(tok, END_TITLE), tok("달", add_special_tokens=False)["input_ids"][-1]
    minor = torch.full((len(tok),), -30.0)
    forbidden = [token(tok, m) for m in (DIALOGUE, END, SOUND, END_DIALOGUE)] + [token(tok, "\n")]
    minor[forbidden] = 0.0  # 5 x e^0 against the word's e^0.6 and the rest of the text below
    minor[word], minor[closer] = 0.6, -2.0
    others = set(tok("엄마와 아빠가 함께 바다에 갔다", add_special_tokens=False)["input_ids"]) - {word}
    assert len(others) >= 8
    minor[sorted(others)] = 0.5  # other text: the text holds most of the probability, none more than the word
    assert greedy_pick(guide, tok, prompt, minor, greedy=False) == closer  # argmax of the pooled share
    assert greedy_pick(guide, tok, prompt, minor, greedy=True) == word
    major = minor.clone()
    major[forbidden] = 3.0  # now the forbidden tokens hold most of it: leaving the title is what the model wants
    assert greedy_pick(guide, tok, prompt, major, greedy=True) == closer


def test_near_the_token_limit_only_the_closers_fit(guided):
    tok, guide = guided
    prompt = f"{BOOK}\n{DIALOGUE}\"엄마"
    processor = StructureProcessor(guide, prompt, len(tok(prompt)["input_ids"]), budget=2)
    logits = torch.zeros(len(tok))
    logits[tok("엄마", add_special_tokens=False)["input_ids"][0]] = 20.0
    assert float(probs_after(processor, tok, prompt, logits)[token(tok, END_DIALOGUE)]) == pytest.approx(1.0)
    assert processor.forced == 1


def walk(text: str) -> list[str]:
    """The structure errors a reader meets: an END with no open START, markers after the book end."""
    stack, errors = [], []
    for m in re.findall(r"\|[A-Z_]+\|>", text):
        role = pair_role(m)
        if role is not None and not role.opens:
            if not stack or stack[-1] != role.partner:
                errors.append(f"{m} without its START")
            else:
                stack.pop()
        elif role is not None:
            stack.append(m)
    return errors + [f"{s} left open" for s in stack]


@pytest.fixture(scope="module")
def sampled(tiny_run):
    """Eight sampled books per mode from |START_OF_BOOK|>, at a high temperature (the model barely
    trained: it reaches for markers anywhere, which is what strict must hold)."""
    out = {}
    for mode in ("strict", "free"):
        args = ["generate", str(tiny_run), "--prompt", BOOK + "\n", "--temperature", "1.5", "--max-new-tokens", "40",
                "--num-samples", "8", "--json", "--device", "cpu", "--structure", mode, "--seed", "3"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        out[mode] = [json.loads(line) for line in result.stdout.splitlines()]
    return out


def test_the_run_records_the_corpus_grammar(tiny_run):
    g = RunRecord.read(tiny_run).grammar
    assert g is not None and g.pairs[TITLE] == END_TITLE and g.opens == {BOOK: 4}


def test_strict_samples_are_well_formed_books_for_every_seed(sampled):
    for s in sampled["strict"]:
        book = BOOK + "\n" + s["text"]
        assert walk(book) == [], book
        assert structure_ok(book, MARKERS, END, DEFAULT_MARKER_PATTERN) == (True, True), book
        assert marker_fragments(s["text"], MARKERS) == [] and s["structure"] == "strict"
        assert s["stop_reason"] == "marker"


def test_free_mode_is_the_model_as_it_is(sampled):
    assert all(s["structure"] == "free" and s["forced_closers"] == 0 for s in sampled["free"])
    assert [s["text"] for s in sampled["free"]] != [s["text"] for s in sampled["strict"]]


def test_strict_is_the_default_where_a_grammar_is_recorded(tiny_run):
    args = ["generate", str(tiny_run), "--prompt", BOOK, "--max-new-tokens", "4", "--json", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["structure"] == "strict"


def test_strict_without_a_grammar_is_refused_and_free_is_the_default(tiny_bases):
    base = str(tiny_bases["llama-untied"])
    refused = CliRunner().invoke(main, ["generate", base, "--prompt", "옛날", "--structure", "strict", "--device", "cpu"])
    assert refused.exit_code == 2 and "records no marker grammar" in refused.output
    assert "Traceback" not in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("peftko: error: --structure strict:")  # one line
    free = CliRunner().invoke(main, ["generate", base, "--prompt", "옛날", "--max-new-tokens", "3", "--json",
                                     "--device", "cpu"])
    assert free.exit_code == 0 and json.loads(free.stdout)["structure"] == "free"


def test_the_merged_model_carries_the_grammar_and_generates_strict(tiny_run, tmp_path):
    from peftko.run.records import MergeRecord

    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(merged)]).exit_code == 0
    assert MergeRecord.read(merged).grammar == RunRecord.read(tiny_run).grammar is not None
    args = ["generate", str(merged), "--prompt", BOOK, "--max-new-tokens", "6", "--json", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["structure"] == "strict" and walk(BOOK + s["text"]) == [] and s["text"].endswith(END)
