"""Checks that run before any slow step: the base's files, LoRA targets, the marker list, the pattern.

Each is checked in a real `--dry-run` as well as in a real run: a dry run that passes must mean the
real run gets past every check that needs no weights.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from peftko.cli import main
from tests.conftest import train_args


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for w in words:
        assert w in result.output, (w, result.output)


@pytest.fixture
def base_copy(tiny_bases, tmp_path):
    """A private copy of a tiny base that a test may damage."""
    return shutil.copytree(tiny_bases["llama-untied"], tmp_path / "base")


def both_ways(base, corpus, out, *extra):
    """The same command as a dry run and as a real run."""
    args = train_args(base, corpus, out, *extra)
    return invoke(*args, "--dry-run"), invoke(*args)


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_safetensors_is_named_before_anything_is_written(base_copy, small_corpus, tmp_path, damage):
    weights = base_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    out = tmp_path / "run"
    for result in both_ways(base_copy, small_corpus, out):
        refused(result, "model.safetensors", "truncated or corrupted")
    assert not out.exists()


def test_unknown_lora_target_names_the_bases_linear_layers(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    for result in both_ways(tiny_bases["gpt-neox"], small_corpus, out, "--target-modules", "nosuch_proj"):
        refused(result, "nosuch_proj", "query_key_value", "dense_h_to_4h")
    assert not out.exists()


def test_known_lora_targets_pass(tiny_bases, small_corpus, tmp_path):
    args = train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "run", "--target-modules", "q_proj,v_proj")
    assert invoke(*args, "--dry-run").exit_code == 0


def test_pattern_matching_the_empty_string_is_refused_by_dry_run_and_run(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    for result in both_ways(tiny_bases["llama-tied"], small_corpus, out, "--marker-pattern", "x*"):
        refused(result, "marker_pattern", "empty string")
    assert not out.exists()
    refused(invoke("markers", str(small_corpus), "--pattern", "x*"), "empty string")


def test_explicit_markers_absent_from_the_corpus_and_unlisted_ones_are_warned_about(
        tiny_bases, small_corpus, tmp_path):
    args = train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "run", "--markers", "|NOPE|>,|SOUND|>")
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "|NOPE|> never occur" in result.output
    assert "the corpus also uses" in result.output and "|START_OF_TITLE|>" in result.output


def test_explicit_marker_outside_the_pattern_is_counted(tiny_bases, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("<장면>바닷가에서.\n<장면>숲에서.\n", encoding="utf-8")
    args = train_args(tiny_bases["llama-tied"], corpus, tmp_path / "run", "--markers", "<장면>")
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "never occur" not in result.output and "<장면> x2" in result.output


def test_overlapping_markers_are_refused(tiny_bases, small_corpus, tmp_path):
    out = tmp_path / "run"
    for result in both_ways(tiny_bases["llama-tied"], small_corpus, out, "--markers", "|SOUND|>,SOUND|>"):
        refused(result, "overlap", "'SOUND|>' is part of '|SOUND|>'")
    assert not out.exists()


def test_pickle_only_base_is_refused_before_the_corpus_is_read(base_copy, small_corpus, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(base_copy / "model.safetensors"), base_copy / "pytorch_model.bin")
    (base_copy / "model.safetensors").unlink()
    read = []
    monkeypatch.setattr("peftko.corpus.reading.scan_corpus", lambda *a, **k: read.append(1))
    refused(invoke(*train_args(base_copy, small_corpus, tmp_path / "run")), "pickle", "--allow-pickle")
    assert read == []


@pytest.fixture
def corpus_with_a_typo(tmp_path):
    corpus = tmp_path / "typo"
    corpus.mkdir()
    (corpus / "a.txt").write_text("|SOUND|>쿵! 문이 열렸어요.\n|sound|>쾅!\n|SOUND|>끝.\n", encoding="utf-8")
    return corpus


def test_marker_problems_are_prominent_and_strict_refuses(tiny_bases, corpus_with_a_typo, tmp_path):
    args = train_args(tiny_bases["llama-tied"], corpus_with_a_typo, tmp_path / "run", "--dry-run")
    result = invoke(*args)
    assert result.exit_code == 0 and "warning: 1 marker problem(s)" in result.output, result.output
    refused(invoke(*args, "--strict"), "1 marker problem(s)", "peftko markers")


def test_books_ended_by_the_end_marker_alone_train_without_problems(tiny_bases, tmp_path):
    corpus = tmp_path / "books"
    corpus.mkdir()
    (corpus / "a.txt").write_text("첫 책입니다.\n|END_OF_BOOK|>\n둘째 책입니다.\n|END_OF_BOOK|>\n", encoding="utf-8")
    (corpus / "b.txt").write_text("셋째 책입니다.\n|END_OF_BOOK|>\n", encoding="utf-8")
    args = train_args(tiny_bases["llama-tied"], corpus, tmp_path / "run", "--dry-run", "--strict")
    result = invoke(*args)
    assert result.exit_code == 0 and "problems: 0" in result.output, result.output


def test_many_passes_over_a_small_corpus_are_announced():
    from peftko.core.config import TrainConfig
    from peftko.train.trainer import passes_note

    cfg = TrainConfig(max_steps=80, batch_size=4, grad_accum=1)
    # 14 steps a pass (13 of 4 blocks, the last of 2): 5 passes and 10 steps of 4 blocks.
    assert "80 steps train 310 blocks = 5.7 passes over 54 training blocks" in passes_note(cfg.steps(), 54)
    assert passes_note(TrainConfig(max_steps=10, batch_size=4, grad_accum=1).steps(), 54) is None
    assert passes_note(TrainConfig(max_steps=-1, epochs=5).steps(), 54) is None  # asked for in epochs: no surprise


def test_a_training_set_smaller_than_a_step_is_said_and_counted_as_trained(tiny_bases, small_corpus, tmp_path):
    """Fewer blocks than batch_size x grad_accum: every step trains the blocks there are, and the
    notes and peftko.json say so (the Trainer's own count of tokens is the check)."""
    corpus = tmp_path / "one"
    corpus.mkdir()
    shutil.copy(sorted(small_corpus.glob("*.txt"))[0], corpus / "book.txt")
    out = tmp_path / "run"
    result = invoke(*train_args(tiny_bases["llama-tied"], corpus, out, "--seq-len", "1024", "--batch-size", "4",
                                "--max-steps", "5", "--val-fraction", "0"))
    assert result.exit_code == 0, result.output
    blocks, block_len = map(int, re.search(r"(\d+) blocks? of (\d+) tokens", result.output).groups())
    assert blocks < 4
    assert "fewer than the 4 a step takes (batch_size 4 x grad_accum 1)" in result.output
    assert f"5 steps train {5 * blocks} blocks" in result.output
    results = json.loads((out / "peftko.json").read_text(encoding="utf-8"))["results"]
    assert results["tokens_seen"] == 5 * blocks * block_len


def test_a_relative_base_path_is_recorded_absolute(tiny_bases, small_corpus, tmp_path, monkeypatch):
    """adapter_config.json must not send peft to the Hub when loaded from another directory."""
    import json

    shutil.copytree(tiny_bases["llama-tied"], tmp_path / "bases" / "x")
    monkeypatch.chdir(tmp_path)
    args = train_args("bases/x", small_corpus, tmp_path / "run", "--max-steps", "1", "--quant", "none")
    assert invoke(*args).exit_code == 0
    recorded = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "bases" / "x")


