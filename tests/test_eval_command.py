"""`peftko eval` against an independent computation with plain transformers (and peft), to 1 %.

The reference below reads the known documents, runs each through the model in one forward pass
and sums the per-token losses itself; it shares no code with peftko's scoring.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main

END = "|END_OF_BOOK|>"
DOCS = [
    "|START_OF_BOOK|>\n|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n옛날 어느 마을에 작은 우체부가 살았습니다.\n"
    "|START_OF_DIALOGUE|>\"안녕!\"|END_OF_DIALOGUE|> |SOUND|>똑똑, 누군가 문을 두드렸어요.\n" + END,
    "|START_OF_BOOK|>\n|START_OF_TITLE|>할머니의 부엌|END_OF_TITLE|>\n할머니는 아침마다 된장국을 끓였습니다.\n"
    "|SOUND|>보글보글 |START_OF_DIALOGUE|>\"맛있다!\"|END_OF_DIALOGUE|>\n" + END,
    "|START_OF_TITLE|>비 오는 날|END_OF_TITLE|>\n웅덩이에 비친 하늘이 파랬습니다. |SOUND|>첨벙!\n" + END,
]
MARKER = re.compile(r"\|[A-Z][A-Z0-9_]*\|>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-corpus")
    (folder / "books.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return folder


def run_eval(model, corpus, *extra):
    result = CliRunner().invoke(main, ["eval", str(model), "--data", str(corpus), "--device", "cpu",
                                       "--json", *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)  # stdout holds the one JSON object alone


@torch.no_grad()
def per_token_nll(model, ids):
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits.float()[0, :-1]
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none"), logits.argmax(-1)


def reference_registered(model, tok, marker_ids):
    """Markers are single tokens: a token is a marker token iff its id is a marker id."""
    nll = text_nll = 0.0
    chars = text_chars = 0
    for doc in DOCS:
        ids = tok(doc)["input_ids"]
        losses, _ = per_token_nll(model, ids)
        first = tok.decode(ids[:1])
        assert doc.startswith(first)
        nll += float(losses.sum())
        chars += len(doc) - len(first)  # the first token is never predicted
        text_nll += sum(float(l) for i, l in zip(ids[1:], losses) if i not in marker_ids)
        text = MARKER.sub("", doc)
        text_chars += len(text) - (0 if ids[0] in marker_ids else len(first))
    return nll / math.log(2) / chars, text_nll / math.log(2) / text_chars


def test_adapter_matches_plain_transformers_and_peft(tiny_run, corpus):
    from peft import PeftModel

    manifest = json.loads((tiny_run / "peftko.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_run)
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"], dtype=torch.float32)
    base.resize_token_embeddings(manifest["vocab"]["rows_after"], mean_resizing=False)
    model = PeftModel.from_pretrained(base, tiny_run).eval()
    marker_ids = {m["id"] for m in manifest["markers"]}
    bpc, bpc_text = reference_registered(model, tok, marker_ids)

    got = run_eval(tiny_run, corpus, "--seq-len", "512")
    assert got["documents"] == len(DOCS)
    assert got["chars"] == sum(len(d) for d in DOCS)
    assert got["bits_per_char"] == pytest.approx(bpc, rel=0.01)
    assert got["bits_per_char_text"] == pytest.approx(bpc_text, rel=0.01)
    assert got["bits_per_char_text"] != pytest.approx(got["bits_per_char"], rel=0.01)  # markers do count
    # Per marker, by token id: occurrences, bits and top-1 at the position before each one.
    for m in manifest["markers"]:
        bits, hits, n, count = 0.0, 0, 0, 0
        for doc in DOCS:
            ids = tok(doc)["input_ids"]
            losses, best = per_token_nll(model, ids)
            count += ids.count(m["id"])
            for pos in [p for p, i in enumerate(ids) if i == m["id"] and p > 0]:
                bits += float(losses[pos - 1]) / math.log(2)
                hits += int(best[pos - 1] == m["id"])
                n += 1
        stats = got["markers"][m["marker"]]
        assert stats["count"] == count
        if n:
            assert stats["bits_per_occurrence"] == pytest.approx(bits / n, rel=0.01)
            assert stats["top1"] == pytest.approx(hits / n)


def test_plain_base_with_markers_as_text(tiny_bases, corpus):
    """Markers in pieces: a token touching a marker span is a marker token (the documented rule)."""
    path = tiny_bases["llama-untied"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll = text_nll = 0.0
    chars = text_chars = 0
    for doc in DOCS:
        enc = tok(doc, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        losses, _ = per_token_nll(model, ids)
        spans = [m.span() for m in MARKER.finditer(doc)]
        touches = [any(a < e and b > s for s, e in spans) for a, b in offs]
        keep = [not any(s <= c < e for s, e in spans) for c in range(len(doc))]
        for t, (a, b) in enumerate(offs):
            if touches[t] or t == 0:
                keep[a:b] = [False] * (b - a)
        nll += float(losses.sum())
        chars += len(doc) - (offs[0][1] - offs[0][0])
        text_nll += sum(float(losses[t - 1]) for t in range(1, len(ids)) if not touches[t])
        text_chars += sum(keep)
    got = run_eval(path, corpus, "--seq-len", "512")
    assert got["bits_per_char"] == pytest.approx(nll / math.log(2) / chars, rel=0.01)
    assert got["bits_per_char_text"] == pytest.approx(text_nll / math.log(2) / text_chars, rel=0.01)
    assert set(got["markers"]) == set(MARKER.findall("".join(DOCS)))
    assert got["tokens_per_char"] > 0.5  # markers in pieces cost many tokens


def test_windows_predict_every_token_once(tiny_bases):
    """Windows overlap by one token: each token but the first is scored once, the first window
    exactly as with the whole document in context."""
    from peftko.evaluate.scoring import token_nll

    path = tiny_bases["llama-untied"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(DOCS[0])["input_ids"]
    assert len(ids) > 30
    whole, _ = token_nll(model, ids, 1024, 4, "cpu")
    windows, _ = token_nll(model, ids, 8, 3, "cpu")
    assert whole[0] == windows[0] == 0
    assert (windows[1:] > 0).all()
    assert windows[1:8] == pytest.approx(whole[1:8], rel=1e-4)
    assert windows[8:].sum() != pytest.approx(whole[8:].sum(), rel=1e-3)  # fresh context per window


def test_refusals(tmp_path, tiny_run, corpus):
    import shutil

    runner = CliRunner()
    missing = runner.invoke(main, ["eval", str(tmp_path / "nope"), "--data", str(corpus)])
    assert missing.exit_code == 2 and "model not found" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = runner.invoke(main, ["eval", str(empty), "--data", str(corpus)])
    assert no_config.exit_code == 2 and "config.json" in no_config.output
    changed = tmp_path / "changed"
    shutil.copytree(tiny_run, changed)
    manifest = json.loads((changed / "peftko.json").read_text())
    manifest["base_fingerprint"]["config_sha256"] = "0" * 64
    (changed / "peftko.json").write_text(json.dumps(manifest))
    result = runner.invoke(main, ["eval", str(changed), "--data", str(corpus)])
    assert result.exit_code == 2 and "does not match" in result.output
    manifest["base_model"] = str(tmp_path / "gone")
    (changed / "peftko.json").write_text(json.dumps(manifest))
    result = runner.invoke(main, ["eval", str(changed), "--data", str(corpus)])
    assert result.exit_code == 2 and "base model not found" in result.output
    (changed / "peftko.json").unlink()
    result = runner.invoke(main, ["eval", str(changed), "--data", str(corpus)])
    assert result.exit_code == 2 and "incomplete" in result.output


def test_samples_add_a_structure_score_with_fragments(tiny_run, corpus):
    got = run_eval(tiny_run, corpus, "--samples", "1", "--sample-tokens", "8")
    s = got["structure"]
    assert s["samples"] == len(DOCS)
    keys = {"samples", "balanced", "ends_with_marker", "whole_markers_only", "fragments_per_sample", "structure"}
    assert set(s) == keys | {"strict"} and set(s["strict"]) == keys  # the run records a grammar: both modes
    assert all(0 <= s[k] <= 1 for k in ("balanced", "ends_with_marker", "whole_markers_only", "structure"))
    # 8 tokens are too few for the model's own book, not for strict's closers: every sample ends well-formed
    assert s["strict"]["structure"] == 1 and s["strict"]["fragments_per_sample"] == 0
    assert s["fragments_per_sample"] >= 0 and (s["whole_markers_only"] == 1) == (s["fragments_per_sample"] == 0)
    assert len(got["per_document_bits_per_char_text"]) == len(DOCS)
    shown = CliRunner().invoke(main, ["eval", str(tiny_run), "--data", str(corpus), "--samples", "1",
                                      "--sample-tokens", "4"])
    assert shown.exit_code == 0 and f"structure of {len(DOCS)} sampled continuations" in shown.output, shown.output
    assert f"with --structure strict: structure of {len(DOCS)} sampled continuations" in shown.output
    assert "structure" not in run_eval(tiny_run, corpus)  # sampling only when asked
