"""What ships in the adapter folder and the merged model: a real model card (README.md) whose loading
code works as written, and every tokenizer file a converter needs (the base's SentencePiece model)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from peftko.cli import main
from peftko.run.records import MergeRecord, RunRecord
from tests.conftest import train_args

KOREAN = "|START_OF_TITLE|>달빛 우체부|END_OF_TITLE|>\n|START_OF_DIALOGUE|>\"할머니, 오늘은 비가 올까요?\"|END_OF_DIALOGUE|> |SOUND|>똑똑"


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("card-merge") / "merged"
    result = CliRunner().invoke(main, ["merge", str(tiny_run), "--output", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def manifest_of(run: Path) -> dict:
    return json.loads((run / "peftko.json").read_text(encoding="utf-8"))


def record_of(manifest: dict) -> RunRecord:
    return RunRecord.from_json(manifest, Path("peftko.json"))


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert blocks, "the card has no Python example"
    return blocks[0]


def check_card(card: str, manifest: dict, folder: Path) -> None:
    assert "[More Information Needed]" not in card
    assert card.index("## 한국어") < card.index("## English")
    for m in manifest["markers"]:
        assert f"`{m['marker']}`: 토큰 id {m['id']}" in card
        assert f"`{m['marker']}`: token id {m['id']}" in card
    assert manifest["base_fingerprint"]["config_sha256"] in card
    assert f"peftko generate {folder.name} --prompt" in card
    assert manifest["config"]["doc_end_marker"] in card
    assert f"{manifest['corpus']['documents']} documents" in card  # the corpus size the run recorded
    results = manifest["results"]
    for key in ("bpc_base", "bpc_before", "bpc_after"):
        assert f"{results[key]:.3f}" in card
    # No path of this machine but the recorded base: not the output, the corpus, the home, the temp dir.
    rest = card.replace(manifest["base_model"], "")
    for place in (str(folder.resolve()), str(folder.parent), *manifest["config"]["data"], str(Path.home()),
                  tempfile.gettempdir(), os.getcwd()):
        assert place not in rest, place


def test_adapter_card(tiny_run):
    manifest = manifest_of(tiny_run)
    card = (tiny_run / "README.md").read_text(encoding="utf-8")
    check_card(card, manifest, tiny_run)
    assert "README.md" in manifest["files"]
    assert f"resize_token_embeddings({manifest['vocab']['rows_after']}" in card
    assert f"PeftModel.from_pretrained(model, '{tiny_run.name}')" in card
    assert "trainable_tokens_delta" in card  # why vLLM needs the merged model


def test_merged_card(tiny_run, merged):
    manifest = manifest_of(tiny_run)
    card = (merged / "README.md").read_text(encoding="utf-8")
    check_card(card, manifest, merged)
    assert f"AutoModelForCausalLM.from_pretrained('{merged.name}'" in card
    assert "README.md" in json.loads((merged / "peftko-merge.json").read_text())["files"]  # --force replaces it


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    return model(**tokenizer(KOREAN, return_tensors="pt")).logits.float()


def run_card_code(folder: Path, monkeypatch) -> dict:
    """The card's Python example, run as written from the folder's parent (it generates, too)."""
    monkeypatch.chdir(folder.parent)
    scope: dict = {}
    exec(python_block((folder / "README.md").read_text(encoding="utf-8")), scope)  # noqa: S102
    return scope


def test_card_code_loads_the_adapter_as_peftko_does(tiny_run, monkeypatch):
    """transformers + peft alone, resized to the recorded rows, give peftko's own logits.

    The card loads with dtype="auto", the base's own float32; peftko computes in the run's recorded
    dtype (bfloat16 where the CPU has AVX512-BF16), so the comparison asks for float32."""
    from peftko.model.inference import load_for_inference

    scope = run_card_code(tiny_run, monkeypatch)
    plain, plain_tok = scope["model"], scope["tokenizer"]
    assert type(plain).__name__ == "PeftModelForCausalLM"
    ours, tokenizer, _ = load_for_inference(tiny_run, quant="none", device="cpu", dtype="float32")
    ids = tokenizer(KOREAN)["input_ids"]
    assert plain_tok(KOREAN)["input_ids"] == ids
    assert tokenizer.convert_tokens_to_ids("|SOUND|>") in ids  # markers are single tokens in both
    a, b = logits(plain, plain_tok), logits(ours, tokenizer)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The adapter changes the output: the comparison would catch a load that dropped it.
    with plain.disable_adapter():
        assert not torch.allclose(logits(plain, plain_tok), a, atol=1e-4)


def test_card_code_loads_the_merged_model(merged, monkeypatch):
    from peftko.model.inference import load_for_inference

    scope = run_card_code(merged, monkeypatch)
    ours, tokenizer, _ = load_for_inference(merged, quant="none", device="cpu")
    torch.testing.assert_close(logits(scope["model"], scope["tokenizer"]), logits(ours, tokenizer))


def sentencepiece_model(tokenizer_json: Path) -> bytes:
    """A SentencePiece model file over the base's vocabulary, serialized with SentencePiece's own
    protobuf schema (as shipped in transformers): the format llama.cpp's converter reads."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.normalizer_spec.name = "identity"
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        proto.pieces.add(piece=piece, score=-float(i), type=spm.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def test_sentencepiece_model_ships_in_adapter_and_merged(tiny_bases, small_corpus, tmp_path):
    """transformers 5 saves a fast tokenizer as tokenizer.json only; the base's tokenizer.model is
    copied beside it, byte for byte, and listed as ours (so --force may replace it)."""
    base = tmp_path / "spm-base"
    shutil.copytree(tiny_bases["llama-untied"], base)
    (base / "tokenizer.model").write_bytes(sentencepiece_model(base / "tokenizer.json"))
    run, out = tmp_path / "run", tmp_path / "merged"
    runner = CliRunner()
    result = runner.invoke(main, train_args(base, small_corpus, run, "--quant", "none", "--max-steps", "1"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = runner.invoke(main, ["merge", str(run), "--output", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    expected = (base / "tokenizer.model").read_bytes()
    assert (run / "tokenizer.model").read_bytes() == expected
    assert (out / "tokenizer.model").read_bytes() == expected
    assert "tokenizer.model" in manifest_of(run)["files"]
    assert "tokenizer.model" in json.loads((out / "peftko-merge.json").read_text())["files"]


def test_no_sentencepiece_model_where_the_base_has_none(tiny_run, merged):
    assert not any((d / "tokenizer.model").exists() for d in (tiny_run, merged))


def test_the_base_terms_are_named_in_both_cards_and_copied_by_merge(tiny_run, tmp_path):
    """A base that ships terms (Gemma's GEMMA_TERMS.html) passes them on: the cards name them and carry
    the Hub's licence tag, and the merged folder holds a copy, since its weights are the base's."""
    from peftko.run.card import adapter_card, merged_card

    manifest = record_of({**manifest_of(tiny_run), "base_terms": ["GEMMA_TERMS.html", "NOTICE.md"]})
    mark = MergeRecord(adapter=str(tiny_run), base_model=manifest.base_model, dtype="float32")
    for card in (adapter_card(manifest, "run"), merged_card(manifest, mark, "merged")):
        assert card.startswith("---\nlanguage:\n- ko\nlicense: gemma\n")
        assert "기반 모델의 이용 조건이 이 모델에도 적용됩니다" in card and "`GEMMA_TERMS.html`, `NOTICE.md`" in card
        assert "The base model's terms apply to this model too" in card
    assert "license:" not in adapter_card(record_of(manifest_of(tiny_run)), "run")  # the tiny base ships none

    base = tmp_path / "base"
    shutil.copytree(manifest_of(tiny_run)["base_model"], base)
    (base / "LICENSE").write_text("the base's licence", encoding="utf-8")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "peftko.json").write_text(json.dumps({**manifest_of(tiny_run), "base_model": str(base),
                                                 "base_terms": ["LICENSE"]}), encoding="utf-8")
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(run), "--output", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "LICENSE").read_text(encoding="utf-8") == "the base's licence"
    assert "LICENSE" in json.loads((out / "peftko-merge.json").read_text())["files"]


def test_cards_name_the_kept_step_and_the_structure_of_the_samples_when_recorded(tiny_run):
    from peftko.run.card import adapter_card

    manifest = manifest_of(tiny_run)
    plain = adapter_card(record_of(manifest), tiny_run.name)
    assert "Adapter kept" not in plain and "Structure of" not in plain  # nothing recorded, nothing claimed
    manifest["results"].update(kept_step=30, structure={
        "samples": 2, "balanced": 1.0, "ends_with_marker": 0.5, "whole_markers_only": 1.0,
        "fragments_per_sample": 0.0, "structure": 0.5})
    card = adapter_card(record_of(manifest), tiny_run.name)
    assert "- 남긴 어댑터: 30단계" in card and "- Adapter kept: step 30 (the lowest held-out loss)" in card
    assert "짝을 닫음 100%, 책 끝 마커로 끝냄 50%, 온전한 마커만 100% (샘플당 마커 조각 0.0)" in card
    assert "Structure of 2 sampled continuations of held-out documents: 100% close their pairs, 50% end the " \
           "book, 100% write whole markers only (0.0 marker fragments per sample)" in card