@pytest.mark.parametrize("seq_len", ["1", "0"])
def test_blocks_too_short_for_a_training_pair_are_refused(tiny_bases, small_corpus, tmp_path, seq_len):
    args = [a if a != "64" else seq_len for a in train_args(tiny_bases["llama-tied"], small_corpus, tmp_path / "r")]
    refused(invoke(*args), "seq_len: must be at least 2")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("quant, bad", [("4bit", float("nan")), ("none", float("inf"))])
def test_non_finite_base_weights_are_refused_at_load_by_name(base_copy, small_corpus, tmp_path, quant, bad):
    from safetensors.torch import load_file, save_file

    weights = load_file(base_copy / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][3, 5] = bad
    save_file(weights, base_copy / "model.safetensors", metadata={"format": "pt"})
    result = invoke(*train_args(base_copy, small_corpus, tmp_path / "run", "--quant", quant))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "NaN or inf" in result.output and "layers.1.mlp.down_proj" in result.output


def test_output_and_disk_refusals_come_before_the_corpus_pass(tiny_bases, small_corpus, tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr("peftko.corpus.reading.scan_corpus", lambda *a, **k: read.append(1))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    refused(invoke(*train_args(tiny_bases["llama-tied"], small_corpus, foreign, "--force")), "notes.txt")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "new" / "run"
    refused(invoke(*train_args(tiny_bases["llama-tied"], small_corpus, out)), "not enough disk space")
    assert read == []
    assert not (tmp_path / "new").exists()  # both folders it made for the run, taken back
